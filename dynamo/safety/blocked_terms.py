"""The broadcaster's list of blocked terms (DYNAMO_BLOCKED_TERMS_FILE), and the check of a
subject against it.

The file is UTF-8, one term or phrase a line; blank lines and lines starting with `#` are
ignored. A subject holds a term when the term's words appear in it in a row, whole words
only, ignoring case and accents: both sides are normalized (Unicode NFKD, combining marks
dropped, casefolded, so "Café", "CAFE" and "ｃａｆｅ" are one word) and cut into words
(runs of letters and digits), so "Scunthorpe" is not blocked by a four-letter term, and
"bad  Thing!" holds the phrase "bad thing".

`BlockedTerms.watch()` looks at the file's size and mtime every `WATCH_INTERVAL_S` and
reads it again when they change; a change that cannot be read (gone, unreadable, not
UTF-8) keeps the last good list, with one WARNING per bad version. The check itself
never touches the disk. The words are never logged nor shown: a match is reported by the
line it came from.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import unicodedata
from pathlib import Path

import trio

log = logging.getLogger(__name__)

# How often the file's size and mtime are looked at: a change is in force within this.
WATCH_INTERVAL_S = 1.0
# A list this long is a mistake (a wrong file), not a list of terms.
MAX_FILE_BYTES = 4 * 1024 * 1024
# Letters and digits of any script (after NFKD, marks are gone); `_` is a separator.
_WORD = re.compile(r"[^\W_]+")


class BlockedTermsError(Exception):
    """The file cannot be read as a list of terms."""


def words_of(text: str) -> tuple[str, ...]:
    """`text` as normalized words: no accents, casefolded, punctuation and spaces dropped."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return tuple(_WORD.findall(bare.casefold()))


@dataclasses.dataclass(frozen=True)
class TermList:
    """Terms by their number of words; each term maps to the line it came from."""

    terms: dict[tuple[str, ...], int]

    @property
    def size(self) -> int:
        return len(self.terms)

    def match(self, text: str) -> int | None:
        """The file line of a term `text` holds, or None."""
        if not self.terms:
            return None
        words = words_of(text)
        lengths = sorted({len(term) for term in self.terms})
        for start in range(len(words)):
            for length in lengths:
                if start + length > len(words):
                    break
                line = self.terms.get(words[start : start + length])
                if line is not None:
                    return line
        return None


EMPTY = TermList({})


def parse(text: str) -> TermList:
    terms: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        words = words_of(stripped)
        if words:  # a line of punctuation only blocks nothing
            terms.setdefault(words, number)
    return TermList(terms)


def load(path: Path) -> TermList:
    """Reads and parses the file; raises BlockedTermsError with a reason fit for one line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BlockedTermsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise BlockedTermsError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BlockedTermsError(f"{path} is not UTF-8 (byte {exc.start})") from exc
    return parse(text)


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class BlockedTerms:
    """The list in force; `watch()` keeps it up to date with the file."""

    def __init__(self, path: Path | None):
        self.path = path
        self.terms = EMPTY
        self.loaded_at: datetime.datetime | None = None
        self.error: str | None = None
        self._signature: tuple[int, int] | None = None
        if path is not None:
            self._signature = _signature(path)
            self.terms = load(path)  # at startup an unreadable file stops the process
            self.loaded_at = _now()

    def match(self, text: str) -> int | None:
        return self.terms.match(text)

    def refresh(self) -> bool:
        """Reads the file again if its size or mtime changed; True if the list changed."""
        if self.path is None:
            return False
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            terms = load(self.path)
        except BlockedTermsError as exc:
            self.error = str(exc)
            log.warning("blocked terms: %s; keeping the last good list (%d terms)",
                        exc, self.terms.size)
            return False
        self.terms, self.loaded_at, self.error = terms, _now(), None
        log.info("blocked terms: %d terms loaded from %s", terms.size, self.path)
        return True

    async def watch(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.path is None:
            await trio.sleep_forever()
        while True:
            await trio.sleep(WATCH_INTERVAL_S)
            # A stat and, rarely, a read of a small file: off the event loop all the same.
            await trio.to_thread.run_sync(self.refresh)

    def status_json(self) -> dict:
        """For /status: how many terms and when loaded, never the terms themselves."""
        return {
            "configured": self.path is not None,
            "terms": self.terms.size,
            "loaded_at": _iso(self.loaded_at),
            "error": self.error,
        }


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
