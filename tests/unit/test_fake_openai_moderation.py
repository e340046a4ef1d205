"""The fake OpenAI's moderation endpoint takes what the real one takes (checked with the
real `openai` client): a string, a list of strings, or text and `image_url` parts with a
URL or a base64 data URL; it refuses what the real one refuses with a 400, and flags an
image it generated from a prompt holding its marker word. A picture it generated is
judged again without decoding it; one it never made is judged from its pixels."""

from __future__ import annotations

import base64
import io

import openai
import pytest
import trio
from PIL import Image, ImageDraw

from tests.fakes import FakeOpenAI, fixtures, pictures
from tests.fakes.openai_server import IMAGE_CATEGORIES, IMAGE_MARKER_WORD
from tests.support.timeouts import FAKES_S as TEST_DEADLINE_S

fake_openai = fixtures.fake_openai

MODEL = "gpt-image-2.6-flare"


def client_for(fake: FakeOpenAI) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{fake.url}/v1", api_key="sk-test", max_retries=0)


async def generated(client, subject: str, output_format: str = "jpeg") -> bytes:
    answer = await client.images.generate(
        model=MODEL, prompt=f"a ghostly image of {subject}, dark background", size="1024x1024",
        output_format=output_format, output_compression=80 if output_format != "png" else None)
    return base64.b64decode(answer.data[0].b64_json)


def image_part(data: bytes, mime: str = "image/jpeg") -> dict:
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize("output_format", ["jpeg", "webp", "png"])
async def test_an_image_generated_from_the_marker_word_is_flagged_for_the_image(
        fake_openai: FakeOpenAI, output_format: str) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            bad = await generated(client, f"a {IMAGE_MARKER_WORD} seal", output_format)
            good = await generated(client, "a seal", output_format)
            mime = f"image/{output_format}"
            flagged = await client.moderations.create(
                model="omni-moderation-latest", input=[image_part(bad, mime)])
            clean = await client.moderations.create(
                model="omni-moderation-latest", input=[image_part(good, mime)])
    [result] = flagged.results
    assert result.flagged and result.categories.violence and result.categories.violence_graphic
    assert result.category_scores.violence > 0.9
    applied = result.model_dump(by_alias=True)["category_applied_input_types"]
    for category, kinds in applied.items():
        assert kinds == (["image"] if category in IMAGE_CATEGORIES else []), category
    assert not clean.results[0].flagged


async def test_text_and_an_image_give_one_result_applied_to_both(fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            image = await generated(client, "a seal")
            answer = await client.moderations.create(
                model="omni-moderation-latest",
                input=[{"type": "text", "text": "a forbidden seal"}, image_part(image)])
            several = await client.moderations.create(input=["a seal", "a forbidden seal"])
    [result] = answer.results
    assert result.flagged  # by the text
    applied = result.model_dump(by_alias=True)["category_applied_input_types"]
    assert applied["violence"] == ["text", "image"] and applied["harassment"] == ["text"]
    assert [r.flagged for r in several.results] == [False, True]


@pytest.mark.parametrize(
    ("bad_input", "code"),
    [
        pytest.param([], None, id="empty-list"),
        pytest.param([{"type": "video", "video": {}}], "invalid_value", id="unknown-part"),
        pytest.param([{"type": "image_url", "image_url": {}}], "missing_required_parameter",
                     id="image-without-url"),
        pytest.param([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}],
                     "invalid_image_format", id="not-base64"),
        pytest.param([{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a picture").decode()}}],
            "invalid_image_format", id="not-a-picture"),
    ],
)
async def test_bad_input_is_a_400_as_the_real_endpoint_answers(
        fake_openai: FakeOpenAI, bad_input, code) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.moderations.create(model="omni-moderation-latest", input=bad_input)
    assert caught.value.status_code == 400
    assert caught.value.code == code
    assert caught.value.body["type"] == "invalid_request_error"


async def test_two_images_in_one_request_are_refused(fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            image = await generated(client, "a seal")
            with pytest.raises(openai.BadRequestError) as caught:
                await client.moderations.create(
                    model="omni-moderation-latest", input=[image_part(image), image_part(image)])
            with pytest.raises(openai.BadRequestError) as text_model:
                await client.moderations.create(
                    model="text-moderation-latest", input=[image_part(image)])
    assert caught.value.code == "too_many_images"
    assert "Number of images (2) exceeds maximum of 1" in caught.value.message
    assert text_model.value.param == "model"


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The pictures the fake decodes to look for its mark, from now on."""
    decoded: list[bytes] = []
    judge = pictures.is_marked

    def counted(data: bytes) -> bool:
        decoded.append(data)
        return judge(data)

    monkeypatch.setattr(pictures, "is_marked", counted)
    return decoded


async def flagged(client, data: bytes, mime: str = "image/jpeg") -> bool:
    answer = await client.moderations.create(model="omni-moderation-latest", input=[image_part(data, mime)])
    return answer.results[0].flagged


async def test_a_picture_this_fake_generated_is_judged_without_decoding_it(
        fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            bad = await generated(client, f"a {IMAGE_MARKER_WORD} seal")
            good = await generated(client, "a seal")
            decoded = count_decodes(monkeypatch)  # from here on: the screenings alone
            verdicts = [await flagged(client, data) for data in (bad, good, bad, good)]
    assert verdicts == [True, False, True, False]
    assert decoded == []


async def test_a_picture_it_never_made_is_judged_from_its_pixels_once(
        fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """As when dynamo re-encodes a picture: other bytes, the same mark (or none)."""
    plain = Image.new("RGB", (1024, 1024), (40, 40, 40))
    painted = plain.copy()
    ImageDraw.Draw(painted).rectangle(pictures.MARK_BOX, fill=pictures.MARK_RGB)
    marked_jpeg, plain_jpeg = (_jpeg(image) for image in (painted, plain))
    decoded = count_decodes(monkeypatch)
    with trio.fail_after(TEST_DEADLINE_S):
        async with client_for(fake_openai) as client:
            verdicts = [await flagged(client, data) for data in (marked_jpeg, plain_jpeg, marked_jpeg)]
    assert verdicts == [True, False, True]
    assert decoded == [marked_jpeg, plain_jpeg]  # each once: then it is known


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
