"""Outage or bug, decided in one place (`dynamo.supervision.unavailable.outage_of`): the
ports' own `Unavailable` errors name their dependency; anything else, a bare OSError
included, is a bug (issue 19: the decision was written out in eight places, some taking
any OSError for an outage)."""

from __future__ import annotations

import pytest
import trio

from dynamo.database.errors import DatabaseUnavailable, DataRejected
from dynamo.supervision import outages, retry
from dynamo.supervision.outages import BrokerUnavailable
from dynamo.supervision.unavailable import Unavailable, http_outage, outage_of


@pytest.mark.parametrize(("error", "dependency"), [
    (DatabaseUnavailable("connection refused"), "database"),
    (BrokerUnavailable("not connected"), "broker"),
    (ExceptionGroup("two", [DatabaseUnavailable("a"), DatabaseUnavailable("b")]), "database"),
])
def test_a_ports_unavailable_error_is_its_dependencys_outage(error, dependency):
    assert outage_of(error) == dependency
    assert isinstance(error, Exception)


@pytest.mark.parametrize("error", [
    OSError("a file is missing"),  # not a port's verdict
    ConnectionError("from somewhere else"),
    DataRejected("out of range"),
    ValueError("a bug"),
    ExceptionGroup("mixed", [DatabaseUnavailable("a"), BrokerUnavailable("b")]),
    ExceptionGroup("and a bug", [DatabaseUnavailable("a"), KeyError("b")]),
])
def test_anything_else_is_not_an_outage(error):
    assert outage_of(error) is None


def test_the_ports_errors_are_the_services_own_class():
    assert issubclass(DatabaseUnavailable, Unavailable) and issubclass(BrokerUnavailable, Unavailable)
    assert outages.outage_of is outage_of  # the one function, wherever it is imported from


async def test_a_probe_that_fails_with_a_bug_is_loud_not_an_outage(autojump_clock):
    async def probe():
        raise OSError("not a port's error: a bug in the probe")

    dependency = outages.Dependency("database", probe=probe)
    dependency.went_down("test")
    with trio.fail_after(60), pytest.raises(OSError):
        await dependency.wait_until_up()


async def test_a_probe_that_finds_the_outage_goes_on_probing(autojump_clock):
    answers = [DatabaseUnavailable("still down"), DatabaseUnavailable("still down"), None]

    async def probe():
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    dependency = outages.Dependency("database", probe=probe)
    dependency.went_down("test")
    with trio.fail_after(60):
        await dependency.wait_until_up()
    assert dependency.up and not answers


@pytest.mark.parametrize(("status", "outage"), [
    (None, True), (500, True), (502, True), (503, True), (504, True),
    (429, False), (408, False), (409, False), (400, False),
])
def test_an_http_service_is_down_on_a_5xx_or_no_answer_not_on_a_refusal(status, outage):
    assert http_outage(status) is outage
    assert retry.Transient("x", status_code=status).unavailable is outage
