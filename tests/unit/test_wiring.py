"""The service's graph as a table of child specs: its order, its channels, its restarts."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from dynamo import config, service
from dynamo.openai_port.catalogue import ModelsStatus
from dynamo.supervision.children import (
    Channels,
    ChannelSpec,
    ChildSpec,
    check_order,
    start_children,
)
from dynamo.supervision.supervisor import Supervisor
from tests.fakes.ports import FakeBroker, FakeGenerator, MemoryDatabase

# Every actor /status has shown since the graph was written by hand, in the same tiers.
PIPELINE_ACTORS = {"discord", "announcer", "ledger", "uploader", "generator", "model_watch",
                   "rate_limiter", "resume", "fleet"}
DOOR_ACTORS = ["intake", "http"]


def _tables(settings: config.Settings, *, offline: bool = False):
    generator = FakeGenerator()
    generator.offline = offline
    models = ModelsStatus(image_model="i", text_model="t", offline=offline)
    ports = service._Ports(MemoryDatabase(), FakeBroker(), None, generator, models)
    parts = service._parts(settings, ports)
    channels = Channels(service.channel_specs(settings))
    return (service.pipeline_children(settings, ports, parts),
            service.door_children(settings, ports, parts, channels), channels)


def test_the_tables_start_downstream_first_and_name_every_actor():
    settings = config.load({"DYNAMO_ADMIN_TOKEN": "t0ken", "DYNAMO_GENERATOR_WORKERS": "3"})
    pipeline, doors, channels = _tables(settings)
    specs = service.channel_specs(settings)
    check_order([*pipeline, *doors], specs)
    assert {child.name for child in pipeline} == PIPELINE_ACTORS
    assert [child.name for child in doors] == DOOR_ACTORS
    assert pipeline[0].name == "discord"  # the last stage's reader is started first
    readers = [name for child in pipeline for name in child.reads]
    assert sorted(readers) == sorted(specs)  # each channel has one reader, in the pipeline
    assert specs["generate"].capacity == 0  # handed over only to a free worker
    assert specs["permits"].capacity == 3 * service.PERMITS_CAPACITY_PER_WORKER
    assert set(channels.send) == set(specs)  # /status and /metrics show every channel
    offline, _, _ = _tables(settings, offline=True)
    assert {child.name for child in offline} == PIPELINE_ACTORS - {"model_watch"}


def test_a_sender_listed_before_its_reader_is_refused():
    async def actor(**_):
        pass

    specs = {"upload": ChannelSpec(4), "finalize": ChannelSpec(4, feedback=True)}
    reader = ChildSpec("uploader", actor, reads=("upload",), sends=("finalize",))
    sender = ChildSpec("generator", actor, sends=("upload",))
    failing = ChildSpec("ledger", actor, reads=("finalize",))
    check_order([reader, sender, failing], specs)  # finalize flows back: allowed
    with pytest.raises(ValueError, match="generator sends into 'upload' before its reader"):
        check_order([sender, reader, failing], specs)
    with pytest.raises(ValueError, match="no channel 'results'"):
        check_order([dataclasses.replace(sender, sends=("results",))], specs)
    with pytest.raises(ValueError, match="never sent into"):
        check_order([reader, failing], specs)


async def test_children_get_their_channel_ends_by_keyword(autojump_clock):
    got = {}

    async def limiter(*, jobs_recv, failures_send, task_status):
        got.update(jobs_recv=jobs_recv, failures_send=failures_send)
        task_status.started("ready")
        await trio.sleep_forever()

    channels = Channels({"schedule": ChannelSpec(4), "finalize": ChannelSpec(8)})
    child = ChildSpec("rate_limiter", limiter, reads=("schedule",), sends=("finalize",),
                      keywords={"schedule": "jobs", "finalize": "failures"})
    supervisor = Supervisor()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            assert await start_children(supervisor, nursery, [child], channels) == ["ready"]
            assert got == {"jobs_recv": channels.recv["schedule"],
                           "failures_send": channels.send["finalize"]}
            assert supervisor.actors["rate_limiter"].state == "running"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("restart, runs, state", [("transient", 1, "stopped"),
                                                  ("permanent", 3, "running")])
async def test_a_permanent_actor_that_returns_is_restarted(autojump_clock, restart, runs, state):
    count = 0

    async def returns_twice(task_status):
        nonlocal count
        count += 1
        task_status.started()
        if count < 3:
            return
        await trio.sleep_forever()

    supervisor = Supervisor()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await supervisor.start(nursery, "watch", returns_twice, restart=restart)
            await trio.sleep(10)
            assert (count, supervisor.actors["watch"].state) == (runs, state)
            nursery.cancel_scope.cancel()
