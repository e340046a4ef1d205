"""What each model family is asked (dialect), what is learned from refusals, what calls
cost (pricing), and the image header check that lets API-encoded images be stored as
they came (imaging.sniff, the uploader's process_image)."""

from __future__ import annotations

import io
import logging

import pytest
from PIL import Image

from actors import uploader
from dynamo import config
from dynamo.domain import prompts
from dynamo.domain.jobs import Style
from dynamo.images import processing as imaging
from dynamo.openai_port import dialect, pricing
from dynamo.openai_port.dialect import Dialect, ImageOrder

GHOST = ImageOrder(Style.GHOST, prompts.ghost_prompt("a seal"), "1")
FRIEND = ImageOrder(Style.FRIEND, prompts.friend_prompt("yellow", "a cat"), "1",
                    prompts.friend_prompt("yellow", "a cat", chroma_key=False))


# ---- dialect ------------------------------------------------------------------------


def test_families_by_longest_prefix_and_newer_models_asked_as_today():
    assert dialect.image_family("gpt-image-2.5-flare-2026-09-08").transparency
    assert not dialect.image_family("gpt-image-2").transparency
    assert not dialect.image_family("dall-e-3").gpt_image
    assert dialect.image_family("gpt-image-9-nova") is dialect.NEWER_IMAGE_FAMILY
    assert dialect.text_family("gpt-5-mini").effort == "minimal"
    assert dialect.text_family("gpt-5.6-luna").effort == "none"
    assert not dialect.text_family("gpt-4o-mini").reasoning
    assert dialect.text_family("gpt-7-nova").reasoning


def test_image_requests_per_family():
    talk = Dialect()
    ghost = talk.image_request("gpt-image-2.6-flare", GHOST, quality="low")
    assert ghost.params == {"model": "gpt-image-2.6-flare", "prompt": GHOST.prompt, "n": 1,
                            "size": "1024x1024", "user": "1", "quality": "low",
                            "output_format": "jpeg", "output_compression": 80}
    friend = talk.image_request("gpt-image-2.6-flare", FRIEND, quality="low")
    assert friend.transparent and friend.params["background"] == "transparent"
    assert friend.params["prompt"] == FRIEND.prompt_without_background
    assert friend.params["output_format"] == "webp"
    # gpt-image-2 no longer does transparency: the chroma-key prompt, PNG.
    keyed = talk.image_request("gpt-image-2", FRIEND, quality="low")
    assert not keyed.transparent and keyed.params["prompt"] == FRIEND.prompt
    assert "background" not in keyed.params and "output_format" not in keyed.params
    legacy = talk.image_request("dall-e-3", GHOST, quality="low")
    assert legacy.params["response_format"] == "b64_json" and "quality" not in legacy.params


def test_name_requests_per_family_and_more_room_on_the_second_attempt():
    talk = Dialect()
    first = talk.name_request("gpt-6-luna", "name it", attempt=0)
    second = talk.name_request("gpt-6-luna", "name it", attempt=1)
    assert (first["max_completion_tokens"], second["max_completion_tokens"]) == (256, 4096)
    assert first["reasoning_effort"] == "none" and "temperature" not in first
    older = talk.name_request("gpt-4o-mini", "name it", attempt=0)
    assert older["max_tokens"] == 32 and "reasoning_effort" not in older


def test_learning_drops_renames_and_warns_once_per_model(caplog):
    talk = Dialect()
    sent = talk.name_request("gpt-4.9", "name it", attempt=0)
    with caplog.at_level(logging.WARNING):
        assert talk.learn("gpt-4.9", sent, "max_tokens", "unsupported_parameter", "no")
        assert not talk.learn("gpt-4.9", sent, "max_tokens", "unsupported_parameter", "no")
    assert len(caplog.records) == 1
    renamed = talk.name_request("gpt-4.9", "name it", attempt=0)
    assert renamed["max_completion_tokens"] == 32 and "max_tokens" not in renamed
    assert "max_tokens" in talk.name_request("gpt-4o-mini", "name it", attempt=0)  # per model
    # A value refused: that value is left out (the API's default), not the parameter.
    sent = talk.name_request("gpt-5", "name it", attempt=0)
    assert talk.learn("gpt-5", sent, "reasoning_effort", "unsupported_value", "no")
    assert "reasoning_effort" not in talk.name_request("gpt-5", "name it", attempt=0)
    # `user` has a successor; the parameter named only in the message is found too.
    plan = talk.image_request("gpt-image-2.6-flare", GHOST, quality="low")
    assert talk.learn("gpt-image-2.6-flare", plan.params, None, "unknown_parameter",
                      "Unknown parameter: 'user'.")
    again = talk.image_request("gpt-image-2.6-flare", GHOST, quality="low").params
    assert again["safety_identifier"] == "1" and "user" not in again


def test_a_refusal_without_a_code_that_says_not_supported_is_a_refused_value():
    talk = Dialect()
    plan = talk.image_request("gpt-image-9", FRIEND, quality="low")
    assert talk.learn("gpt-image-9", plan.params, "background", None,
                      "Transparent background is not supported for this model.")
    assert not talk.image_request("gpt-image-9", FRIEND, quality="low").transparent


def test_nothing_to_learn_from_other_refusals():
    talk = Dialect()
    plan = talk.image_request("gpt-image-2.6-flare", GHOST, quality="low")
    assert not talk.learn("gpt-image-2.6-flare", plan.params, "prompt", "unsupported_value", "x")
    assert not talk.learn("gpt-image-2.6-flare", plan.params, "size", "unknown_parameter", "x")
    assert not talk.learn("gpt-image-2.6-flare", plan.params, "style", "unknown_parameter", "x")
    assert not talk.learn("gpt-image-2.6-flare", plan.params, "quality", "invalid_value", "x")
    assert not talk.learn("gpt-image-2.6-flare", plan.params, None, None, "blocked")


def test_refused_jpeg_or_compression_means_png_converted_locally():
    talk = Dialect()
    plan = talk.image_request("gpt-image-2.6-flare", GHOST, quality="low")
    talk.learn("gpt-image-2.6-flare", plan.params, "output_compression", "unknown_parameter", "x")
    again = talk.image_request("gpt-image-2.6-flare", GHOST, quality="low").params
    assert "output_format" not in again and "output_compression" not in again


def test_an_opaque_answer_turns_friends_back_to_keying(caplog):
    talk = Dialect()
    with caplog.at_level(logging.WARNING):
        talk.learn_opaque("gpt-image-2.6-flare")
        talk.learn_opaque("gpt-image-2.6-flare")
    assert len(caplog.records) == 1
    plan = talk.image_request("gpt-image-2.6-flare", FRIEND, quality="low")
    assert not plan.transparent and plan.params["prompt"] == FRIEND.prompt


# ---- pricing -------------------------------------------------------------------------


def test_expected_tokens_by_family_quality_and_size():
    assert pricing.expected_image_tokens("gpt-image-2.6-flare", "medium") == 439 + 64
    assert pricing.expected_image_tokens("gpt-image-2.5-sunburst-2026-09-08", "low") == 196 + 64
    assert pricing.expected_image_tokens("gpt-image-1", "medium") == 1056 + 64
    assert pricing.expected_image_tokens("gpt-image-2", "high", "1536x1024") == 2634 + 64
    assert pricing.expected_image_tokens("some-new-model", "medium") == 1056 + 64  # errs high


def test_cost_of_an_image_and_a_chat_answer():
    table = pricing.PriceTable()
    image_usage = {"input_tokens": 40, "output_tokens": 439, "total_tokens": 479,
                   "input_tokens_details": {"text_tokens": 40, "image_tokens": 0},
                   "output_tokens_details": {"image_tokens": 439, "text_tokens": 0}}
    assert table.cost_usd("gpt-image-2.6-flare", image_usage) == pytest.approx(
        (40 * 5 + 439 * 30) / 1e6)
    chat_usage = {"prompt_tokens": 30, "completion_tokens": 300, "total_tokens": 330}
    assert table.cost_usd("gpt-6-luna", chat_usage) == pytest.approx((30 * 0.10 + 300 * 0.50) / 1e6)
    assert table.cost_usd("omni-moderation-latest", None) == 0
    # The price of one image at the default quality, as the README states it.
    assert table.image_price_usd("gpt-image-2.6-flare", "medium") == pytest.approx(0.01349)


def test_unpriced_model_costs_nothing_and_is_logged_once(caplog):
    table = pricing.PriceTable()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert table.cost_usd("mystery-model", {"prompt_tokens": 5}) == 0
    assert len(caplog.records) == 1 and "DYNAMO_PRICES" in caplog.records[0].getMessage()


def test_dynamo_prices_override_part_of_an_entry():
    settings = config.load({"DYNAMO_PRICES": '{"gpt-image-2.6-flare": {"image_output": 60}}'})
    table = pricing.PriceTable(settings.prices)
    prices = table.prices_for("gpt-image-2.6-flare")
    assert (prices.image_output, prices.text_input) == (60, 5)
    assert table.prices_for("gpt-image-2.5-flare").image_output == 30
    with pytest.raises(config.ConfigError, match="DYNAMO_PRICES"):
        config.load({"DYNAMO_PRICES": "[1, 2]"})


def test_configuration_defaults_for_models_quality_and_budget():
    settings = config.load({})
    assert (settings.image_model, settings.text_model) == ("gpt-image-2.6-flare", "gpt-6-luna")
    assert settings.image_quality == "medium" and settings.daily_budget_usd is None
    assert config.load({"DYNAMO_DAILY_BUDGET_USD": "2.5"}).daily_budget_usd == 2.5
    for name, bad in (("DYNAMO_IMAGE_QUALITY", "hd"), ("DYNAMO_DAILY_BUDGET_USD", "lots")):
        with pytest.raises(config.ConfigError, match=name):
            config.load({name: bad})


# ---- stored as they came ----------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def friend_picture(alpha: bool) -> Image.Image:
    image = Image.new("RGBA" if alpha else "RGB", (256, 256), (0, 0, 0, 0) if alpha else (75, 0, 130))
    image.paste((255, 221, 0, 255)[: 4 if alpha else 3], (64, 64, 192, 192))
    return image


def test_sniff_reads_format_size_and_alpha_from_headers():
    ghost = encoded(Image.new("RGB", (1024, 1024)), "JPEG", quality=80)
    assert imaging.sniff(ghost) == imaging.Header("JPEG", 1024, 1024, alpha=False)
    assert imaging.sniff(encoded(friend_picture(True), "WEBP", quality=80)).alpha
    assert not imaging.sniff(encoded(friend_picture(False), "WEBP", quality=80)).alpha
    assert imaging.sniff(encoded(friend_picture(True), "PNG")).alpha
    assert not imaging.sniff(ghost[:-200]).whole  # cut short: not stored as it came
    assert imaging.sniff(b"GIF89a...") is None and imaging.sniff(b"\xff\xd8\xff") is None


def test_api_encoded_images_are_stored_as_they_came():
    ghost = encoded(Image.new("RGB", (1024, 1024), (10, 10, 20)), "JPEG", quality=80)
    assert uploader.process_image(Style.GHOST, ghost) == (ghost, "#000000")
    friend = encoded(friend_picture(True), "WEBP", quality=80)
    data, color = uploader.process_image(Style.FRIEND, friend, {"color": "yellow", "subject": "x"})
    assert data == friend
    assert color == imaging.color_hex("indigo") == "#4b0082"  # yellow's complement


def test_other_images_are_converted_and_keyed_as_before():
    png = encoded(Image.new("RGB", (64, 64), (10, 10, 20)), "PNG")
    data, _ = uploader.process_image(Style.GHOST, png)
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    truncated = encoded(Image.new("RGB", (64, 64)), "JPEG")[:-10]
    with pytest.raises(ValueError):
        uploader.process_image(Style.GHOST, truncated)  # not as-is; and not decodable
    opaque = encoded(friend_picture(False), "WEBP", lossless=True)
    data, color = uploader.process_image(Style.FRIEND, opaque, {"color": "yellow"})
    keyed = Image.open(io.BytesIO(data))
    assert keyed.mode == "RGBA" and keyed.getpixel((2, 2))[3] == 0
    assert color == "#4b0082"  # detected from the corners: the background drawn
