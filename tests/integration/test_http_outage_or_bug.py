"""The HTTP API tells an outage from a bug as the rest of dynamo does (`outage_of`): a
database the port calls unreachable is 503 with Retry-After, any other failure, a bare
OSError included, is a 500 logged as an error (it used to be a 503 for any OSError)."""

from __future__ import annotations

import pytest
import trio

from dynamo.database.errors import DatabaseUnavailable
from tests.integration.test_http_api import (  # noqa: F401  (fixtures)
    ALICE,
    BROADCASTER_TOKEN,
    api,
    bearer,
    http_database,
)
from tests.support.timeouts import PORT_S as TEST_TIMEOUT_S

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("error", "status"), [
    (DatabaseUnavailable("ConnectionRefusedError: connection refused"), 503),
    (OSError("[Errno 2] not the database port's verdict"), 500),
    (KeyError("a bug"), 500),
])
async def test_an_outage_is_503_and_anything_else_500(api, monkeypatch, error, status):  # noqa: F811
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await api.store(ALICE)

        async def load_request(*args):
            raise error

        monkeypatch.setattr(api.db, "load_request", load_request)
        response = await api.client().get(f"/requests/{request_id}",
                                          headers=bearer(BROADCASTER_TOKEN))
        assert response.status_code == status
        if status == 503:
            assert response.headers["Retry-After"] == "5"
            assert await response.get_json() == {
                "error": "a dependency is unavailable; try again later"}
        else:
            assert await response.get_json() == {"error": "internal error"}
