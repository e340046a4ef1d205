"""Child specs, after OTP: the graph declared as data, and the loop that starts it.

A `ChildSpec` names an actor, the function that starts it, the channels it reads and the
channels it sends into, and its restart policy. A `Channels` opens every channel of a
capacity table once; the graph owns them, so they keep their contents across an actor's
restart. `start_children` starts a table of specs in its order, each under the
supervisor, handing every child the ends of its channels by keyword (`<channel>_recv`,
`<channel>_send`, or the name the actor gives them in `keywords`).

The order of a table is its dependency order, downstream first: `check_order` refuses a
child that sends into a channel whose reader has not been started yet, except on a
feedback channel (one that flows upstream, such as failures back to the ledger), where
a cycle is the design.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import trio

from dynamo.supervision.supervisor import Restart, Supervisor


@dataclasses.dataclass(frozen=True)
class ChannelSpec:
    capacity: int
    feedback: bool = False  # flows upstream: its reader may start after its senders


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    name: str  # as shown on /status
    start: Callable[..., Awaitable[Any]]  # takes its channel ends and task_status by keyword
    reads: tuple[str, ...] = ()
    sends: tuple[str, ...] = ()
    restart: Restart = "transient"
    # channel -> the keyword's stem, where the actor names an end otherwise than the channel
    keywords: Mapping[str, str] = dataclasses.field(default_factory=dict)


class Channels:
    """Every channel of the graph, opened once from `{name: ChannelSpec}`."""

    def __init__(self, specs: Mapping[str, ChannelSpec]):
        self.specs = dict(specs)
        self.send: dict[str, trio.MemorySendChannel[Any]] = {}
        self.recv: dict[str, trio.MemoryReceiveChannel[Any]] = {}
        for name, spec in self.specs.items():
            self.send[name], self.recv[name] = trio.open_memory_channel[Any](spec.capacity)

    def ends_for(self, child: ChildSpec) -> dict[str, Any]:
        """The keyword arguments that hand `child` the ends of its channels."""
        ends: dict[str, Any] = {}
        for name in child.reads:
            ends[f"{child.keywords.get(name, name)}_recv"] = self.recv[name]
        for name in child.sends:
            ends[f"{child.keywords.get(name, name)}_send"] = self.send[name]
        return ends


def check_order(children: Iterable[ChildSpec], channels: Mapping[str, ChannelSpec]) -> None:
    """Raises ValueError unless each child's readers are started before it (downstream
    first), every channel is declared, and every channel read is also sent into."""
    started: set[str] = set()
    readers: dict[str, str] = {}
    senders: set[str] = set()
    children = list(children)
    for child in children:
        for name in (*child.reads, *child.sends):
            if name not in channels:
                raise ValueError(f"{child.name}: no channel {name!r}")
        for name in child.reads:
            readers[name] = child.name
    for child in children:
        for name in child.sends:
            senders.add(name)
            if not channels[name].feedback and readers.get(name) not in started:
                raise ValueError(
                    f"{child.name} sends into {name!r} before its reader "
                    f"{readers.get(name)} is started: list the reader first"
                )
        started.add(child.name)
    if unsent := set(readers) - senders:
        raise ValueError(f"channels read but never sent into: {sorted(unsent)}")


async def start_children(
    supervisor: Supervisor,
    nursery: trio.Nursery,
    children: Iterable[ChildSpec],
    channels: Channels,
) -> list[Any]:
    """Starts each child in order under `supervisor`; returns what each reported started."""
    started = []
    for child in children:
        start = functools.partial(child.start, **channels.ends_for(child))
        started.append(await supervisor.start(nursery, child.name, start, restart=child.restart))
    return started
