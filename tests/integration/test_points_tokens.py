"""The viewer's service token, kept and reused, end to end (issue 18): dynamo runs as
`python run.py` against the real RabbitMQ and PostgreSQL and the fake OpenAI, auth and
ledger. One token serves all of a viewer's ledger calls; one the ledger stops accepting
is replaced, and the call made once more, without a second debit; no token is logged."""

from __future__ import annotations

import json

import pytest
import trio

from dynamo.rabbitmq import broker as topology
from tests.support.checks import VIEWER, genreq
from tests.support.service import started
from tests.support.timeouts import SERVICE_S

pytestmark = pytest.mark.integration


def bearers(fake_ledger) -> list[str]:
    return [call.headers["authorization"].removeprefix("Bearer ") for call in fake_ledger.calls]


async def test_a_viewers_requests_share_one_token_and_a_refused_one_is_replaced(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger):
    with trio.fail_after(SERVICE_S):
        service = await started(dynamo_process, rabbit=rabbit)
        await rabbit.publish(genreq("a seal"))
        await rabbit.publish(genreq("a walrus"))
        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 2)
        assert [json.loads(result.body)["outcome"] for result in results] == ["success"] * 2
        # Two reservations and two accepts: one token, asked for once.
        assert fake_auth.count("service-token") == 1
        [token] = fake_auth.issued
        assert sorted(call.endpoint for call in fake_ledger.calls) == [
            "accept", "accept", "outflow", "outflow"]
        assert bearers(fake_ledger) == [token] * 4

        # The ledger no longer accepts it (its middleware refuses before the handler):
        # a new token, and the reservation made once more.
        fake_ledger.script("outflow", [401])
        await rabbit.publish(genreq("a narwhal"))
        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 3)
        third = json.loads(results[2].body)
        assert third["outcome"] == "success", third
        assert fake_auth.count("service-token") == 2
        renewed = list(fake_auth.issued)[1]
        assert fake_ledger.statuses("outflow") == [200, 200, 401, 200]
        assert bearers(fake_ledger)[4:] == [token, renewed, renewed]  # refused, again, accept
        [flow] = fake_ledger.flows_for(third["request_id"])
        assert flow.state == "accepted" and fake_ledger.pending() == []
        assert len(fake_ledger.accepted()) == 3
        assert fake_ledger.available(VIEWER["twitch_user_id"]) == 1000 - 3 * 200

    logs = service.logs()
    assert "refused the viewer's kept service token" in logs
    assert not any(issued in logs for issued in fake_auth.issued)
