"""Bearer-key authentication for the `/v1/*` routes.

With `BLOCKSERVE_API_KEYS` set, a request needs `Authorization: Bearer <one of the keys>`;
keys are compared in constant time (`hmac.compare_digest`) and every key is tried, so timing
reveals neither which key nor how much of one matched. Health, readiness and metrics routes
don't use this dependency and stay open; `/readyz` shows why a model failed to load (paths,
exception text) only to a caller `is_authorized` accepts. Not handled: per-key scopes or
quotas.
"""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import APIError

bearer_scheme = HTTPBearer(auto_error=False, description="One of BLOCKSERVE_API_KEYS.")


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    given_bytes = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode())
    return matched


def _bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def is_authorized(request: Request) -> bool:
    """Whether `request` could call the `/v1/*` routes: auth is off, or it has a valid key."""
    keys: tuple[str, ...] = request.app.state.service.settings.api_keys
    if not keys:
        return True
    given = _bearer_key(request)
    return given is not None and key_matches(given, keys)


async def require_api_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),  # noqa: B008
) -> None:
    """FastAPI dependency: 401 unless auth is off or the bearer key is one of the keys."""
    keys: tuple[str, ...] = request.app.state.service.settings.api_keys
    if not keys:
        return
    if credentials is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", None,
                       "missing_api_key", {"WWW-Authenticate": "Bearer"})
    if not key_matches(credentials.credentials, keys):
        raise APIError(401, "invalid API key", None, "invalid_api_key",
                       {"WWW-Authenticate": "Bearer"})
