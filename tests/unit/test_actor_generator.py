"""The generator pool alone: moderation, a friend's name and the image (contract §4), with
the OpenAI port faked and a tiny permit server in place of the rate limiter."""

import collections

import trio

from actors import generator
from dynamo.domain.jobs import Reason, Step, Style
from dynamo.limits.permits import CallKind, CallOutcome, Permit, PermitRequest
from dynamo.openai_port.client import Answer, GeneratedImage
from dynamo.openai_port.rate_headers import parse_ratelimit_headers
from tests.fakes.ports import (
    FakeGenerator,
    channel,
    nothing_within,
    openai_error,
    solid_png,
)
from tests.support.actor import ActorHarness
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S

QUIET_S = 60
MAX_ATTEMPTS = 3

GHOST_PROMPT = "a ghostly image of a seal, with glitchy VHS artifacts, dark background"
FRIEND_PROMPT = (
    "a yellow caterpillar in a top hat, illustrated in the style of 1990s digital clip art"
    " images, with a limited 256-color palette and sharp black outlines, with a solid indigo"
    " background suitable for chroma keying"
)
NAME_PROMPT = (
    "Please come up with a name for a friendly mascot character who is caterpillar in a"
    " top hat. Please answer with a single name, and no additional text."
)
VIEWER_ID = "90790024"
IMAGE = solid_png((12, 10, 18), figure=(220, 225, 235))


class PermitServer:
    """Stands in for the rate limiter: answers each PermitRequest at once with a Permit and
    records every CallOutcome. Like the real limiter's circuit, it withholds permits after
    an `auth_failed` outcome, until the test `release()`s them (as probe permits)."""

    def __init__(self):
        self.requests: list[CallKind] = []
        self.tokens: list[tuple[CallKind, int]] = []  # each request's expected tokens
        self.outcomes: list[CallOutcome] = []
        self.withholding = False
        self.held: collections.deque[PermitRequest] = collections.deque()
        self._changed = trio.Event()

    async def serve(self, permits_recv, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        async for message in permits_recv:
            if isinstance(message, PermitRequest):
                self.requests.append(message.kind)
                self.tokens.append((message.kind, message.tokens))
                if self.withholding:
                    self.held.append(message)
                else:
                    self._grant(message, Permit())
            else:
                assert isinstance(message, CallOutcome), message
                self.outcomes.append(message)
                if message.auth_failed:
                    self.withholding = True
            self._changed.set()
            self._changed = trio.Event()

    def release(self):
        self.withholding = False
        while self.held:
            self._grant(self.held.popleft(), Permit(probe=True))

    @staticmethod
    def _grant(request: PermitRequest, permit: Permit):
        try:
            request.reply_send.send_nowait(permit)
        except trio.BrokenResourceError:
            pass  # the caller stopped waiting

    async def wait_until(self, predicate):
        while not predicate():
            await self._changed.wait()


class Generator(ActorHarness):
    """The generator actor, its fakes and the permit server, run for the block."""

    CHANNELS = ("generate", "upload", "finalize")
    JOB_ROW = {"step": Step.RESERVED, "flow_id": "flow-1"}

    def __init__(self, *, request_timeout_s: float = 900.0, moderation: bool = True,
                 workers: int = 2, max_attempts: int = MAX_ATTEMPTS):
        super().__init__(request_timeout_s=request_timeout_s)
        self.max_attempts = max_attempts
        self.openai = FakeGenerator(image=IMAGE)
        self.permits = PermitServer()
        self.permits_send, self.permits_recv = channel(0)  # as the service's
        self.moderation = moderation
        self.workers = workers
        self.spend = None  # the spend port, where a test gives one

    def run(self):
        return self.running_behind_permits(
            generator.run, generator=self.openai, generate_recv=self.generate_recv,
            permits_send=self.permits_send, upload_send=self.upload_send,
            finalize_send=self.finalize_send, workers=self.workers,
            max_attempts=self.max_attempts, moderation=self.moderation, spend=self.spend)


def outcome_kinds(outcomes):
    return [(o.kind, o.succeeded, o.rate_limited, o.auth_failed, o.probe) for o in outcomes]


# -- the way through --------------------------------------------------------------------


async def test_ghost_is_moderated_then_generated_and_saved(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
            assert await nothing_within(actor.finalize_recv, QUIET_S) is None
        assert generated.id == job.id and generated.step is Step.GENERATED
        assert actor.openai.calls == [("moderate", "a seal"), ("image", (GHOST_PROMPT, VIEWER_ID))]
        assert actor.db.generated[job.id] == IMAGE  # the raw bytes, as the API gave them
        row = actor.db.row(job.id)
        assert (row["step"], row["failure_reason"], row["name"]) == ("generated", None, None)
        # Persisted in order: screened, then claimed (no longer cancellable), then generated.
        assert [(old, new) for _, old, new, moved in actor.db.advances if moved] == [
            (Step.RESERVED, Step.SCREENED), (Step.SCREENED, Step.GENERATING)]
        # Each call under a permit, each success reported with the answer's headers.
        assert actor.permits.requests == [CallKind.TEXT, CallKind.IMAGE]
        assert outcome_kinds(actor.permits.outcomes) == [
            (CallKind.TEXT, True, False, False, False), (CallKind.IMAGE, True, False, False, False)]
        # The port parses the answer's x-ratelimit-* headers for the rate limiter.
        shown = parse_ratelimit_headers(actor.openai.headers)
        assert shown.remaining == 99
        assert all(o.limits == shown for o in actor.permits.outcomes)


async def test_friend_gets_a_name_saved_then_its_image(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        actor.openai.script("name", '  "Sir Hatsworth"\n')
        job = await actor.job(style="friend")
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
        assert actor.openai.calls == [
            ("moderate", "caterpillar in a top hat"),
            ("name", NAME_PROMPT),
            ("image", (FRIEND_PROMPT, VIEWER_ID)),
        ]
        assert actor.db.answers[job.id] == {"prompt": NAME_PROMPT, "value": "Sir Hatsworth"}
        assert generated.name == "Sir Hatsworth" and generated.style is Style.FRIEND
        row = actor.db.row(job.id)
        assert (row["step"], row["name"]) == ("generated", "Sir Hatsworth")
        assert actor.permits.requests == [CallKind.TEXT, CallKind.TEXT, CallKind.IMAGE]


async def test_the_stored_prompt_is_the_one_the_image_was_asked_with(autojump_clock):
    """Asked transparent, the friend's prompt has no chroma-key clause: the request's
    prompt (dynamo.image_request.prompt, GET /requests/{id}) says so too."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        asked = FRIEND_PROMPT.split(", with a solid")[0]
        actor.openai.script("image", GeneratedImage(IMAGE, transparent=True, prompt=asked))
        job = await actor.job(style="friend")
        assert actor.db.row(job.id)["prompt"] == FRIEND_PROMPT
        async with actor.run():
            await actor.generate_send.send(job)
            await actor.upload_recv.receive()
        assert actor.db.row(job.id)["prompt"] == asked


async def test_moderation_off_goes_straight_to_the_image(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator(moderation=False)
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            await actor.upload_recv.receive()
        assert actor.openai.calls == [("image", (GHOST_PROMPT, VIEWER_ID))]


# -- refusals and failures --------------------------------------------------------------


async def test_flagged_subject_is_rejected_without_an_image_call(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        actor.openai.script("moderate", True)
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
            assert await nothing_within(actor.upload_recv, QUIET_S) is None
        assert failed.failure.reason is Reason.REJECTED and failed.step is Step.FAILING
        assert failed.flow_id == "flow-1"  # kept, so that the ledger refunds it
        assert actor.openai.count("image") == 0
        row = actor.db.row(job.id)
        assert (row["step"], row["failure_reason"]) == ("failing", "rejected")
        assert row["error_message"] == (
            "Your image request was rejected by the content filter. No points were spent.")
        assert actor.db.generated == {}


async def test_content_policy_400_is_rejected(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        actor.openai.script("image", openai_error(
            400, "Your request was rejected as a result of our safety system.",
            code="content_policy_violation", type="invalid_request_error"))
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert failed.failure.reason is Reason.REJECTED
        assert actor.openai.count("image") == 1  # never retried
        assert actor.db.row(job.id)["failure_reason"] == "rejected"


async def test_image_400_invalid_request_is_rejected_as_the_original_did(autojump_clock):
    """Contract §4: an image API 400 with type invalid_request_error means rejected, even
    when its message does not name the content policy."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        actor.openai.script("image", openai_error(
            400, "This request has been blocked.", type="invalid_request_error"))
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert failed.failure.reason is Reason.REJECTED
        assert actor.openai.count("image") == 1


async def test_server_error_then_success_is_retried(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        actor.openai.script("image", openai_error(500, "The server had an error"))
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
        assert generated.step is Step.GENERATED
        assert actor.openai.count("image") == 2
        assert actor.permits.requests.count(CallKind.IMAGE) == 2  # a permit for each attempt
        assert actor.db.generated[job.id] == IMAGE


async def test_rate_limited_answer_is_reported_and_retried(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        actor.openai.script("image", openai_error(
            429, "Rate limit reached", code="rate_limit_exceeded",
            headers={"retry-after": "20", "x-ratelimit-limit-requests": "7"}))
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            started = trio.current_time()
            await actor.upload_recv.receive()
        assert trio.current_time() - started >= 20  # the server's retry-after is honoured
        [limited] = [o for o in actor.permits.outcomes if o.rate_limited]
        assert limited.kind is CallKind.IMAGE and limited.retry_after_s == 20
        assert limited.limits.limit == 7  # parsed at the port
        assert actor.openai.count("image") == 2


async def test_server_errors_every_time_fail_after_max_attempts(autojump_clock):
    # Contract §1: DYNAMO_MAX_ATTEMPTS counts every attempt at the step, an outage's too.
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        actor.openai.always("image", lambda: openai_error(500, "The server had an error"))
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
            assert await nothing_within(actor.upload_recv, QUIET_S) is None
        assert failed.failure.reason is Reason.ERROR and failed.step is Step.FAILING
        assert actor.openai.count("image") == MAX_ATTEMPTS
        row = actor.db.row(job.id)
        assert (row["step"], row["failure_reason"]) == ("failing", "error")
        assert "attempts" in row["failure_detail"]


async def test_an_outage_of_the_image_api_is_waited_out_within_the_attempts(autojump_clock):
    # 503 for 15 s, then the API is back: the outage backoff (2 s doubling, equal jitter)
    # spans it with the default six attempts, so the image is bought.
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator(max_attempts=6)
        back_at = trio.current_time() + 15
        answers = []
        image = actor.openai.defaults["image"]

        def image_api():
            if trio.current_time() < back_at:
                answers.append(503)
                return openai_error(503, "Service Unavailable")
            return image

        actor.openai.always("image", image_api)
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
        assert generated.step is Step.GENERATED and generated.failure is None
        assert 2 <= len(answers) < 6


async def test_failures_that_are_not_an_outage_fail_after_max_attempts(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        actor.openai.always("image", lambda: openai_error(409, "Conflict"))
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert failed.failure.reason is Reason.ERROR and failed.step is Step.FAILING
        assert actor.openai.count("image") == MAX_ATTEMPTS
        assert "attempts" in actor.db.row(job.id)["failure_detail"]


# -- resuming ---------------------------------------------------------------------------


async def test_resumed_at_screened_skips_moderation(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        job = await actor.job(step=Step.SCREENED)
        async with actor.run():
            await actor.generate_send.send(job)
            await actor.upload_recv.receive()
        assert actor.openai.calls == [("image", (GHOST_PROMPT, VIEWER_ID))]
        assert actor.db.row(job.id)["step"] == "generated"


async def test_resumed_friend_at_screened_keeps_its_stored_name(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        request_id = actor.db.add_request(style="friend", step=Step.SCREENED, flow_id="flow-1")
        actor.db.answers[request_id] = {"prompt": NAME_PROMPT, "value": "Lady Inchworm"}
        job = await actor.pipeline.job(request_id)
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
        assert actor.openai.calls == [("image", (FRIEND_PROMPT, VIEWER_ID))]
        assert generated.name == "Lady Inchworm"


async def test_resumed_at_generating_generates_again(autojump_clock):
    """Interrupted during the image call: its answer was lost, so it is asked again."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        job = await actor.job(step=Step.GENERATING)
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
        assert actor.openai.calls == [("image", (GHOST_PROMPT, VIEWER_ID))]
        assert generated.step is Step.GENERATED
        assert actor.db.row(job.id)["step"] == "generated"
        assert actor.db.generated[job.id] == IMAGE


async def test_request_cancelled_before_generating_is_dropped_without_an_image(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        job = await actor.job(step=Step.SCREENED)
        # Cancelled by the broadcaster after the job was queued for a worker.
        assert await actor.db.advance(job.id, [Step.SCREENED], Step.FAILING,
                                      failure_reason="cancelled")
        async with actor.run():
            await actor.generate_send.send(job)
            assert await nothing_within(actor.upload_recv, QUIET_S) is None
            assert await nothing_within(actor.finalize_recv, 0) is None
        assert actor.openai.count("image") == 0
        assert actor.db.row(job.id)["failure_reason"] == "cancelled"


# -- time -------------------------------------------------------------------------------


async def test_deadline_passing_during_the_image_call_expires_the_request(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator(request_timeout_s=300)

        async def never_answers():
            await trio.sleep_forever()

        actor.openai.image = lambda order: never_answers()
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
            failed_at = trio.current_time()
        assert job.deadline <= failed_at < job.deadline + 1
        assert failed.failure.reason is Reason.EXPIRED
        row = actor.db.row(job.id)
        assert (row["step"], row["failure_reason"]) == ("failing", "expired")


async def test_deadline_passing_while_waiting_for_a_permit_expires_the_request(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator(request_timeout_s=300)
        actor.permits.withholding = True  # the limiter has no permit for it in time
        job = await actor.job()
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert trio.current_time() >= job.deadline
        assert failed.failure.reason is Reason.EXPIRED
        assert actor.openai.calls == []


async def test_server_errors_until_the_deadline_expire_the_request(autojump_clock):
    """Retries that run out of time (not of attempts) are the request's timeout: expired."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator(request_timeout_s=120)
        actor.openai.always("image", lambda: openai_error(
            503, "overloaded", headers={"retry-after": "70"}))
        job = await actor.job(step=Step.SCREENED)
        async with actor.run():
            await actor.generate_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert actor.openai.count("image") < MAX_ATTEMPTS  # time, not attempts, ran out
        assert failed.failure.reason is Reason.EXPIRED


async def test_refused_api_key_pauses_the_request_instead_of_failing_it(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        actor.openai.script("image", openai_error(401, "Incorrect API key provided",
                                                  code="invalid_api_key",
                                                  type="invalid_request_error"))
        job = await actor.job(step=Step.SCREENED)
        async with actor.run():
            await actor.generate_send.send(job)
            await actor.permits.wait_until(lambda: actor.permits.held)
            # The permit server holds the next permit back, as the open circuit does.
            assert await nothing_within(actor.finalize_recv, 600) is None
            assert await nothing_within(actor.upload_recv, 0) is None
            row = actor.db.row(job.id)
            assert (row["step"], row["failure_reason"]) == ("generating", None)
            assert actor.openai.count("image") == 1
            actor.permits.release()
            generated = await actor.upload_recv.receive()
        assert generated.step is Step.GENERATED and generated.failure is None
        assert actor.openai.count("image") == 2
        assert outcome_kinds(actor.permits.outcomes) == [
            (CallKind.IMAGE, False, False, True, False),  # auth_failed reported
            (CallKind.IMAGE, True, False, False, True),  # the probe got through
        ]
        assert actor.db.row(job.id)["step"] == "generated"


async def test_workers_generate_side_by_side(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator(workers=2)
        in_call = 0
        most_in_call = 0

        async def slow_image(order):
            nonlocal in_call, most_in_call
            in_call += 1
            most_in_call = max(most_in_call, in_call)
            await trio.sleep(30)
            in_call -= 1
            return Answer(GeneratedImage(IMAGE, transparent=False), {})

        actor.openai.image = slow_image
        jobs = [await actor.job(step=Step.SCREENED) for _ in range(2)]
        async with actor.run():
            started = trio.current_time()
            for job in jobs:
                await actor.generate_send.send(job)
            done = {(await actor.upload_recv.receive()).id for _ in jobs}
        assert done == {job.id for job in jobs}
        assert most_in_call == 2 and trio.current_time() - started < 60
