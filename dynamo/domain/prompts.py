"""The text sent to OpenAI for one request, and the text shown for it on stream.

The prompts match the original Go service word for word (contract §4), so that images
look the same as before the rewrite. Everything here is a pure function of the inputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from dynamo.domain.jobs import Style

# The colors a friend may be, in the order viewers see them offered (contract §3).
COLORS: tuple[str, ...] = (
    "red",
    "red-orange",
    "orange",
    "yellow-orange",
    "yellow",
    "chartreuse",
    "green",
    "cyan",
    "sky-blue",
    "blue",
    "indigo",
    "purple",
    "magenta",
)

# The background a friend of each color is drawn on: far from the friend's own color,
# so that keying the background out does not eat into the character (contract §4).
COMPLEMENTS: dict[str, str] = {
    "red": "green",
    "green": "red",
    "red-orange": "cyan",
    "orange": "sky-blue",
    "yellow-orange": "blue",
    "yellow": "indigo",
    "chartreuse": "magenta",
    "cyan": "red-orange",
    "sky-blue": "orange",
    "blue": "yellow-orange",
    "indigo": "yellow-orange",
    "purple": "yellow",
    "magenta": "chartreuse",
}

# Names longer than this would overflow the alert overlay; real names are far shorter.
MAX_NAME_CHARS = 60
# Used when the model answers with nothing usable and there is no subject to name it by.
FALLBACK_NAME = "Friend"
# Words a name made from the subject does not end on ("Caterpillar in a Top Hat", not
# "Caterpillar in a"), and that stay lower case inside it.
_SMALL_WORDS = frozenset(
    {"a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "with", "for"}
)

# A leading article, only when something follows it ("a" alone is left alone).
_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+(?=\S)", re.IGNORECASE)
# Quote marks models like to wrap a name in, straight and typographic.
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"

_GHOST_TEMPLATE = "a ghostly image of {subject}, with glitchy VHS artifacts, dark background"
_FRIEND_TEMPLATE = (
    "{color_with_article} {bare_subject}, illustrated in the style of 1990s digital clip art"
    " images, with a limited 256-color palette and sharp black outlines"
)
# Left out where the image model draws the background transparent itself (contract §4).
_CHROMA_KEY_CLAUSE = ", with a solid {background} background suitable for chroma keying"
_NAME_TEMPLATE = (
    "Please come up with a name for a friendly mascot character who is {subject}."
    " Please answer with a single name, and no additional text."
)


def _with_article(word_or_phrase: str) -> str:
    """`a`/`an` chosen by the first letter, as the original did (no phonetics)."""
    article = "an" if word_or_phrase[:1].lower() in "aeiou" else "a"
    return f"{article} {word_or_phrase}"


def bare_subject(subject: str) -> str:
    """The subject trimmed, without its leading a/an/the."""
    return _LEADING_ARTICLE.sub("", subject.strip(), count=1)


def ghost_prompt(subject: str) -> str:
    return _GHOST_TEMPLATE.format(subject=subject.strip())


def friend_prompt(color: str, subject: str, *, chroma_key: bool = True) -> str:
    prompt = _FRIEND_TEMPLATE.format(
        color_with_article=_with_article(color), bare_subject=bare_subject(subject)
    )
    if chroma_key:
        prompt += _CHROMA_KEY_CLAUSE.format(background=COMPLEMENTS[color])
    return prompt


def friend_description(subject: str) -> str:
    """A friend as shown on stream: its own article, never its color."""
    return _with_article(bare_subject(subject))


def description(style: Style, inputs: Mapping[str, Any]) -> str:
    """The subject as shown on stream and in results (contract §3)."""
    subject = inputs["subject"]
    if not isinstance(subject, str):  # stored before such messages were refused
        raise TypeError(f"subject: must be a string, not {type(subject).__name__}")
    if Style(style) is Style.FRIEND:
        return friend_description(subject)
    return subject.strip()


def prompt(style: Style, inputs: Mapping[str, Any]) -> str:
    """The image prompt for validated `inputs`."""
    if Style(style) is Style.FRIEND:
        return friend_prompt(inputs["color"], inputs["subject"])
    return ghost_prompt(inputs["subject"])


def name_prompt(subject: str) -> str:
    """The friend-name question: the viewer's subject as they wrote it, only trimmed (the
    original formats `payload.Inputs.Friend.Subject` as is: no article added or removed)."""
    return _NAME_TEMPLATE.format(subject=subject.strip())


def name_from_subject(subject: str) -> str:
    """A friend's name when the model gave none: its subject, title-cased, cut at a word.

    "caterpillar in a top hat" → "Caterpillar in a Top Hat".
    """
    words = " ".join(bare_subject(subject).split()).strip(_QUOTES + ".").split()
    name: list[str] = []
    for word in words:
        if len(" ".join([*name, word])) > MAX_NAME_CHARS:
            if not name:  # one very long word: cut it
                name.append(word[:1].upper() + word[1:MAX_NAME_CHARS])
            break
        small = name and word.lower() in _SMALL_WORDS
        name.append(word.lower() if small else word[:1].upper() + word[1:])
    while len(name) > 1 and name[-1].lower() in _SMALL_WORDS:
        name.pop()
    return " ".join(name) or FALLBACK_NAME


def clean_name(answer: str, fallback: str = FALLBACK_NAME) -> str:
    """A friend's name from the model's answer, safe to show whatever it said; `fallback`
    when nothing usable is left."""
    # Newlines and tabs become spaces: a name is one line on the overlay.
    name = " ".join(answer.split())
    # Strip quotes and a trailing period in turns: models write both `"Bob".` and `"Bob."`.
    previous = None
    while name != previous:
        previous = name
        name = name.strip().strip(_QUOTES).rstrip(".").strip()
    name = name[:MAX_NAME_CHARS].rstrip()
    return name or fallback
