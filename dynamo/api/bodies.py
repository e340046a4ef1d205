"""The JSON bodies the API answers with: a request, and the cursor of a listing page
(and the other forms a listing's `before` may take)."""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import uuid

from dynamo.database.port import iso
from dynamo.domain.viewer_messages import VIEWER_MESSAGES

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
# A UTC offset's digits, as RFC 3339 writes them after its sign (`02:00`).
_OFFSET = re.compile(r"\d{2}:?\d{2}")
_MICROSECOND = datetime.timedelta(microseconds=1)
_FALLBACK_MESSAGES = {reason.value: message for reason, message in VIEWER_MESSAGES.items()}


def request_json(row) -> dict:
    """A request row (selected with db.REQUEST_COLUMNS) as GET /requests/{id} shows it."""
    failure = None
    if row["failure_reason"]:
        failure = {
            "reason": row["failure_reason"],
            # Only the viewer-facing sentence: the operator detail stays in the logs.
            "message": row["error_message"]
            or _FALLBACK_MESSAGES.get(row["failure_reason"], _FALLBACK_MESSAGES["error"]),
        }
    images = []
    if row["image_url"]:
        images.append({"url": row["image_url"], "color": row["image_color"]})
    return {
        "id": str(row["id"]),
        "state": row["state"],
        "step": row["step"],
        "style": row["style"],
        "inputs": row["inputs"] if isinstance(row["inputs"], dict) else {},
        "prompt": row["prompt"],
        "viewer": {
            "twitch_user_id": row["twitch_user_id"],
            "twitch_display_name": row["twitch_display_name"] or "",
        },
        "created_at": iso(row["created_at"]),
        "finished_at": iso(row["finished_at"]),
        "images": images,
        "name": row["name"],
        "failure": failure,
        # What its OpenAI calls cost, by the price table (0 until one was answered).
        "cost_usd": float(row.get("cost_usd") or 0),
    }


def accepted_json(row) -> dict:
    """POST /requests' answer."""
    return {"id": str(row["id"]), "state": row["state"], "url": request_url(row["id"])}


def request_url(request_id: uuid.UUID) -> str:
    return f"/requests/{request_id}"


def cursor_after(row) -> str:
    """The opaque cursor for the page that follows `row`: its (created_at, id)."""
    micros = (row["created_at"] - _EPOCH) // _MICROSECOND
    return base64.urlsafe_b64encode(f"{micros}.{row['id']}".encode()).decode().rstrip("=")


def parse_before(value: str) -> uuid.UUID | tuple[datetime.datetime, uuid.UUID]:
    """A listing's `before`: a request id (the page starts after that request), an RFC 3339
    time (requests created strictly before it) or a `next` cursor, each as (created_at,
    id); a request id comes back as the UUID, for the caller to look up. Raises ValueError.
    """
    if len(value) in (32, 36):  # the two spellings of a UUID; a cursor is far longer
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    moment = _rfc3339(value)
    if moment is not None:
        # The nil UUID sorts first: (created_at, id) < (moment, nil) is created_at < moment.
        return moment, uuid.UUID(int=0)
    return parse_cursor(value)


def _rfc3339(value: str) -> datetime.datetime | None:
    """An RFC 3339 time (UTC if it names no offset), else None. A `+` left unencoded in a
    query string arrives as a space: read it back as the offset's sign."""
    if not value[:4].isdigit() or "-" not in value[:5]:
        return None
    for candidate in (value, _plus_offset(value)):
        try:
            moment = datetime.datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment
    return None


def _plus_offset(value: str) -> str:
    head, space, offset = value.rpartition(" ")
    if space and ":" in head and _OFFSET.fullmatch(offset):
        return f"{head}+{offset}"
    return value


def parse_cursor(cursor: str) -> tuple[datetime.datetime, uuid.UUID]:
    """(created_at, id) from a cursor; raises ValueError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        micros, request_id = raw.split(".")
        return _EPOCH + int(micros) * _MICROSECOND, uuid.UUID(request_id)
    except (binascii.Error, UnicodeError, ValueError, OverflowError) as exc:
        raise ValueError("not a cursor from this API") from exc
