"""Optional API keys: with `api_keys` set (CAPTIONER_API_KEYS="k1,k2"), every /v1/* route needs one of them, as
`Authorization: Bearer KEY` or `X-API-Key: KEY`; without, 401 with the service's JSON error. Unset: no check.

The routes take `dependencies=API_KEY`. The health probes, the page and its static files never do: a load
balancer and a browser must reach them without a secret. The security schemes also give /docs its Authorize button.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

bearer_scheme = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY`, one of CAPTIONER_API_KEYS")
key_header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False,
                                 description="`X-API-Key: KEY`, one of CAPTIONER_API_KEYS")


def key_matches(given: str, keys: Iterable[str]) -> bool:
    """Constant time: every key is compared (no early exit), on SHA-256 digests so that neither the position of
    the first differing byte nor the keys' lengths show in the timing."""
    digest = hashlib.sha256(given.encode()).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return matched


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    header_key: Annotated[str | None, Security(key_header_scheme)],
) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    given = bearer.credentials if bearer is not None else header_key
    if not given:
        raise HTTPException(401, "this server needs an API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                            headers={"WWW-Authenticate": "Bearer"})
    if not key_matches(given, keys):
        raise HTTPException(401, "the API key is not valid",
                            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


API_KEY = [Depends(require_api_key)]  # `dependencies=API_KEY` on every /v1/* route
