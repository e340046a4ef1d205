"""`python run.py` with an empty environment: embedded PostgreSQL, offline generator,
local images, no points, and a generated admin token printed once."""

from __future__ import annotations

import io
import re

import httpx
import trio
from PIL import Image

from tests.support.service import ServiceProcess

GHOST = {"style": "ghost", "inputs": {"subject": "a seal"}}


async def _admin_token(service: ServiceProcess) -> str:
    while True:
        if match := re.search(r"generated DYNAMO_ADMIN_TOKEN for this run: (\S+)", service.logs()):
            return match.group(1)
        await trio.sleep(0.1)


async def test_empty_environment_serves_a_ghost_end_to_end(tmp_path):
    service = ServiceProcess({}, tmp_path)
    del service.env["DYNAMO_DATA_DIR"]  # the default, ./.dynamo in the working directory
    service.start()
    try:
        with trio.fail_after(120):
            await service.wait_ready()
            token = await _admin_token(service)
            logs = service.logs()
            for system in ("RabbitMQ", "PostgreSQL", "OpenAI", "auth", "storage"):
                assert re.search(rf"WARNING .*{system}.* not configured", logs), system
            assert "OFFLINE GENERATOR" in logs
            async with httpx.AsyncClient(base_url=service.url) as client:
                refused = await client.post("/requests", json=GHOST)
                assert refused.status_code == 401
                answer = await client.post("/requests", json=GHOST,
                                           headers={"authorization": f"Bearer {token}"})
                assert answer.status_code == 202, answer.text
                url = answer.json()["url"]
                while (request := (await client.get(url, headers={
                        "authorization": f"Bearer {token}"})).json())["state"] != "succeeded":
                    assert request["state"] != "failed", request
                    await trio.sleep(0.1)
                [image] = request["images"]
                assert image["url"].startswith(f"{service.url}/images/{request['id']}/")
                picture = await client.get(image["url"])
            assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
            decoded = Image.open(io.BytesIO(picture.content))
            assert decoded.format == "JPEG" and decoded.size == (1024, 1024)
            assert (tmp_path / ".dynamo" / "postgres").is_dir()
            assert token not in service.logs().replace(
                f"generated DYNAMO_ADMIN_TOKEN for this run: {token}", "")  # printed once only
            assert await service.terminate() == 0
    finally:
        service.kill()
