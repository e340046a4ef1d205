"""Per viewer, debits being made and lost debits being looked for take turns.

A request resumed at `reserving` looks for the debit the ledger made for it before a
crash: a pending image-alert debit of its viewer that no request knows. A debit another
request of the same viewer is making right now (asked for, its id not stored yet) looks
exactly like that. So, per viewer, a lookup waits until no debit is being made here, and
new debits wait while a lookup is waiting or running; debits themselves go on side by
side. (Across processes of a fleet the window stays open; the money is right either way,
only the ledger's imageRequestId of the two debits may be swapped.)
"""

from __future__ import annotations

import contextlib
import dataclasses

import trio


@dataclasses.dataclass
class _Turns:
    changed: trio.Condition = dataclasses.field(default_factory=trio.Condition)
    making: int = 0  # debits being made
    looking: bool = False  # a lookup running
    waiting: int = 0  # lookups waiting for their turn
    users: int = 0  # tasks holding or waiting: the entry goes when none is left


class ViewerGate:
    def __init__(self) -> None:
        self._viewers: dict[str, _Turns] = {}

    @contextlib.asynccontextmanager
    async def making_debit(self, viewer_id: str):
        """Held from asking the ledger for a debit until its id is stored."""
        async with self._turns(viewer_id) as turns:
            async with turns.changed:
                while turns.looking or turns.waiting:
                    await turns.changed.wait()
                turns.making += 1
            try:
                yield
            finally:
                with trio.CancelScope(shield=True):
                    async with turns.changed:
                        turns.making -= 1
                        turns.changed.notify_all()

    @contextlib.asynccontextmanager
    async def looking_for_lost_debit(self, viewer_id: str):
        """Held while the viewer's history is read and a debit found there adopted."""
        async with self._turns(viewer_id) as turns:
            async with turns.changed:
                turns.waiting += 1
                try:
                    while turns.looking or turns.making:
                        await turns.changed.wait()
                finally:
                    turns.waiting -= 1
                    turns.changed.notify_all()  # a cancelled lookup lets debits go on
                turns.looking = True
            try:
                yield
            finally:
                with trio.CancelScope(shield=True):
                    async with turns.changed:
                        turns.looking = False
                        turns.changed.notify_all()

    @contextlib.asynccontextmanager
    async def _turns(self, viewer_id: str):
        turns = self._viewers.setdefault(viewer_id, _Turns())
        turns.users += 1
        try:
            yield turns
        finally:
            turns.users -= 1
            if not turns.users:
                del self._viewers[viewer_id]
