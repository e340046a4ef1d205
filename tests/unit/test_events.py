"""Published bodies have exactly the contract's shapes (contract §3)."""

import json
import uuid

from dynamo.domain import published as events
from dynamo.domain import viewer_messages as messages
from dynamo.domain.jobs import Job, Reason, Step, Style, Viewer

REQUEST_ID = uuid.UUID("0b5c1b0e-8f57-4a43-9d8e-0c2a3a4c5d6e")
VIEWER = Viewer("90790024", "wasabimilkshake")
VIEWER_JSON = {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"}


def ghost_job(**fields) -> Job:
    return Job(
        id=REQUEST_ID, viewer=VIEWER, style=Style.GHOST, inputs={"subject": "a seal"},
        prompt="a ghostly image of a seal, …", description="a seal", deadline=900.0,
        step=Step.ANNOUNCED, image_url=f"https://cdn.example/{REQUEST_ID}/{REQUEST_ID}-0.jpg",
        image_color="#000000", **fields,
    )


def friend_job(**fields) -> Job:
    return Job(
        id=REQUEST_ID, viewer=VIEWER, style=Style.FRIEND,
        inputs={"color": "yellow", "subject": "caterpillar in a top hat"},
        prompt="a yellow caterpillar in a top hat, …", description="a caterpillar in a top hat",
        deadline=900.0, step=Step.ANNOUNCED, name="Sir Hatsworth",
        image_url=f"https://cdn.example/{REQUEST_ID}/{REQUEST_ID}-0.webp",
        image_color="#5a3fc2", **fields,
    )


def test_ghost_onscreen_event():
    assert events.onscreen_event(ghost_job()) == {
        "type": "image",
        "payload": {
            "type": "ghost",
            "viewer": VIEWER_JSON,
            "details": {
                "image_url": f"https://cdn.example/{REQUEST_ID}/{REQUEST_ID}-0.jpg",
                "description": "a seal",
            },
        },
    }


def test_friend_onscreen_event():
    assert events.onscreen_event(friend_job()) == {
        "type": "image",
        "payload": {
            "type": "friend",
            "viewer": VIEWER_JSON,
            "details": {
                "image_url": f"https://cdn.example/{REQUEST_ID}/{REQUEST_ID}-0.webp",
                "description": "a caterpillar in a top hat",
                "name": "Sir Hatsworth",
                "background_color": "#5a3fc2",
            },
        },
    }


def test_success_results():
    assert events.success_result(ghost_job()) == {
        "request_id": str(REQUEST_ID),
        "outcome": "success",
        "viewer": VIEWER_JSON,
        "style": "ghost",
        "description": "a seal",
        "image_url": f"https://cdn.example/{REQUEST_ID}/{REQUEST_ID}-0.jpg",
    }
    assert events.success_result(friend_job()) == {
        "request_id": str(REQUEST_ID),
        "outcome": "success",
        "viewer": VIEWER_JSON,
        "style": "friend",
        "description": "a caterpillar in a top hat",
        "image_url": f"https://cdn.example/{REQUEST_ID}/{REQUEST_ID}-0.webp",
    }


def test_failure_results():
    rejected = messages.failure(Reason.REJECTED, detail="content_policy_violation")
    assert events.failure_result(ghost_job(failure=rejected)) == {
        "request_id": str(REQUEST_ID),
        "outcome": "failure",
        "viewer": VIEWER_JSON,
        "style": "ghost",
        "description": "a seal",
        "reason": "rejected",
        "message": "Your image request was rejected by the content filter. No points were spent.",
    }
    poor = messages.failure(Reason.INSUFFICIENT_POINTS)
    result = events.failure_result(friend_job(failure=poor))
    assert result["style"] == "friend"
    assert result["description"] == "a caterpillar in a top hat"
    assert result["reason"] == "insufficient-points"
    assert result["message"] == messages.VIEWER_MESSAGES[Reason.INSUFFICIENT_POINTS]


def test_result_for_invalid():
    invalid = messages.failure(Reason.INVALID, detail="payload.style: must be 'ghost' or 'friend'")
    result = events.result_for_invalid(REQUEST_ID, VIEWER, "skeleton", "", invalid)
    assert result == {
        "request_id": str(REQUEST_ID),
        "outcome": "failure",
        "viewer": VIEWER_JSON,
        "style": "skeleton",
        "description": "",
        "reason": "invalid",
        "message": messages.VIEWER_MESSAGES[Reason.INVALID],
    }
    assert events.result_for_invalid(REQUEST_ID, VIEWER, None, "", invalid)["style"] is None


def test_operator_detail_is_never_published():
    failure = messages.failure(Reason.ERROR, detail="secret stack trace")
    assert b"secret" not in events.encode(events.failure_result(ghost_job(failure=failure)))


def test_encode_is_compact_utf8():
    body = {"description": "a caf\u00e9 owl", "n": [1, 2]}
    encoded = events.encode(body)
    assert encoded == '{"description":"a caf\u00e9 owl","n":[1,2]}'.encode("utf-8")
    assert json.loads(encoded) == body


def test_failure_result_of_an_invalid_job_uses_the_raw_style():
    invalid = messages.failure(Reason.INVALID)
    job = ghost_job(failure=invalid)
    job.style, job.raw_style, job.description = None, "skeleton", ""
    assert events.failure_result(job) == events.result_for_invalid(
        REQUEST_ID, VIEWER, "skeleton", "", invalid
    )
