"""Sentences shown to viewers when their request fails, one per failure reason."""

from dynamo.domain.jobs import Failure, Reason

VIEWER_MESSAGES = {
    Reason.REJECTED: "Your image request was rejected by the content filter. No points were spent.",
    Reason.INSUFFICIENT_POINTS: "You don't have enough Golden VCR Fun Points for an image alert.",
    Reason.INVALID: "Your image request could not be understood. No points were spent.",
    Reason.EXPIRED: "Your image request took too long and was cancelled. No points were spent.",
    Reason.CANCELLED: "Your image request was cancelled by the broadcaster. No points were spent.",
    Reason.ERROR: "Something went wrong while making your image. No points were spent.",
}


def failure(reason: Reason, detail: str = "") -> Failure:
    """A failure with the viewer-facing sentence for `reason` and an operator `detail`."""
    return Failure(reason=reason, message=VIEWER_MESSAGES[reason], detail=detail)
