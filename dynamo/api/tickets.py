"""One-use tickets for the live event stream.

A browser's `EventSource` cannot send an Authorization header, and a bearer token must
never travel in a URL (it would land in logs and history). So the page trades its token
for a ticket (`POST /events/tickets`, with the header) and opens `GET /events?ticket=...`
with that: the ticket is random, good for `TICKET_TTL_S`, and good once. Only its
SHA-256 is kept, in this process's memory: a ticket is redeemed at the process that
issued it (the page talks to one address).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict

import trio

from dynamo.api.access import Caller

# Long enough for a page on a slow link to open the stream; short enough that a ticket
# seen by someone else is useless by then.
TICKET_TTL_S = 30
# Bounds memory however many tickets are asked for and never used.
MAX_OUTSTANDING = 10_000
TICKET_BYTES = 32


def _digest(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).digest()


class Tickets:
    def __init__(self) -> None:
        # sha256(ticket) -> (expires at, caller); oldest first
        self._outstanding: OrderedDict[bytes, tuple[float, Caller]] = OrderedDict()

    def issue(self, caller: Caller) -> str:
        now = trio.current_time()
        self._forget_expired(now)
        ticket = secrets.token_urlsafe(TICKET_BYTES)
        self._outstanding[_digest(ticket)] = (now + TICKET_TTL_S, caller)
        while len(self._outstanding) > MAX_OUTSTANDING:
            self._outstanding.popitem(last=False)
        return ticket

    def redeem(self, ticket: str | None) -> Caller | None:
        """The caller the ticket was issued to, once; None if unknown, used or expired."""
        if not ticket:
            return None
        entry = self._outstanding.pop(_digest(ticket), None)
        if entry is None or entry[0] <= trio.current_time():
            return None
        return entry[1]

    def _forget_expired(self, now: float) -> None:
        while self._outstanding:
            digest, (expires_at, _) = next(iter(self._outstanding.items()))
            if expires_at > now:
                return
            del self._outstanding[digest]
