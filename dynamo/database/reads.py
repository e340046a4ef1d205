"""The database port's queries for the HTTP API: listing requests page by page, and the
Idempotency-Key records. `dynamo.database.port.Database` delegates to these (its methods
`list_requests`, `find_idempotency_key`, `save_idempotency_key`, `request_body_sha256`),
so that the API reaches PostgreSQL only through the port and never writes SQL itself.

Each function takes the `Database` and runs through its `fetch*`/`execute`, which map the
driver's errors onto the port's own (`dynamo.database.errors`).
"""

from __future__ import annotations

import datetime
import uuid

# Columns a listing may be filtered on (equality), as the API names them.
_FILTER_COLUMNS = {"viewer_id": "twitch_user_id", "state": "state", "style": "style"}


async def list_requests(
    db,
    columns: str,
    *,
    viewer_id: str | None,
    state: str | None,
    style: str | None,
    before: tuple[datetime.datetime, uuid.UUID] | None,
    limit: int,
) -> list:
    """Requests newest first, after the cursor `before` (created_at, id), at most `limit`;
    `columns` is the select list of `r` (the port's REQUEST_COLUMNS)."""
    conditions: list[str] = []
    args: list = []
    for name, value in (("viewer_id", viewer_id), ("state", state), ("style", style)):
        if value is not None:
            args.append(value)
            conditions.append(f"r.{_FILTER_COLUMNS[name]} = ${len(args)}")
    if before is not None:
        args.extend(before)
        conditions.append(f"(r.created_at, r.id) < (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    sql = (
        f"select {columns} from dynamo.image_request r "
        + (f"where {' and '.join(conditions)} " if conditions else "")
        + f"order by r.created_at desc, r.id desc limit ${len(args)}"
    )
    return await db.fetch(sql, *args)


async def find_idempotency_key(db, caller: str, key: str):
    """The (body_sha256, image_request_id) row stored for this caller's key, or None."""
    return await db.fetchrow(
        "select body_sha256, image_request_id from dynamo.idempotency_key "
        "where caller = $1 and key = $2",
        caller,
        key,
    )


async def save_idempotency_key(
    db, caller: str, key: str, body_sha256: str, request_id: uuid.UUID
) -> None:
    await db.execute(
        "insert into dynamo.idempotency_key (caller, key, body_sha256, image_request_id) "
        "values ($1, $2, $3, $4) on conflict (caller, key) do nothing",
        caller,
        key,
        body_sha256,
        request_id,
    )


async def request_body_sha256(db, request_id: uuid.UUID) -> str | None:
    """The body digest stored with a request made under an Idempotency-Key."""
    return await db.fetchval(
        "select body_sha256 from dynamo.image_request where id = $1", request_id
    )
