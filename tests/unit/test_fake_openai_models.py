"""The fake OpenAI speaks today's API (2026-12-01): checked with the real `openai` client.

A model catalogue with shutdown dates; 404 model_not_found for shut-down ids everywhere;
GPT image models refusing response_format and style, honouring output format and
compression, drawing a real alpha channel for background=transparent (where the family
does transparency), and carrying `usage`; reasoning models refusing max_tokens and a
temperature, and answering "" when they have no room left after reasoning.
"""

from __future__ import annotations

import base64
import datetime
import io

import openai
import pytest
import trio
from PIL import Image

from tests.fakes import FakeOpenAI, fixtures
from tests.support.timeouts import FAKES_S as TEST_DEADLINE_S

fake_openai = fixtures.fake_openai

FRIEND_WITHOUT_BACKGROUND = (
    "a yellow caterpillar in a top hat, illustrated in the style of 1990s digital clip art "
    "images, with a limited 256-color palette and sharp black outlines"
)


def client_for(fake: FakeOpenAI) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{fake.url}/v1", api_key=fake.api_key, max_retries=0)


def decoded(answer) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))


async def test_catalogue_lists_live_models_with_their_shutdown_dates(fake_openai: FakeOpenAI) -> None:
    fake_openai.today = datetime.date(2026, 12, 1)
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            live = await client.models.retrieve("gpt-image-2.6-flare")
            retiring = await client.models.retrieve("gpt-4o-mini")
            listed = [model.id async for model in client.models.list()]
            with pytest.raises(openai.NotFoundError) as gone:
                await client.models.retrieve("gpt-image-1-mini")  # shut down today
    assert live.shutdown_date is None and live.object == "model"
    assert retiring.shutdown_date == "2027-01-14"
    assert "gpt-6-luna" in listed and "gpt-5" in listed
    assert not {"dall-e-3", "gpt-image-1", "gpt-image-1-mini", "chatgpt-image-latest"} & set(listed)
    assert gone.value.code == "model_not_found" and gone.value.status_code == 404
    assert gone.value.body["message"] == (
        "The model `gpt-image-1-mini` does not exist or you do not have access to it.")


async def test_shut_down_models_answer_404_on_every_endpoint(fake_openai: FakeOpenAI) -> None:
    fake_openai.add_model("gpt-image-soon", shutdown_date=datetime.date(2026, 12, 11))
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            with pytest.raises(openai.NotFoundError) as image:
                await client.images.generate(model="dall-e-3", prompt="a seal")
            with pytest.raises(openai.NotFoundError) as chat:
                await client.chat.completions.create(
                    model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}])
            fake_openai.today = datetime.date(2026, 12, 11)  # the day it shuts down
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("gpt-image-soon")
    assert image.value.code == chat.value.code == "model_not_found"


@pytest.mark.parametrize("param, value", [("response_format", "b64_json"), ("style", "vivid")])
async def test_gpt_image_models_refuse_dall_e_parameters(fake_openai: FakeOpenAI, param, value) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.images.generate(model="gpt-image-2.6-flare", prompt="a seal",
                                             **{param: value})
    assert (refused.value.code, refused.value.param) == ("unknown_parameter", param)
    assert refused.value.body["message"] == f"Unknown parameter: '{param}'."


async def test_output_format_and_compression_are_honoured(fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            low = await client.images.generate(model="gpt-image-2.6-flare", prompt="a seal",
                                               output_format="jpeg", output_compression=10)
            high = await client.images.generate(model="gpt-image-2.6-flare", prompt="a seal",
                                                output_format="jpeg", output_compression=95)
            webp = await client.images.generate(model="gpt-image-2.5-flare", prompt="a seal",
                                                output_format="webp")
            png = await client.images.generate(model="gpt-image-2", prompt="a seal")
    assert decoded(low).format == decoded(high).format == "JPEG"
    # The compression is the JPEG's quality: its quantization tables say which.
    assert sum(decoded(low).quantization[0]) > 5 * sum(decoded(high).quantization[0])
    assert len(low.data[0].b64_json) < len(high.data[0].b64_json)
    assert (low.output_format, webp.output_format, png.output_format) == ("jpeg", "webp", "png")
    assert decoded(webp).format == "WEBP" and decoded(png).format == "PNG"
    assert decoded(png).size == (1024, 1024)


async def test_transparent_background_is_a_real_alpha_channel(fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            answer = await client.images.generate(
                model="gpt-image-2.6-flare", prompt=FRIEND_WITHOUT_BACKGROUND,
                background="transparent", output_format="webp")
            with pytest.raises(openai.BadRequestError) as not_this_model:
                await client.images.generate(model="gpt-image-2", prompt=FRIEND_WITHOUT_BACKGROUND,
                                             background="transparent", output_format="png")
            with pytest.raises(openai.BadRequestError) as not_jpeg:
                await client.images.generate(model="gpt-image-2.6-flare", prompt="a seal",
                                             background="transparent", output_format="jpeg")
    image = decoded(answer).convert("RGBA")
    assert answer.background == "transparent"
    assert image.getpixel((3, 3))[3] == 0 and image.getpixel((1020, 1020))[3] == 0
    red, green, blue, alpha = image.getpixel((512, 560))
    assert alpha == 255 and (red, green, blue) != (0, 0, 0)  # the yellow figure, opaque
    assert (not_this_model.value.code, not_this_model.value.param) == ("unsupported_value", "background")
    assert not_jpeg.value.param == "output_format"


async def test_every_image_answer_carries_usage(fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            low = await client.images.generate(model="gpt-image-2.6-flare", prompt="a seal", quality="low")
            medium = await client.images.generate(model="gpt-image-2.6-flare", prompt="a seal")
            wide = await client.images.generate(model="gpt-image-2.6-flare", prompt="a seal",
                                                quality="high", size="1536x1024")
            with pytest.raises(openai.BadRequestError) as refused:
                await client.images.generate(model="gpt-image-2.6-flare", prompt="a seal",
                                             quality="standard")
    assert (low.usage.output_tokens, medium.usage.output_tokens) == (196, 439)
    assert wide.usage.output_tokens == round(1756 * 1.5)
    for answer in (low, medium, wide):
        assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens
        assert answer.usage.input_tokens_details.text_tokens == answer.usage.input_tokens
    assert medium.quality == "medium" and low.size == "1024x1024"
    assert (refused.value.code, refused.value.param) == ("unsupported_value", "quality")
    body = fake_openai.calls_to("images")[0].body
    assert fake_openai.image_usage(body) == low.usage.model_dump(exclude_none=True)


async def test_reasoning_models_refuse_max_tokens_and_temperature(fake_openai: FakeOpenAI) -> None:
    messages = [{"role": "user", "content": "Name a friendly caterpillar."}]
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            with pytest.raises(openai.BadRequestError) as max_tokens:
                await client.chat.completions.create(model="gpt-6-luna", messages=messages, max_tokens=32)
            with pytest.raises(openai.BadRequestError) as temperature:
                await client.chat.completions.create(model="gpt-6-luna", messages=messages, temperature=0.2)
            with pytest.raises(openai.BadRequestError) as effort:
                await client.chat.completions.create(model="gpt-5", messages=messages,
                                                     reasoning_effort="none")
            with pytest.raises(openai.BadRequestError) as older:
                await client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                     reasoning_effort="low")
    assert (max_tokens.value.code, max_tokens.value.param) == ("unsupported_parameter", "max_tokens")
    assert "Use 'max_completion_tokens' instead." in max_tokens.value.body["message"]
    assert (temperature.value.code, temperature.value.param) == ("unsupported_value", "temperature")
    assert (effort.value.code, effort.value.param) == ("unsupported_value", "reasoning_effort")
    assert (older.value.code, older.value.param) == ("unsupported_parameter", "reasoning_effort")


async def test_reasoning_model_answers_empty_without_room(fake_openai: FakeOpenAI) -> None:
    messages = [{"role": "user", "content": "Name a friendly caterpillar."}]
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            # The default effort (medium) reasons for 512 tokens.
            starved = await client.chat.completions.create(
                model="gpt-6-luna", messages=messages, max_completion_tokens=100)
            roomy = await client.chat.completions.create(
                model="gpt-6-luna", messages=messages, max_completion_tokens=1000)
            quick = await client.chat.completions.create(
                model="gpt-6-luna", messages=messages, max_completion_tokens=16,
                reasoning_effort="none")
    assert starved.choices[0].message.content == ""
    assert starved.choices[0].finish_reason == "length"
    assert starved.usage.completion_tokens == 100
    assert starved.usage.completion_tokens_details.reasoning_tokens == 100
    assert roomy.choices[0].message.content == "Sir Hatsworth"
    assert roomy.choices[0].finish_reason == "stop"
    assert roomy.usage.completion_tokens_details.reasoning_tokens == 512
    assert quick.choices[0].message.content == "Sir Hatsworth"
    assert quick.usage.completion_tokens_details.reasoning_tokens == 0
