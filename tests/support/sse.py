"""A reader of server-sent events (the live page's stream) for tests and benchmarks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx


async def events(response: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    """(event name, decoded data) for each event of a streaming response."""
    name, data = None, []
    async for line in response.aiter_lines():
        if line == "":
            if name is not None:
                yield name, json.loads("\n".join(data))
            name, data = None, []
        elif line.startswith(":"):
            continue  # a keepalive comment
        elif line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].lstrip())


async def ticket(client: httpx.AsyncClient, base_url: str, token: str) -> str:
    response = await client.post(f"{base_url}/events/tickets",
                                 headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response.json()["ticket"]
