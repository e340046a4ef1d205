"""The configured models against the catalogue (dynamo.openai_port.catalogue), at startup and
daily (actors.model_watch), with a fake port and the autojump clock."""

from __future__ import annotations

import datetime
import logging

import pytest
import trio

from actors import model_watch
from dynamo import metrics
from dynamo.openai_port import catalogue as openai_models
from dynamo.openai_port.catalogue import ModelsRefused, ModelsStatus, check_and_report
from dynamo.openai_port.client import ModelInfo
from dynamo.openai_port.errors import ModelNotFound
from dynamo.supervision.retry import Transient
from tests.fakes.ports import running

TODAY = datetime.date(2026, 12, 1)
DAY_S = 24 * 3600


class Catalogue:
    """The port's `model_info`: {id: shutdown date or None}; others are not found."""

    def __init__(self, models: dict, *, hang: bool = False):
        self.models = models
        self.hang = hang
        self.unreachable = False
        self.asked: list[str] = []

    async def model_info(self, model_id: str) -> ModelInfo:
        self.asked.append(model_id)
        if self.hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if self.unreachable:
            raise Transient("ConnectError: connection refused")
        if model_id not in self.models:
            raise ModelNotFound(f"404 model_not_found: The model `{model_id}` does not exist "
                                "or you do not have access to it.")
        date = self.models[model_id]
        return ModelInfo(model_id, date.isoformat() if date else None)


def status(image="gpt-image-2.6-flare", text="gpt-6-luna", today=lambda: TODAY):
    return ModelsStatus(image_model=image, text_model=text, today=today)


def gauge(model: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("dynamo_model_shutdown_days", {"model": model})


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_live_models_start_quietly():
    models = status()
    catalogue = Catalogue({"gpt-image-2.6-flare": None, "gpt-6-luna": None})
    await check_and_report(catalogue, models, profile="production", at_startup=True)
    assert models.as_json()["image"] == {
        "id": "gpt-image-2.6-flare", "state": "ok", "shutdown_date": None, "days_left": None,
        "checked_at": models.as_json()["image"]["checked_at"], "error": None}
    assert gauge("gpt-image-2.6-flare") is None


async def test_production_refuses_an_unknown_model_in_one_line():
    models = status(image="dall-e-3")
    catalogue = Catalogue({"gpt-6-luna": None})
    with pytest.raises(ModelsRefused) as refused:
        await check_and_report(catalogue, models, profile="production", at_startup=True)
    assert str(refused.value) == (
        "refusing to start: DYNAMO_IMAGE_MODEL=dall-e-3 cannot be used: the OpenAI API answered "
        "404 model_not_found: The model `dall-e-3` does not exist or you do not have access to it.")
    assert "\n" not in str(refused.value)


async def test_a_listed_model_whose_date_has_come_is_shut_down():
    models = status(text="gpt-5")
    catalogue = Catalogue({"gpt-image-2.6-flare": None, "gpt-5": datetime.date(2026, 11, 30)})
    with pytest.raises(ModelsRefused, match=r"DYNAMO_TEXT_MODEL=gpt-5 cannot be used: the OpenAI "
                       r"API says it shut down on 2026-11-30"):
        await check_and_report(catalogue, models, profile="production", at_startup=True)


async def test_development_warns_loudly_and_goes_on(caplog):
    models = status(image="dall-e-3", text="gpt-3.5-turbo")
    with caplog.at_level(logging.WARNING):
        await check_and_report(Catalogue({}), models, profile="development", at_startup=True)
    lines = warnings(caplog)
    assert len(lines) == 2 and all(line.startswith("!!! ") for line in lines)
    assert "DYNAMO_IMAGE_MODEL=dall-e-3" in lines[0] and "DYNAMO_TEXT_MODEL=gpt-3.5-turbo" in lines[1]
    assert models.as_json()["text"]["state"] == "unknown"


async def test_a_shutdown_ahead_warns_shows_on_status_and_in_the_gauge(caplog):
    models = status(text="gpt-4o-mini")
    catalogue = Catalogue({"gpt-image-2.6-flare": None, "gpt-4o-mini": datetime.date(2027, 1, 14)})
    with caplog.at_level(logging.WARNING):
        await check_and_report(catalogue, models, profile="production", at_startup=True)
    assert warnings(caplog) == [
        "DYNAMO_TEXT_MODEL=gpt-4o-mini shuts down on 2027-01-14 (44 days left, says the OpenAI "
        "API): choose another model before then"]
    text = models.as_json()["text"]
    assert (text["state"], text["shutdown_date"], text["days_left"]) == ("retiring", "2027-01-14", 44)
    assert gauge("gpt-4o-mini") == 44


@pytest.mark.parametrize("hang", [False, True])
async def test_an_unreachable_catalogue_starts_anyway_and_says_so(autojump_clock, caplog, hang):
    models = status()
    catalogue = Catalogue({}, hang=hang)
    catalogue.unreachable = True
    with caplog.at_level(logging.WARNING):
        await check_and_report(catalogue, models, profile="production", at_startup=True)
    [line] = warnings(caplog)
    assert line.startswith("could not read the OpenAI model catalogue (")
    assert "starting without checking DYNAMO_IMAGE_MODEL=gpt-image-2.6-flare" in line
    assert models.as_json()["image"]["state"] == "unreachable"
    assert models.next_check_in_s() == openai_models.RETRY_UNREACHABLE_S


async def test_the_watch_warns_daily_and_catches_a_shutdown_announced_later(autojump_clock, caplog):
    start = trio.current_time()
    models = status(today=lambda: TODAY + datetime.timedelta(days=int((trio.current_time() - start) // DAY_S)))
    catalogue = Catalogue({"gpt-image-2.6-flare": None, "gpt-6-luna": datetime.date(2026, 12, 11)})
    await check_and_report(catalogue, models, profile="production", at_startup=True)
    with caplog.at_level(logging.WARNING):
        async with running(model_watch.run, generator=catalogue, models=models,
                           profile="production"):
            await trio.sleep(DAY_S + 1)
            catalogue.models["gpt-image-2.6-flare"] = datetime.date(2026, 12, 4)  # announced
            await trio.sleep(DAY_S)
            await trio.sleep(DAY_S)  # 2026-12-04: the image model is gone now
    lines = warnings(caplog)
    text = "DYNAMO_TEXT_MODEL=gpt-6-luna shuts down on 2026-12-11 ({} days left, says the " \
        "OpenAI API): choose another model before then"
    image = "DYNAMO_IMAGE_MODEL=gpt-image-2.6-flare shuts down on 2026-12-04 (1 days left, " \
        "says the OpenAI API): choose another model before then"
    gone = "DYNAMO_IMAGE_MODEL=gpt-image-2.6-flare cannot be used: the OpenAI API says it shut " \
        "down on 2026-12-04; every request needing it fails until it is changed"
    # At startup (12-01), then on 12-02, 12-03 and 12-04.
    assert lines == [text.format(10), text.format(9), image, text.format(8), gone, text.format(7)]
    assert [r.levelname for r in caplog.records if r.getMessage() == gone] == ["ERROR"]
    assert catalogue.asked.count("gpt-6-luna") == 4
    assert models.as_json()["image"]["state"] == "shut-down"
