"""The generator pool with today's OpenAI (issue 9): permits carry the expected tokens and
report the tokens used, every answered call is recorded with its cost, the daily budget
stops image buying, a reasoning model's empty or cut-off name is asked again and then
replaced by the subject's, and a learned parameter is retried at once."""

from __future__ import annotations

import trio

from dynamo.domain.jobs import Reason, Step, Style
from dynamo.limits.permits import CallKind
from dynamo.openai_port.client import NameAnswer, ParameterLearned
from tests.fakes.ports import FakeSpend, nothing_within
from tests.unit.test_actor_generator import (
    FRIEND_PROMPT,
    NAME_PROMPT,
    QUIET_S,
    TEST_TIMEOUT_S,
    VIEWER_ID,
    Generator,
)

IMAGE_USAGE = {"input_tokens": 40, "output_tokens": 439, "total_tokens": 479}


def generator_with_spend(**kwargs) -> Generator:
    actor = Generator(max_attempts=3, **kwargs)
    actor.spend = FakeSpend(actor.db)
    actor.openai.image_tokens = 503
    actor.openai.usage["image"] = IMAGE_USAGE
    return actor


async def test_tokens_go_with_permits_and_every_call_is_recorded(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        job = await actor.job(style="friend")
        async with actor.run():
            await actor.generate_send.send(job)
            await actor.upload_recv.receive()
        assert actor.permits.tokens == [(CallKind.TEXT, 0), (CallKind.TEXT, 0), (CallKind.IMAGE, 503)]
        [image_outcome] = [o for o in actor.permits.outcomes if o.kind is CallKind.IMAGE]
        assert image_outcome.succeeded and image_outcome.tokens_used == 479
        assert [(rid, kind, model) for rid, kind, model, _ in actor.spend.calls] == [
            (job.id, "moderation", "omni-moderation-latest"), (job.id, "name", "gpt-6-luna"),
            (job.id, "image", "gpt-image-2.6-flare")]
        assert actor.spend.calls[-1][3] == IMAGE_USAGE
        [order] = actor.openai.orders
        assert order.style is Style.FRIEND and order.prompt == FRIEND_PROMPT and order.user == VIEWER_ID
        assert order.prompt_without_background == FRIEND_PROMPT.split(", with a solid")[0]


async def test_budget_reached_fails_at_once_with_the_paused_sentence(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        actor.spend.reached = True
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert failed.failure.reason is Reason.ERROR
        assert failed.failure.message == "Image alerts are paused for today. No points were spent."
        assert failed.flow_id == "flow-1"  # refunded by the ledger from here
        assert actor.openai.calls == [] and actor.permits.requests == []
        assert actor.db.row(job.id)["error_message"] == failed.failure.message


async def test_budget_reached_while_screening_buys_no_image(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        job = await actor.job(style="friend")
        name = actor.openai.name

        async def name_then_budget_reached(prompt, *, attempt=0):
            answer = await name(prompt, attempt=attempt)
            actor.spend.reached = True  # another process spent the rest meanwhile
            return answer

        actor.openai.name = name_then_budget_reached
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert failed.failure.reason is Reason.ERROR and "paused for today" in failed.failure.message
        assert actor.openai.count("image") == 0
        assert actor.db.row(job.id)["step"] == "failing"  # never claimed: nothing paid for


async def test_an_empty_name_is_asked_again_with_more_room(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        actor.openai.script("name", NameAnswer("", complete=False), '"Sir Hatsworth"')
        job = await actor.job(style="friend")
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
        assert actor.openai.name_attempts == [0, 1]
        assert generated.name == "Sir Hatsworth"
        assert actor.db.answers[job.id] == {"prompt": NAME_PROMPT, "value": "Sir Hatsworth"}
        assert [kind for _, kind, _, _ in actor.spend.calls].count("name") == 2


async def test_no_usable_name_twice_names_the_friend_after_its_subject(autojump_clock, caplog):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        actor.openai.script("name", NameAnswer("", False), NameAnswer("Sir Ha", False))
        job = await actor.job(style="friend")
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
        assert generated.name == "Caterpillar in a Top Hat"  # never empty, never cut off
        assert actor.db.answers[job.id]["value"] == "Caterpillar in a Top Hat"
        assert any("named 'Caterpillar in a Top Hat' after its subject" in r.getMessage()
                   for r in caplog.records)


async def test_a_learned_parameter_is_retried_at_once(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend()
        actor.openai.script("image", ParameterLearned("400 unknown_parameter: Unknown parameter: 'style'."))
        job = await actor.job(step=Step.SCREENED)
        async with actor.run():
            started = trio.current_time()
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
            assert await nothing_within(actor.finalize_recv, QUIET_S) is None
        assert generated.step is Step.GENERATED
        assert actor.openai.count("image") == 2 and actor.permits.requests.count(CallKind.IMAGE) == 2
        assert trio.current_time() - started - QUIET_S < 1  # no backoff: the request changed
