"""A fake Discord webhook: execute-webhook with JSON or multipart bodies.

`POST /api/webhooks/{id}/{token}` (also `/api/v10/...` and the bare `/webhooks/...`;
endpoint name "webhook") takes either a JSON body or multipart/form-data with a
`payload_json` part and `files[n]` parts, as Discord does. Every accepted post is kept in
`fake.messages` with its parsed payload and files. As the real API: 204 with no body,
or 200 with the message object when the URL has `?wait=true`; 400 with a Discord error
code for an empty message or an unreadable payload.

`fake.script([429, 500])` makes the next posts fail: 429 with Discord's rate-limit body
and headers (retry after `fake.retry_after_s`), others with `{"message","code"}`.
"""

from __future__ import annotations

import io
import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.formparser import parse_form_data

from ._service import Call, FakeService, json_response

# Discord's rate-limit answers usually ask for a fraction of a second.
RETRY_AFTER_S = 0.25
# The (id, token) of the two webhooks `env()` configures.
GHOSTS_WEBHOOK = ("1001", "ghosts-token")
FRIENDS_WEBHOOK = ("1002", "friends-token")


@dataclass
class DiscordFile:
    field: str  # e.g. "files[0]"
    filename: str
    content_type: str
    data: bytes


@dataclass
class DiscordMessage:
    webhook_id: str
    token: str
    payload: dict[str, Any]
    files: list[DiscordFile] = field(default_factory=list)
    message_id: str = ""


def _snowflake() -> str:
    return str(secrets.randbits(62))


def _discord_error(message: str, code: int, status: int) -> Response:
    return json_response({"message": message, "code": code}, status)


class FakeDiscord(FakeService):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[DiscordMessage] = []
        self.retry_after_s = RETRY_AFTER_S

    def webhook_url(self, webhook_id: str = "1234567890", token: str = "fake-webhook-token") -> str:
        return f"{self.url}/api/webhooks/{webhook_id}/{token}"

    def env(self) -> dict[str, str]:
        return {
            "DISCORD_GHOSTS_WEBHOOK_URL": self.webhook_url(*GHOSTS_WEBHOOK),
            "DISCORD_FRIENDS_WEBHOOK_URL": self.webhook_url(*FRIENDS_WEBHOOK),
        }

    def messages_to(self, webhook_id: str) -> list[DiscordMessage]:
        return [message for message in self.messages if message.webhook_id == webhook_id]

    def script(self, endpoint_or_statuses: Any, statuses: Any = None) -> None:
        """`script([429, 500])`, or `script("webhook", [...])` like the other fakes."""
        if statuses is None:
            endpoint_or_statuses, statuses = "webhook", endpoint_or_statuses
        super().script(endpoint_or_statuses, statuses)

    def build_app(self) -> QuartTrio:
        app = QuartTrio(__name__)

        async def execute(webhook_id: str, token: str, **_: Any) -> Response:
            wait = request.args.get("wait", "false").lower() == "true"
            return await self.receive(
                "webhook", lambda call: self._execute(call, webhook_id, token, wait), parse_json=False
            )

        for rule in ("/webhooks/<webhook_id>/<token>", "/api/webhooks/<webhook_id>/<token>",
                     "/api/v<int:version>/webhooks/<webhook_id>/<token>"):  # fmt: skip
            app.add_url_rule(rule, view_func=execute, methods=["POST"], endpoint=rule)
        return app

    def outage_response(self, call: Call) -> Response:
        return _discord_error("503: Service Unavailable", 0, 503)

    def scripted_response(self, call: Call, status: Any) -> Response:
        if int(status) == 429:
            retry = self.retry_after_s
            body = {"message": "You are being rate limited.", "retry_after": retry, "global": False}
            headers = {
                "retry-after": f"{retry:g}",
                "x-ratelimit-limit": "5",
                "x-ratelimit-remaining": "0",
                "x-ratelimit-reset-after": f"{retry:g}",
                "x-ratelimit-bucket": "fakebucket",
                "x-ratelimit-scope": "user",
            }
            return json_response(body, 429, headers)
        texts = {400: "400: Bad Request", 401: "401: Unauthorized", 404: "Unknown Webhook",
                 500: "500: Internal Server Error", 502: "502: Bad Gateway"}  # fmt: skip
        code = 10015 if int(status) == 404 else 0
        return _discord_error(texts.get(int(status), f"{status}: Scripted failure"), code, int(status))

    async def _execute(self, call: Call, webhook_id: str, token: str, wait: bool) -> Response:
        content_type = call.headers.get("content-type", "")
        files: list[DiscordFile] = []
        try:
            if content_type.startswith("multipart/form-data"):
                environ = {
                    "wsgi.input": io.BytesIO(call.raw),
                    "CONTENT_LENGTH": str(len(call.raw)),
                    "CONTENT_TYPE": content_type,
                    "REQUEST_METHOD": "POST",
                }
                _, form, uploads = parse_form_data(environ)
                payload = json.loads(form.get("payload_json", "{}"))
                for name, upload in uploads.items(multi=True):
                    files.append(DiscordFile(name, upload.filename or "", upload.mimetype, upload.read()))
            elif content_type.startswith("application/json"):
                payload = json.loads(call.raw)
            else:
                return _discord_error("Invalid Form Body", 50035, 400)
        except ValueError:
            return _discord_error("Invalid Form Body", 50035, 400)
        if not isinstance(payload, dict):
            return _discord_error("Invalid Form Body", 50035, 400)
        call.body = payload
        if not (payload.get("content") or payload.get("embeds") or files):
            return _discord_error("Cannot send an empty message", 50006, 400)
        message = DiscordMessage(webhook_id, token, payload, files, _snowflake())
        self.messages.append(message)
        if not wait:
            return Response("", status=204)
        return json_response(self._message_object(message))

    def _message_object(self, message: DiscordMessage) -> dict[str, Any]:
        payload = message.payload
        return {
            "id": message.message_id,
            "type": 0,
            "content": payload.get("content", ""),
            "channel_id": "555000111",
            "author": {"id": message.webhook_id, "username": payload.get("username", "Captain Hook"), "bot": True},
            "attachments": [
                {
                    "id": _snowflake(),
                    "filename": f.filename,
                    "size": len(f.data),
                    "content_type": f.content_type,
                    "url": f"https://cdn.discordapp.com/attachments/555000111/{message.message_id}/{f.filename}",
                }
                for f in message.files
            ],
            "embeds": payload.get("embeds", []),
            "timestamp": datetime.now(UTC).isoformat(),
            "webhook_id": message.webhook_id,
        }
