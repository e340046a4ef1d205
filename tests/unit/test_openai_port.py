"""The OpenAI port (`dynamo.openai_port.client`) and its error contract, with the real SDK.

The classification of real SDK exceptions (built by an AsyncOpenAI client whose transport
answers), then the port against the fake OpenAI of tests/fakes: what it asks each model
family for, how it learns a refused parameter once per model, and how a reasoning model's
room for a name grows. Every error that leaves the port is one of the service's classes.
"""

import io
import logging

import httpx2
import openai
import pytest
import trio
from PIL import Image

from dynamo.domain import prompts
from dynamo.domain.jobs import Style
from dynamo.images import processing as imaging
from dynamo.openai_port.client import ModelNotFound, OpenAIGenerator, ParameterLearned
from dynamo.openai_port.dialect import ImageOrder
from dynamo.openai_port.errors import classify_openai
from dynamo.supervision.retry import AuthFailure, CallError, ContentRejected, Permanent, Transient
from tests.fakes.openai_catalogue import ImageFamily, TextFamily
from tests.support.timeouts import PORT_S as TEST_TIMEOUT_S

VIEWER_ID = "90790024"
GHOST = ImageOrder(Style.GHOST, prompts.ghost_prompt("a seal"), VIEWER_ID)
FRIEND = ImageOrder(
    Style.FRIEND,
    prompts.friend_prompt("yellow", "caterpillar in a top hat"),
    VIEWER_ID,
    prompts.friend_prompt("yellow", "caterpillar in a top hat", chroma_key=False),
)
NAME_PROMPT = prompts.name_prompt("a caterpillar in a top hat")


# Real SDK exceptions: an AsyncOpenAI client (SDK retries off) whose transport answers.

async def sdk_error(status=None, body=None, headers=None, raises=None, image=True):
    def answer(request):
        if raises is not None:
            raise raises
        return httpx2.Response(status, headers=headers or {}, json=body)

    client = openai.AsyncOpenAI(api_key="sk-test", max_retries=0,
                                http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)))
    try:
        if image:
            await client.images.generate(prompt="a seal", model="gpt-image-2.6-flare")
        else:
            await client.moderations.create(input="a seal")
    except openai.OpenAIError as exc:
        return exc
    raise AssertionError("the SDK did not raise")


def error_body(message, type_="invalid_request_error", code=None):
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def test_classify_rate_limit_with_retry_after():
    exc = await sdk_error(429, error_body("Rate limit reached", "requests", "rate_limit_exceeded"),
                          {"retry-after-ms": "1500", "x-ratelimit-limit-requests": "5"})
    assert isinstance(exc, openai.RateLimitError)
    classified = classify_openai(exc)
    assert isinstance(classified, Transient)
    assert classified.retry_after_s == 1.5
    assert classified.rate_limited
    assert classified.headers["x-ratelimit-limit-requests"] == "5"


async def test_classify_exhausted_quota_is_permanent():
    exc = await sdk_error(429, error_body("You exceeded your current quota", "insufficient_quota",
                                          "insufficient_quota"))
    assert isinstance(classify_openai(exc), Permanent)


async def test_classify_content_policy():
    exc = await sdk_error(400, error_body("Your request was rejected as a result of our safety "
                                          "system.", code="content_policy_violation"))
    assert isinstance(exc, openai.BadRequestError)
    assert isinstance(classify_openai(exc), ContentRejected)
    # Older answers: no code, the safety system named in the message.
    exc = await sdk_error(400, error_body("Your request was rejected as a result of our safety "
                                          "system. Your prompt may contain text that is not allowed."))
    assert isinstance(classify_openai(exc), ContentRejected)


async def test_classify_other_bad_requests():
    exc = await sdk_error(400, error_body("Invalid size", code="invalid_size"))
    assert isinstance(classify_openai(exc), Permanent)
    # The original service treated every invalid_request_error of the image API as rejected.
    assert isinstance(classify_openai(exc, image_call=True), ContentRejected)


@pytest.mark.parametrize("status, sdk_type, expected", [
    (401, openai.AuthenticationError, AuthFailure),
    (403, openai.PermissionDeniedError, AuthFailure),
    (404, openai.NotFoundError, Permanent),
    (408, openai.APIStatusError, Transient),
    (409, openai.ConflictError, Transient),
    (422, openai.UnprocessableEntityError, Permanent),
    (500, openai.InternalServerError, Transient),
    (503, openai.InternalServerError, Transient),
])
async def test_classify_status_errors(status, sdk_type, expected):
    exc = await sdk_error(status, error_body("nope", "server_error"), image=False)
    assert type(exc) is sdk_type
    classified = classify_openai(exc)
    assert type(classified) is expected
    assert classified.status_code == status


async def test_classify_connection_errors_and_timeouts():
    exc = await sdk_error(raises=httpx2.ConnectError("refused"))
    assert type(exc) is openai.APIConnectionError
    assert isinstance(classify_openai(exc), Transient)
    exc = await sdk_error(raises=httpx2.ReadTimeout("slow"))
    assert type(exc) is openai.APITimeoutError
    assert isinstance(classify_openai(exc), Transient)


def test_classify_anything_else_is_permanent():
    assert isinstance(classify_openai(ValueError("bug")), Permanent)
    already = Transient("x")
    assert classify_openai(already) is already


# ---- the port against the fake OpenAI -------------------------------------------------


def port(fake, *, image_model="gpt-image-2.6-flare", text_model="gpt-6-luna", quality="medium"):
    return OpenAIGenerator(api_key=fake.api_key, base_url=f"{fake.url}/v1",
                           image_model=image_model, text_model=text_model, image_quality=quality)


async def test_ghost_is_asked_as_a_jpeg_at_80_and_comes_as_one(fake_openai):
    with trio.fail_after(TEST_TIMEOUT_S):
        generator = port(fake_openai)
        answer = await generator.image(GHOST)
        await generator.aclose()
    [call] = fake_openai.calls_to("images")
    assert call.body == {"model": "gpt-image-2.6-flare", "prompt": GHOST.prompt, "n": 1,
                         "size": "1024x1024", "user": VIEWER_ID, "quality": "medium",
                         "output_format": "jpeg", "output_compression": 80}
    header = imaging.sniff(answer.value.data)
    assert (header.format, header.width, header.height) == ("JPEG", 1024, 1024)
    assert answer.value.transparent is False
    assert answer.model == "gpt-image-2.6-flare"
    assert answer.usage == fake_openai.image_usage(call.body)
    assert answer.usage["output_tokens"] == 439  # gpt-image-2.x, medium, 1024x1024
    assert answer.tokens_used == answer.usage["total_tokens"]


async def test_friend_is_asked_transparent_without_the_chroma_clause(fake_openai):
    with trio.fail_after(TEST_TIMEOUT_S):
        generator = port(fake_openai)
        answer = await generator.image(FRIEND)
        await generator.aclose()
    [call] = fake_openai.calls_to("images")
    assert call.body["background"] == "transparent" and call.body["output_format"] == "webp"
    assert call.body["prompt"] == FRIEND.prompt_without_background
    assert "chroma" not in call.body["prompt"] and "background" not in call.body["prompt"]
    assert "response_format" not in call.body and "style" not in call.body
    image = Image.open(io.BytesIO(answer.value.data))
    assert image.format == "WEBP" and image.mode == "RGBA"
    assert image.getpixel((2, 2))[3] == 0 and image.getpixel((512, 512))[3] == 255
    assert answer.value.transparent is True
    assert answer.value.prompt == call.body["prompt"]  # what the request will store


async def test_a_refused_transparency_is_learned_once_and_the_friend_keyed_instead(fake_openai, caplog):
    # A newer model dynamo has never heard of: asked as a GPT image model that does
    # transparency, which this one refuses (400 unsupported_value, param background).
    fake_openai.add_model("gpt-image-3")
    fake_openai.image_families["gpt-image-3"] = ImageFamily(transparency=False)
    with trio.fail_after(TEST_TIMEOUT_S), caplog.at_level(logging.WARNING):
        generator = port(fake_openai, image_model="gpt-image-3")
        with pytest.raises(ParameterLearned) as learned:
            await generator.image(FRIEND)
        retried = await generator.image(FRIEND)
        again = await generator.image(FRIEND)
        await generator.aclose()
    assert isinstance(learned.value, Transient) and learned.value.retry_after_s == 0
    assert "Transparent background is not supported" in str(learned.value)
    first, second, third = (call.body for call in fake_openai.calls_to("images"))
    assert first["background"] == "transparent"
    for body in (second, third):  # the chroma-key prompt, PNG, no background parameter
        assert "background" not in body and "output_format" not in body
        assert body["prompt"] == FRIEND.prompt
    assert fake_openai.statuses("images") == [400, 200, 200]
    assert imaging.sniff(retried.value.data).format == "PNG" and not retried.value.transparent
    assert again.value.transparent is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "background=transparent" in warnings[0]
    assert "gpt-image-3" in warnings[0]


async def test_response_format_refused_by_a_gpt_image_model_is_learned_for_that_model(fake_openai, caplog):
    # dynamo asks a dall-e-* model with response_format; this one is a GPT image model.
    fake_openai.add_model("dall-e-4")
    fake_openai.image_families["dall-e-4"] = ImageFamily(transparency=True)
    with trio.fail_after(TEST_TIMEOUT_S), caplog.at_level(logging.WARNING):
        generator = port(fake_openai, image_model="dall-e-4")
        with pytest.raises(ParameterLearned):
            await generator.image(GHOST)
        await generator.image(GHOST)
        await generator.aclose()
    refused, accepted = fake_openai.calls_to("images")
    assert refused.body["response_format"] == "b64_json" and refused.status == 400
    assert "response_format" not in accepted.body and accepted.status == 200
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "response_format" in warning and "unknown_parameter" in warning


async def test_a_shut_down_or_unknown_model_is_model_not_found(fake_openai):
    with trio.fail_after(TEST_TIMEOUT_S):
        generator = port(fake_openai, image_model="dall-e-3")
        with pytest.raises(ModelNotFound) as not_found:
            await generator.model_info("dall-e-3")
        with pytest.raises(Permanent):
            await generator.image(GHOST)  # the image call itself: 404 model_not_found
        info = await generator.model_info("gpt-4o-mini")
        live = await generator.model_info("gpt-image-2.6-flare")
        await generator.aclose()
    assert str(not_found.value) == ("404 model_not_found: The model `dall-e-3` does not exist "
                                    "or you do not have access to it.")
    assert (info.id, info.shutdown_date) == ("gpt-4o-mini", "2027-01-14")
    assert live.shutdown_date is None


async def test_reasoning_model_gets_max_completion_tokens_and_more_room_when_cut_off(fake_openai):
    fake_openai.reasoning_tokens = 1000  # more than the first room (256), less than 4096
    with trio.fail_after(TEST_TIMEOUT_S):
        generator = port(fake_openai)
        first = await generator.name(NAME_PROMPT)
        second = await generator.name(NAME_PROMPT, attempt=1)
        await generator.aclose()
    asked = [call.body for call in fake_openai.calls_to("chat")]
    assert [body.get("max_completion_tokens") for body in asked] == [256, 4096]
    assert all("max_tokens" not in body and "temperature" not in body for body in asked)
    assert all(body["reasoning_effort"] == "none" for body in asked)
    assert first.value.text == "" and first.value.complete is False
    assert first.usage["completion_tokens_details"]["reasoning_tokens"] == 256
    assert second.value.text == "Sir Hatsworth" and second.value.complete is True


async def test_a_cut_off_name_is_not_complete(fake_openai):
    fake_openai.reasoning_tokens = 254  # two tokens of room left for the name
    with trio.fail_after(TEST_TIMEOUT_S):
        generator = port(fake_openai)
        answer = await generator.name(NAME_PROMPT)
        await generator.aclose()
    assert answer.value.text == "Sir Hats" and answer.value.complete is False


async def test_max_tokens_refused_by_a_reasoning_model_becomes_max_completion_tokens(fake_openai, caplog):
    # A gpt-4 id that reasons: dynamo asks it as an older model, with max_tokens.
    fake_openai.add_model("gpt-4.9-thinker")
    fake_openai.text_families["gpt-4.9"] = TextFamily(reasoning=True, efforts=("low",))
    fake_openai.reasoning_tokens = 0
    with trio.fail_after(TEST_TIMEOUT_S), caplog.at_level(logging.WARNING):
        generator = port(fake_openai, text_model="gpt-4.9-thinker")
        with pytest.raises(ParameterLearned):
            await generator.name(NAME_PROMPT)
        answer = await generator.name(NAME_PROMPT)
        await generator.aclose()
    refused, accepted = (call.body for call in fake_openai.calls_to("chat"))
    assert refused["max_tokens"] == 32 and "max_completion_tokens" not in refused
    assert accepted["max_completion_tokens"] == 32 and "max_tokens" not in accepted
    assert answer.value.complete
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "sending max_completion_tokens instead" in warning


async def test_older_text_model_gets_max_tokens_and_no_reasoning_effort(fake_openai):
    with trio.fail_after(TEST_TIMEOUT_S):
        generator = port(fake_openai, text_model="gpt-4o-mini")
        answer = await generator.name(NAME_PROMPT)
        await generator.aclose()
    [call] = fake_openai.calls_to("chat")
    assert call.body["max_tokens"] == 32 and "reasoning_effort" not in call.body
    assert answer.value.complete and answer.usage["total_tokens"] > 0


async def test_errors_leave_the_port_as_the_service_classes(fake_openai):
    fake_openai.script("images", [429, 401, "content_policy_violation", 503])
    with trio.fail_after(TEST_TIMEOUT_S):
        generator = port(fake_openai)
        raised = []
        for _ in range(4):
            with pytest.raises(CallError) as error:
                await generator.image(GHOST)
            raised.append(error.value)
        fake_openai.down = True
        with pytest.raises(Transient):
            await generator.moderate("a seal")
        await generator.aclose()
    assert [type(error) for error in raised] == [Transient, AuthFailure, ContentRejected, Transient]
    assert raised[0].rate_limited and raised[0].retry_after_s is not None
    assert all(not isinstance(error, openai.OpenAIError) for error in raised)


async def test_an_opaque_answer_to_a_transparent_request_is_keyed_and_learned(fake_openai, caplog):
    fake_openai.opaque_models = {"gpt-image-2.6-flare"}
    with trio.fail_after(TEST_TIMEOUT_S), caplog.at_level(logging.WARNING):
        generator = port(fake_openai)
        opaque = await generator.image(FRIEND)
        after = await generator.image(FRIEND)
        await generator.aclose()
    header = imaging.sniff(opaque.value.data)
    assert (header.format, header.alpha, opaque.value.transparent) == ("WEBP", False, False)
    first, second = (call.body for call in fake_openai.calls_to("images"))
    assert first["background"] == "transparent"
    assert "background" not in second and second["prompt"] == FRIEND.prompt  # keyed from now on
    assert after.value.transparent is False
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "opaque image" in warning


async def test_moderation_verdicts_are_read_from_the_answer(fake_openai):
    """Text and image moderation, read from the answer's JSON: the verdict, the model, and
    for an image the categories flagged with the input types the API judged them on."""
    with trio.fail_after(TEST_TIMEOUT_S):
        generator = port(fake_openai)
        flagged = await generator.moderate("a forbidden seal")
        clean = await generator.moderate("a seal")
        gruesome = await generator.image(ImageOrder(
            Style.GHOST, prompts.ghost_prompt("a gruesome seal"), VIEWER_ID))
        plain = await generator.image(GHOST)
        image_flagged = await generator.moderate_image(gruesome.value.data)
        image_clean = await generator.moderate_image(plain.value.data)
        await generator.aclose()
    assert flagged.value is True and clean.value is False
    assert flagged.model and flagged.model.startswith("omni-moderation")
    assert image_flagged.value.flagged and not image_clean.value.flagged
    assert image_flagged.value.categories == {"violence": ["image"],
                                              "violence/graphic": ["image"]}
    assert image_clean.value.categories == {}
    assert image_flagged.model.startswith("omni-moderation")


@pytest.mark.parametrize("body", [
    {"id": "modr-1", "model": "omni-moderation-latest", "results": []},
    {"id": "modr-1", "model": "omni-moderation-latest"},
    {"id": "modr-1", "results": [{"categories": {}}]},
])
async def test_a_moderation_answer_without_a_verdict_is_transient(body):
    generator = OpenAIGenerator(api_key="sk-test", base_url=None,
                                image_model="gpt-image-2.6-flare", text_model="gpt-6-luna")
    generator._client = openai.AsyncOpenAI(
        api_key="sk-test", max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(
            lambda request: httpx2.Response(200, json=body))))
    with pytest.raises(Transient, match="without results"):
        await generator.moderate("a seal")
    with pytest.raises(Transient, match="without results"):
        await generator.moderate_image(b"\x89PNG")
    await generator.aclose()
