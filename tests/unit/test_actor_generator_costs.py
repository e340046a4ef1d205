"""The generator's costs go with its step writes (issue 18): the moderation's (and a
friend's name's) with RESERVED → SCREENED, the image's with GENERATING → GENERATED, in
the same statement, written even when the step does not move, and once when a write is
tried again after a lost COMMIT. A cost that no step write follows is written by itself
before the request fails, or as the job goes down."""

from __future__ import annotations

import trio

from dynamo.domain.jobs import Reason, Step
from dynamo.supervision import retry
from tests.fakes.ports import nothing_within
from tests.unit.test_actor_generator import QUIET_S, TEST_TIMEOUT_S, Generator
from tests.unit.test_actor_generator_openai import generator_with_spend
from tests.unit.test_outage_units import flaky


def writes_spied(actor: Generator) -> list[tuple[str, Step | None, list[str]]]:
    """Each step write the generator makes, with the kinds of the costs it carries."""
    writes: list[tuple[str, Step | None, list[str]]] = []
    advance, save_generated = actor.db.advance, actor.db.save_generated

    async def advance_spy(request_id, from_steps, to_step, *, costs=(), **fields):
        writes.append(("advance", to_step, [cost.kind for cost in costs]))
        return await advance(request_id, from_steps, to_step, costs=costs, **fields)

    async def save_generated_spy(request_id, data, prompt=None, *, costs=()):
        writes.append(("save_generated", Step.GENERATED, [cost.kind for cost in costs]))
        return await save_generated(request_id, data, prompt, costs=costs)

    actor.db.advance = advance_spy
    actor.db.save_generated = save_generated_spy
    return writes


def stored_kinds(actor: Generator) -> list[str]:
    return [call["kind"] for call in actor.db.openai_calls]


def counted_kinds(actor: Generator) -> list[str]:
    return [kind for _, kind, _, _ in actor.spend.calls]


async def test_a_ghost_s_costs_go_with_its_step_writes(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        writes = writes_spied(actor)
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            await actor.upload_recv.receive()
        assert writes == [("advance", Step.SCREENED, ["moderation"]),
                          ("advance", Step.GENERATING, []),
                          ("save_generated", Step.GENERATED, ["image"])]
        assert actor.spend.alone == []  # no statement of their own
        assert stored_kinds(actor) == counted_kinds(actor) == ["moderation", "image"]


async def test_a_friend_s_moderation_and_names_go_with_screened(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        actor.openai.script("name", "", "Sir Hatsworth")  # asked twice
        writes = writes_spied(actor)
        job = await actor.job(style="friend")
        async with actor.run():
            await actor.generate_send.send(job)
            await actor.upload_recv.receive()
        assert writes[0] == ("advance", Step.SCREENED, ["moderation", "name", "name"])
        assert writes[-1] == ("save_generated", Step.GENERATED, ["image"])
        assert actor.spend.alone == []
        assert stored_kinds(actor) == ["moderation", "name", "name", "image"]


async def test_the_image_cost_is_written_when_the_request_moved_on_meanwhile(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        job = await actor.job(step=Step.SCREENED)
        bought = actor.openai.image

        async def image_then_moved_on(order):
            answer = await bought(order)
            actor.db.requests[job.id]["step"] = Step.FAILING.value  # by another process
            return answer

        actor.openai.image = image_then_moved_on
        async with actor.run():
            await actor.generate_send.send(job)
            assert await nothing_within(actor.upload_recv, QUIET_S) is None
        assert job.id not in actor.db.generated  # not kept: the request is not at generating
        assert stored_kinds(actor) == counted_kinds(actor) == ["image"]


async def test_a_flagged_subject_s_cost_is_written_by_itself(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        actor.openai.always("moderate", True)
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert failed.failure.reason is Reason.REJECTED
        assert [cost.kind for cost in actor.spend.alone] == ["moderation"]
        assert stored_kinds(actor) == counted_kinds(actor) == ["moderation"]


async def test_costs_before_a_failed_name_are_written_by_themselves(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        actor.openai.script("name", "", retry.Permanent("HTTP 400: bad request"))
        job = await actor.job(style="friend")
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert failed.failure.reason is Reason.ERROR and actor.db.row(job.id)["step"] == "failing"
        assert [cost.kind for cost in actor.spend.alone] == ["moderation", "name"]
        assert stored_kinds(actor) == counted_kinds(actor) == ["moderation", "name"]


async def test_costs_are_written_when_the_job_goes_down_while_asking_a_name(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        asked = trio.Event()

        async def name_never_answered(prompt, *, attempt=0):
            asked.set()
            await trio.sleep_forever()

        actor.openai.name = name_never_answered
        job = await actor.job(style="friend")
        async with actor.run():
            await actor.generate_send.send(job)
            await asked.wait()
        # Shut down (the block's end cancels the actor): the moderation was paid for.
        assert stored_kinds(actor) == counted_kinds(actor) == ["moderation"]
        assert actor.db.row(job.id)["step"] == "reserved"


async def test_a_cost_is_written_once_when_its_step_write_lost_its_commit_answer(
        autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        db = flaky(actor)
        db.lose_commit_answer("advance")  # RESERVED → SCREENED, with the moderation's cost
        db.lose_commit_answer("save_generated")  # with the image's
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
        assert generated.step is Step.GENERATED
        assert actor.openai.count("moderate") == 1 and actor.openai.count("image") == 1
        assert stored_kinds(actor) == counted_kinds(actor) == ["moderation", "image"]
