"""The per-viewer service token cache (`dynamo.viewer_points.token_cache`): how long a
token is reused, which tokens are not kept at all, one token per viewer, and the bound."""

from __future__ import annotations

import base64
import json

import pytest

from dynamo.viewer_points.token_cache import MARGIN_S, TokenCache, unverified_claims

VIEWER = ("90790024", "wasabimilkshake", "WasabiMilkshake")
START = 1_700_000_000.0  # the cache's clock when the first token arrives
LIFETIME_S = 15 * 60  # what golden-vcr/auth gives a service token


class Clock:
    def __init__(self, now: float = START):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _segment(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def jwt(claims, header=None) -> str:
    """A JWT-shaped token as the auth service issues one (the signature is not read)."""
    return ".".join([_segment(header or {"alg": "RS256", "kid": "k", "typ": "JWT"}),
                     _segment(claims), "c2lnbmF0dXJl"])


def service_token(issued: float = START, lifetime_s: float = LIFETIME_S, **more) -> str:
    return jwt({"iss": "https://goldenvcr.com/api/auth", "iat": int(issued),
                "exp": int(issued + lifetime_s), "twitch_user_id": VIEWER[0], **more})


def test_a_token_is_reused_until_a_minute_before_it_expires():
    clock = Clock()
    cache = TokenCache(clock=clock)
    token = service_token()
    assert cache.put(VIEWER, token)
    assert cache.get(VIEWER) == token
    clock.now = START + LIFETIME_S - MARGIN_S - 1
    assert cache.get(VIEWER) == token
    clock.now = START + LIFETIME_S - MARGIN_S
    assert cache.get(VIEWER) is None
    assert len(cache) == 0  # dropped, not kept around
    clock.now = START  # and not back if the clock goes back
    assert cache.get(VIEWER) is None


def test_a_short_lived_token_keeps_a_quarter_of_its_life_as_its_margin():
    clock = Clock()
    cache = TokenCache(clock=clock)
    token = service_token(lifetime_s=40)
    assert cache.put(VIEWER, token)
    clock.now = START + 29
    assert cache.get(VIEWER) == token
    clock.now = START + 30
    assert cache.get(VIEWER) is None


def test_a_token_already_within_its_margin_is_not_kept():
    cache = TokenCache(clock=Clock())
    nearly_gone = service_token(issued=START - LIFETIME_S + MARGIN_S - 1)
    assert not cache.put(VIEWER, nearly_gone)
    assert cache.get(VIEWER) is None


def test_a_clock_behind_the_auth_services_does_not_stretch_a_tokens_life():
    """Issued "5 minutes in the future" by our clock: its life is counted from its
    arrival here, not up to its `exp`."""
    clock = Clock()
    cache = TokenCache(clock=clock)
    token = service_token(issued=START + 300)
    assert cache.put(VIEWER, token)
    clock.now = START + LIFETIME_S - MARGIN_S - 1
    assert cache.get(VIEWER) == token
    clock.now = START + LIFETIME_S - MARGIN_S
    assert cache.get(VIEWER) is None


def test_without_iat_the_life_left_is_counted_from_exp():
    clock = Clock()
    cache = TokenCache(clock=clock)
    token = jwt({"exp": int(START + 600)})
    assert cache.put(VIEWER, token)
    clock.now = START + 600 - MARGIN_S - 1
    assert cache.get(VIEWER) == token
    clock.now = START + 600 - MARGIN_S
    assert cache.get(VIEWER) is None


def _not_base64_json() -> str:
    return "eyJh." + base64.urlsafe_b64encode(b"not json").decode() + ".sig"


@pytest.mark.parametrize("token", [
    "an-opaque-token",
    "only.two",
    "a.b.c.d",
    "header.!!!not-base64!!!.sig",
    _not_base64_json(),
    "h." + base64.urlsafe_b64encode(b"\xff\xfe").decode() + ".s",
    jwt(["exp", START + 900]),
    jwt({"iat": START}),
    jwt({"exp": str(int(START + 900))}),
    jwt({"exp": True}),
    jwt({"exp": None}),
    jwt({"exp": float("inf")}),
    jwt({"exp": float("nan")}),
    jwt({"exp": START - 1}),
    "h." + _segment({"exp": START + 900})[:-3] + "é.s",
])
def test_a_token_without_a_readable_future_expiry_is_not_kept(token):
    cache = TokenCache(clock=Clock())
    assert cache.put(VIEWER, service_token())
    assert not cache.put(VIEWER, token)
    # Nor is the viewer's older token used instead of the one just received.
    assert cache.get(VIEWER) is None and len(cache) == 0


def test_claims_are_read_without_the_signature():
    assert unverified_claims(service_token(sub="x")) == {
        "iss": "https://goldenvcr.com/api/auth", "iat": int(START),
        "exp": int(START + LIFETIME_S), "twitch_user_id": VIEWER[0], "sub": "x"}
    assert unverified_claims("a.b.c") is None


def test_tokens_are_kept_per_viewer_as_the_token_request_names_them():
    cache = TokenCache(clock=Clock())
    renamed = (VIEWER[0], "wasabi", "Wasabi")  # same id, another display name
    other = ("1001", "ghostfan", "GhostFan")
    tokens = {viewer: service_token(twitch_user_login=viewer[1]) for viewer in (VIEWER, renamed, other)}
    for viewer, token in tokens.items():
        assert cache.put(viewer, token)
    assert {viewer: cache.get(viewer) for viewer in tokens} == tokens
    assert cache.get(("1002", "friendfan", "FriendFan")) is None
    newer = service_token(issued=START + 1)
    assert cache.put(VIEWER, newer)
    assert cache.get(VIEWER) == newer and cache.get(other) == tokens[other]


def test_at_most_max_viewers_are_kept_the_least_recently_used_going_first():
    cache = TokenCache(max_viewers=3, clock=Clock())
    viewers = [(str(n), f"viewer{n}", f"Viewer{n}") for n in range(5)]
    tokens = [service_token(twitch_user_id=viewer[0]) for viewer in viewers]
    for viewer, token in zip(viewers[:3], tokens[:3], strict=True):
        cache.put(viewer, token)
    assert cache.get(viewers[0]) == tokens[0]  # used: now the most recent
    cache.put(viewers[3], tokens[3])
    assert len(cache) == 3
    assert cache.get(viewers[1]) is None  # the least recently used went
    assert [cache.get(viewer) for viewer in (viewers[0], viewers[2], viewers[3])] == [
        tokens[0], tokens[2], tokens[3]]
    cache.put(viewers[4], tokens[4])
    assert cache.get(viewers[0]) is None and len(cache) == 3
    with pytest.raises(ValueError):
        TokenCache(max_viewers=0)


def test_forget_drops_only_the_token_named():
    cache = TokenCache(clock=Clock())
    refused, newer = service_token(), service_token(issued=START + 1)
    cache.put(VIEWER, refused)
    cache.forget(VIEWER, refused)
    assert cache.get(VIEWER) is None
    cache.put(VIEWER, newer)
    cache.forget(VIEWER, refused)  # another request's late news about the old one
    assert cache.get(VIEWER) == newer
    cache.forget(("1", "x", "X"), refused)  # unknown viewer: nothing to do


def test_no_token_shows_in_the_caches_repr():
    cache = TokenCache(clock=Clock())
    token = service_token()
    cache.put(VIEWER, token)
    assert token not in repr(cache) and token not in repr(cache._kept)
