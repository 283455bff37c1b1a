"""Bearer-key check for every protected route (constant-time comparison)."""

from __future__ import annotations

import hmac

from fastapi import Request

from ._errors import Unauthorized


def key_matches(presented: str, keys: list[str]) -> bool:
    """Compare against every configured key so timing reveals neither which key nor how much matched."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


async def require_key(request: Request) -> None:
    keys: list[str] = request.app.state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing 'Authorization: Bearer <key>' header")
    if not key_matches(token.strip(), keys):
        raise Unauthorized("invalid API key")
