"""Bearer-key check for every protected route (constant-time comparison)."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from ._admission import current_client
from ._errors import Unauthorized


def key_matches(presented: str, keys: list[str]) -> bool:
    """Compare against every configured key so timing reveals neither which key nor how much matched."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


def client_fingerprint(key: str) -> str:
    """How logs, metrics and rate limits name a key holder: a short hash, never the key itself."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:10]


async def require_key(request: Request) -> None:
    """Check the Bearer key (when keys are set) and name the client for admission control."""
    keys: list[str] = request.app.state.api_keys
    if not keys:
        current_client.set("addr:" + (request.client.host if request.client else "unknown"))
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing 'Authorization: Bearer <key>' header")
    if not key_matches(token.strip(), keys):
        raise Unauthorized("invalid API key")
    current_client.set(client_fingerprint(token.strip()))
