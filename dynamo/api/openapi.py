"""The OpenAPI 3.1 document served at GET /openapi.json, describing the routes of
`submit_routes`, `requests_routes` and `ops_routes` as they behave (tests/test_openapi.py
checks the answers against it; tests/test_http_api.py that it names every route)."""

from __future__ import annotations

import functools

from dynamo import genreq, prompts
from dynamo.api import requests_routes, submit_routes
from dynamo.jobs import Reason, State, Step, Style

# Ids are stored in PostgreSQL `integer` columns.
_INT32_MAX = 2**31 - 1
_VIEWER_FIELD = {
    "type": "string",
    "minLength": 1,
    "maxLength": genreq.MAX_VIEWER_FIELD_CHARS,
    "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$",
}
_SUBJECT = {
    "type": "string",
    "minLength": 1,
    "maxLength": genreq.MAX_SUBJECT_CHARS,
    "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$",
    "description": "Trimmed before the length is checked; control characters are invalid.",
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _errors(*statuses: int) -> dict:
    return {str(status): {"$ref": f"#/components/responses/E{status}"} for status in statuses}


_ERROR_MEANINGS = {
    400: "The request is invalid; `error` says which field and why.",
    401: "No bearer token, or the token was refused.",
    403: "The caller's role does not allow this.",
    404: "No such resource, or not one the caller may see.",
    409: "Conflicts with the resource's current state or an earlier Idempotency-Key use.",
    413: f"The body is larger than {submit_routes.MAX_BODY_BYTES} bytes.",
    415: "The body is not `application/json`.",
    503: "A dependency (auth service, database) is unavailable; retry later.",
}

_SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Viewer": {
        "type": "object",
        "required": ["twitch_user_id", "twitch_display_name"],
        "properties": {"twitch_user_id": _VIEWER_FIELD, "twitch_display_name": _VIEWER_FIELD},
    },
    "GhostPayload": {
        "type": "object",
        "required": ["style", "inputs"],
        "properties": {
            "style": {"const": Style.GHOST.value},
            "inputs": {
                "type": "object",
                "required": ["subject"],
                "properties": {"subject": _SUBJECT},
            },
        },
    },
    "FriendPayload": {
        "type": "object",
        "required": ["style", "inputs"],
        "properties": {
            "style": {"const": Style.FRIEND.value},
            "inputs": {
                "type": "object",
                "required": ["color", "subject"],
                "properties": {"color": {"enum": list(prompts.COLORS)}, "subject": _SUBJECT},
            },
        },
    },
    "Payload": {"oneOf": [_ref("GhostPayload"), _ref("FriendPayload")]},
    "GenreqMessage": {
        "type": "object",
        "required": ["type", "viewer", "payload"],
        "description": "A golden-vcr `genreq` message, as `dispatch` publishes it.",
        "properties": {
            "type": {"const": "image"},
            "viewer": _ref("Viewer"),
            "state": {
                "type": "object",
                "description": "broadcast_id 0 and the nil screening_id mean none.",
                "properties": {
                    "broadcast_id": {"type": "integer", "minimum": 0, "maximum": _INT32_MAX},
                    "screening_id": {"type": "string", "format": "uuid"},
                    "tape_id": {"type": "integer", "minimum": 0},
                },
            },
            "payload": _ref("Payload"),
        },
    },
    "NewRequest": {
        "description": "A whole `genreq` message (any viewer for a broadcaster; a viewer "
        "only for themselves), or the short form `{style, inputs}` for the "
        "caller. A body with any of `type`, `viewer`, `state`, `payload` is "
        "read as a whole message.",
        "anyOf": [_ref("GenreqMessage"), _ref("Payload")],
    },
    "Accepted": {
        "type": "object",
        "required": ["id", "state", "url"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "state": {"enum": [state.value for state in State]},
            "url": {"type": "string", "description": "`/requests/{id}`"},
        },
    },
    "Request": {
        "type": "object",
        "required": [
            "id",
            "state",
            "step",
            "style",
            "inputs",
            "prompt",
            "viewer",
            "created_at",
            "finished_at",
            "images",
            "name",
            "failure",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "state": {"enum": [state.value for state in State]},
            "step": {
                "enum": [step.value for step in Step],
                "description": "The last step the request persisted.",
            },
            "style": {
                "type": "string",
                "description": "ghost or friend (anything for an invalid request from the broker)",
            },
            "inputs": {"type": "object"},
            "prompt": {"type": "string"},
            "viewer": {
                "type": "object",
                "required": ["twitch_user_id", "twitch_display_name"],
                "properties": {
                    "twitch_user_id": {"type": "string"},
                    "twitch_display_name": {"type": "string"},
                },
            },
            "created_at": {"type": "string", "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
            "images": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["url", "color"],
                    "properties": {
                        "url": {"type": "string"},
                        "color": {"type": "string", "description": "#rrggbb"},
                    },
                },
            },
            "name": {"type": ["string", "null"], "description": "A friend's generated name."},
            "cost_usd": {
                "type": "number",
                "minimum": 0,
                "description": "What the request's OpenAI calls cost, by the price table.",
            },
            "openai_calls": {
                "type": "array",
                "description": "GET /requests/{id} only: each answered OpenAI call.",
                "items": _ref("OpenAICall"),
            },
            "failure": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["reason", "message"],
                        "properties": {
                            "reason": {"enum": [reason.value for reason in Reason]},
                            "message": {
                                "type": "string",
                                "description": "A sentence fit to show the viewer.",
                            },
                        },
                    },
                ],
            },
        },
    },
    "RequestPage": {
        "type": "object",
        "required": ["requests", "next"],
        "properties": {
            "requests": {"type": "array", "items": _ref("Request")},
            "next": {
                "type": ["string", "null"],
                "description": "Cursor for the next page (`before=`); null on the last.",
            },
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "checks"],
        "properties": {
            "ready": {"type": "boolean"},
            "checks": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Each dependency: `ok` or what is wrong.",
            },
            "error": {"type": "string", "description": "Present when not ready."},
        },
    },
    "Status": {
        "type": "object",
        "required": [
            "actors",
            "channels",
            "rate_limiter",
            "requests",
            "orphan_debits",
            "in_flight",
        ],
        "properties": {
            "actors": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["name", "state", "restarts", "last_error"],
                    "properties": {
                        "name": {"type": "string"},
                        "state": {"enum": ["starting", "running", "restarting", "stopped"]},
                        "restarts": {"type": "integer", "minimum": 0},
                        "last_error": {"type": ["string", "null"]},
                    },
                },
            },
            "channels": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["used", "capacity"],
                    "properties": {
                        "used": {"type": "integer", "minimum": 0},
                        "capacity": {"type": ["integer", "null"], "minimum": 0},
                    },
                },
            },
            "rate_limiter": {"type": ["object", "null"]},
            "requests": {
                "type": "object",
                "additionalProperties": {"type": "integer"},
                "description": "Requests by state.",
            },
            "orphan_debits": {
                "type": "integer",
                "minimum": 0,
                "description": "Debits that may be pending at the ledger "
                "without their id stored: reconcile them.",
            },
            "in_flight": {"type": "integer", "minimum": 0},
            "fleet": {
                "type": ["object", "null"],
                "description": "Every live process sharing the database (id, host, pid, "
                "http_addr, heartbeat_age_s, requests_in_hand, its share of the OpenAI "
                "budget over the last 60 s) and the fleet's totals.",
            },
            "models": {
                "description": "The configured models as the API's catalogue knows them.",
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["image", "text"],
                        "properties": {"image": _ref("ModelState"), "text": _ref("ModelState")},
                    },
                ],
            },
            "spend": {"oneOf": [{"type": "null"}, _ref("Spend")]},
        },
    },
    "OpenAICall": {
        "type": "object",
        "required": ["kind", "model", "usage", "cost_usd", "created_at"],
        "properties": {
            "kind": {"enum": ["image", "name", "moderation"]},
            "model": {"type": "string"},
            "usage": {"type": "object", "description": "The answer's `usage`, as sent."},
            "cost_usd": {"type": "number", "minimum": 0},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "ModelState": {
        "type": "object",
        "required": ["id", "state", "shutdown_date", "days_left"],
        "properties": {
            "id": {"type": "string"},
            "state": {
                "enum": [
                    "ok",
                    "retiring",
                    "shut-down",
                    "unknown",
                    "unreachable",
                    "unchecked",
                    "offline",
                ]
            },
            "shutdown_date": {"type": ["string", "null"], "format": "date"},
            "days_left": {"type": ["integer", "null"]},
            "checked_at": {"type": ["string", "null"], "format": "date-time"},
            "error": {"type": ["string", "null"]},
        },
    },
    "Spend": {
        "type": "object",
        "required": ["today_usd", "month_usd", "daily_budget_usd", "paused", "paused_until"],
        "properties": {
            "today_usd": {"type": "number", "minimum": 0},
            "month_usd": {"type": "number", "minimum": 0},
            "daily_budget_usd": {"type": ["number", "null"], "minimum": 0},
            "paused": {"type": "boolean"},
            "paused_until": {"type": ["string", "null"], "format": "date-time"},
        },
    },
}

_REQUEST_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_PUBLIC: list = []  # `security: []`: no token needed


def _paths() -> dict:
    page_size = requests_routes.MAX_PAGE_SIZE
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness: 200 while the process runs.",
                "security": _PUBLIC,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "ok"}},
                        },
                        "Alive.",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the database, and where configured the broker and the "
                "input queue's consumer.",
                "security": _PUBLIC,
                "responses": {
                    "200": _json(_ref("Readiness"), "Ready."),
                    "503": _json(_ref("Readiness"), "Not ready; `checks` says why."),
                },
            }
        },
        "/requests": {
            "post": {
                "summary": "Submit an image request.",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "Per caller: a retry with the same body answers the first "
                        "request; another body with the same key is 409.",
                        "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewRequest")}},
                },
                "responses": {
                    "202": _json(
                        _ref("Accepted"),
                        "Stored and queued.",
                        {
                            "Location": {"required": True, "schema": {"type": "string"}},
                            "Idempotent-Replayed": {
                                "schema": {"const": "true"},
                                "description": "Set when this answers an earlier request.",
                            },
                        },
                    ),
                    **_errors(400, 401, 403, 409, 413, 415, 503),
                },
            },
            "get": {
                "summary": "List requests, newest first (a viewer sees only their own).",
                "parameters": [
                    {
                        "name": "viewer",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "A Twitch user id; for a viewer, only their own.",
                    },
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"enum": [state.value for state in State]},
                    },
                    {
                        "name": "style",
                        "in": "query",
                        "schema": {"enum": [style.value for style in Style]},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "description": f"Page size, default {requests_routes.DEFAULT_PAGE_SIZE}; "
                        f"more than {page_size} gives {page_size}.",
                        "schema": {"type": "integer", "minimum": 1},
                    },
                    {
                        "name": "before",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "The `next` cursor of the previous page.",
                    },
                ],
                "responses": {
                    "200": _json(_ref("RequestPage"), "One page."),
                    **_errors(400, 401, 403, 503),
                },
            },
        },
        "/requests/{id}": {
            "parameters": [_REQUEST_ID],
            "get": {
                "summary": "One request (its viewer's, or any for the broadcaster).",
                "responses": {
                    "200": _json(_ref("Request"), "The request."),
                    **_errors(401, 404, 503),
                },
            },
            "delete": {
                "summary": "Cancel a request whose image is not yet being generated; its "
                "points are refunded and the viewer is told (broadcaster only).",
                "responses": {
                    "202": _json(_ref("Request"), "Cancelled; refund under way."),
                    **_errors(401, 403, 404, 409, 503),
                },
            },
        },
        "/status": {
            "get": {
                "summary": "Actors, channels, the rate limiter, counts (broadcaster only).",
                "responses": {
                    "200": _json(_ref("Status"), "The service's state."),
                    **_errors(401, 403, 503),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics.",
                "security": _PUBLIC,
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/images/{key}": {
            "get": {
                "summary": "An image, when images are stored locally (development).",
                "security": _PUBLIC,
                "parameters": [
                    {
                        "name": "key",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "`{id}/{id}-0.jpg`",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The image.",
                        "content": {
                            media: {"schema": {"type": "string", "contentMediaType": media}}
                            for media in ("image/jpeg", "image/webp", "image/png")
                        },
                    },
                    **_errors(404),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "security": _PUBLIC,
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
    }


@functools.cache
def document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dynamo",
            "version": "1.0.0",
            "description": 'Golden VCR image alerts. Errors are `{"error": "..."}`.',
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A Twitch user access token, checked with the auth service; "
                    "or DYNAMO_ADMIN_TOKEN without one (a broadcaster).",
                }
            },
            "schemas": _SCHEMAS,
            "responses": {
                f"E{status}": _json(
                    _ref("Error"),
                    meaning,
                    {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}
                    if status == 401
                    else None,
                )
                for status, meaning in _ERROR_MEANINGS.items()
            },
        },
    }
