"""The configured models, as the API's catalogue knows them (contract §4, "Models").

Each configured model (`DYNAMO_IMAGE_MODEL`, `DYNAMO_TEXT_MODEL`) is read from
`GET /v1/models/{id}` (the port's `model_info`) at startup and once a day after:

- unknown (404 `model_not_found`) or shut down (its `shutdown_date` today or past): at
  startup in `production` the process refuses to start with one line naming the
  variable, the model and what the API said (`ModelsRefused`); otherwise a loud WARNING
  (an ERROR once running: every call to that model now fails).
- a `shutdown_date` ahead: a WARNING naming the model and the date, at startup and daily.
- the catalogue cannot be read: dynamo starts anyway, says so, and tries again hourly.

`ModelsStatus` is the live view for `/status` (`models`), and sets the gauge
`dynamo_model_shutdown_days{model}` for each model with a date.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable

import trio

from dynamo import metrics
from dynamo.openai_port.errors import ModelNotFound
from dynamo.supervision.retry import CallError

log = logging.getLogger(__name__)

# A catalogue that does not answer in this time is treated as unreachable.
CHECK_TIMEOUT_S = 15.0
# How often the catalogue is read again: daily, or hourly while it could not be read.
RECHECK_S = 24 * 3600.0
RETRY_UNREACHABLE_S = 3600.0

OK, RETIRING, SHUT_DOWN, UNKNOWN = "ok", "retiring", "shut-down", "unknown"
UNREACHABLE, UNCHECKED, OFFLINE = "unreachable", "unchecked", "offline"
UNUSABLE = (SHUT_DOWN, UNKNOWN)


class ModelsRefused(Exception):
    """A configured model is unknown or shut down (production refuses to start)."""


def _utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


@dataclasses.dataclass
class ModelState:
    role: str  # "image" or "text"
    variable: str
    id: str
    state: str = UNCHECKED
    shutdown_date: datetime.date | None = None
    said: str | None = None  # the API's answer when it refused the model, or the error
    checked_at: datetime.datetime | None = None

    def days_left(self, today: datetime.date) -> int | None:
        return None if self.shutdown_date is None else (self.shutdown_date - today).days

    def line(self, today: datetime.date) -> str:
        """What is wrong or ahead with this model, in one line for the log."""
        named = f"{self.variable}={self.id}"
        if self.state == UNKNOWN:
            return f"{named} cannot be used: the OpenAI API answered {self.said}"
        if self.state == SHUT_DOWN:
            return (
                f"{named} cannot be used: the OpenAI API says it shut down on {self.shutdown_date}"
            )
        if self.state == RETIRING:
            return (
                f"{named} shuts down on {self.shutdown_date} ({self.days_left(today)} days "
                "left, says the OpenAI API): choose another model before then"
            )
        return f"{named}: {self.state}"


class ModelsStatus:
    def __init__(
        self,
        *,
        image_model: str,
        text_model: str,
        offline: bool = False,
        today: Callable[[], datetime.date] = _utc_today,
    ):
        self.today = today
        self.states = {
            "image": ModelState("image", "DYNAMO_IMAGE_MODEL", image_model),
            "text": ModelState("text", "DYNAMO_TEXT_MODEL", text_model),
        }
        if offline:
            for state in self.states.values():
                state.state = OFFLINE

    @property
    def offline(self) -> bool:
        return any(state.state == OFFLINE for state in self.states.values())

    async def check(self, generator) -> None:
        """Reads every configured model from the catalogue (the caller bounds the time)."""
        for state in self.states.values():
            await self._check_one(generator, state)

    async def _check_one(self, generator, state: ModelState) -> None:
        today = self.today()
        try:
            info = await generator.model_info(state.id)
        except ModelNotFound as exc:
            state.state, state.said, state.shutdown_date = UNKNOWN, str(exc), None
        except CallError as exc:
            state.state, state.said = UNREACHABLE, str(exc)
            return  # what was known before stays known
        else:
            state.said = None
            state.shutdown_date = _date(info.shutdown_date)
            days = state.days_left(today)
            state.state = OK if days is None else (SHUT_DOWN if days <= 0 else RETIRING)
        state.checked_at = datetime.datetime.now(datetime.UTC)
        if (days_left := state.days_left(today)) is not None:  # a shutdown date is known
            metrics.MODEL_SHUTDOWN_DAYS.labels(state.id).set(days_left)
        else:
            try:
                metrics.MODEL_SHUTDOWN_DAYS.remove(state.id)
            except KeyError:
                pass  # no date was known before either

    def timed_out(self) -> None:
        for state in self.states.values():
            if state.state in (UNCHECKED, UNREACHABLE):
                state.state = UNREACHABLE
                state.said = f"no answer within {CHECK_TIMEOUT_S:.0f} s"

    def report(self, *, profile: str, at_startup: bool) -> None:
        """Logs what the last check found; at startup in production, raises ModelsRefused
        for a model that cannot be used."""
        today = self.today()
        states = list(self.states.values())
        unreachable = [s for s in states if s.state == UNREACHABLE]
        if unreachable:
            log.warning(
                "could not read the OpenAI model catalogue (%s): %s without checking %s; "
                "trying again in an hour",
                unreachable[0].said,
                "starting" if at_startup else "going on",
                ", ".join(f"{s.variable}={s.id}" for s in unreachable),
            )
        unusable = [s.line(today) for s in states if s.state in UNUSABLE]
        if unusable and at_startup and profile == "production":
            raise ModelsRefused("refusing to start: " + "; ".join(unusable))
        for line in unusable:
            if at_startup:
                log.warning("!!! %s; every request needing it will fail !!!", line)
            else:
                log.error("%s; every request needing it fails until it is changed", line)
        for state in states:
            if state.state == RETIRING:
                log.warning("%s", state.line(today))

    def next_check_in_s(self) -> float:
        unreachable = any(s.state in (UNREACHABLE, UNCHECKED) for s in self.states.values())
        return RETRY_UNREACHABLE_S if unreachable else RECHECK_S

    def as_json(self) -> dict:
        today = self.today()
        return {
            role: {
                "id": state.id,
                "state": state.state,
                "shutdown_date": state.shutdown_date.isoformat() if state.shutdown_date else None,
                "days_left": state.days_left(today),
                "checked_at": state.checked_at.isoformat().replace("+00:00", "Z")
                if state.checked_at
                else None,
                "error": state.said,
            }
            for role, state in self.states.items()
        }


async def check_and_report(
    generator, models: ModelsStatus, *, profile: str, at_startup: bool
) -> None:
    """Reads the catalogue (within CHECK_TIMEOUT_S) and logs what it found; at startup in
    production, raises ModelsRefused for a model that cannot be used."""
    if models.offline:
        return
    with trio.move_on_after(CHECK_TIMEOUT_S) as scope:
        await models.check(generator)
    if scope.cancelled_caught:
        models.timed_out()
    models.report(profile=profile, at_startup=at_startup)


def _date(value: str | None) -> datetime.date | None:
    if not value:
        return None
    try:
        return datetime.date.fromisoformat(str(value)[:10])
    except ValueError:
        log.warning("the model catalogue gave an unreadable shutdown_date %r", value)
        return None
