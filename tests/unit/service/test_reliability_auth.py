"""Admin authentication in-process: the token comparison is constant-time (`hmac.compare_digest` decides every
attempt). tests/integration/test_reliability_auth.py checks the refusals and the secrets against a real server.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from types import SimpleNamespace

from fastapi.security import HTTPAuthorizationCredentials
from pydantic import SecretStr

from vlltr.service.api.deps import require_admin
from vlltr.service.api.errors import ApiError

# Random per run, as the server tests' token.
TOKEN = "tok-" + uuid.uuid4().hex + "-" + uuid.uuid4().hex


class _CompareSpy:
    """Calls through to the real `hmac.compare_digest` (or returns a forced answer) and records each call."""

    def __init__(self, real, forced: bool | None = None) -> None:
        self.real = real
        self.forced = forced
        self.calls: list[tuple[bytes, bytes]] = []

    def __call__(self, a, b) -> bool:
        self.calls.append((a, b))
        return self.real(a, b) if self.forced is None else self.forced


def _request(token: str | None) -> SimpleNamespace:
    settings = SimpleNamespace(admin_token=SecretStr(token) if token is not None else None)
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(settings=settings)))


def _check(token: str, given: str) -> int:
    try:
        asyncio.run(require_admin(_request(token), HTTPAuthorizationCredentials(scheme="Bearer", credentials=given)))
    except ApiError as exc:
        return exc.status
    return 200


def test_token_comparison_is_constant_time(monkeypatch):
    # Constant time means the decision is hmac.compare_digest's, made on the whole token every time, whatever
    # the length or prefix of the guess. Timing assertions would be flaky on shared cores; instead, every
    # attempt must go through compare_digest, and its answer alone must decide.
    real = hmac.compare_digest
    spy = _CompareSpy(real)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    guesses = ["", "t", TOKEN[:10], TOKEN[:-1], TOKEN + "x", "x" * len(TOKEN), TOKEN]
    statuses = [_check(TOKEN, g) if g else 401 for g in guesses]
    assert statuses == [401, 403, 403, 403, 403, 403, 200]
    assert spy.calls == [(g.encode(), TOKEN.encode()) for g in guesses if g]

    # If compare_digest says no, the right token is refused; if it says yes, a wrong one passes: nothing else
    # (no early length check, no == on a prefix) takes part in the decision.
    monkeypatch.setattr(hmac, "compare_digest", _CompareSpy(real, forced=False))
    assert _check(TOKEN, TOKEN) == 403
    monkeypatch.setattr(hmac, "compare_digest", _CompareSpy(real, forced=True))
    assert _check(TOKEN, "a-different-length-guess") == 200
    # No token configured: class changes need none (the embedded default), and nothing is compared.
    spy = _CompareSpy(real)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    asyncio.run(require_admin(_request(None), None))
    assert spy.calls == []
