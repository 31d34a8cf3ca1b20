"""Bearer tokens → principals. Settings hold only SHA-256 hashes of the tokens; a request's token is hashed and
looked up. Jobs belong to the principal that created them; another principal is told the job does not exist."""

import hashlib
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

PREFIX = "sha256:"
bearer = HTTPBearer(auto_error=False, description="a token configured in SAN_TOKENS (stored as its hash)")


def hash_token(token: str) -> str:
    return PREFIX + hashlib.sha256(token.encode()).hexdigest()


def principals_by_hash(tokens: dict[str, str]) -> dict[str, str]:
    """``{"alice": "sha256:…"}`` → ``{"sha256:…": "alice"}``; a value that is not a hash is refused."""
    by_hash = {}
    for principal, hashed in tokens.items():
        if not hashed.startswith(PREFIX) or len(hashed) != len(PREFIX) + 64:
            raise ValueError(f"SAN_TOKENS[{principal!r}] is not a sha256:<64 hex> hash (see 'san jobs hash-token')")
        by_hash[hashed] = principal
    return by_hash


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


async def principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """The caller's principal; 401 without a known token. Async: a plain ``def`` dependency would hop to the
    threadpool on every request for a dictionary lookup."""
    if credentials is None:
        raise unauthorized("missing bearer token (Authorization: Bearer <token>)")
    found = request.app.state.parts.principals.get(hash_token(credentials.credentials))
    if found is None:
        raise unauthorized("unknown bearer token")
    return found


Principal = Annotated[str, Depends(principal)]


def known_principal(request: Request) -> str | None:
    """The principal of the request's bearer token when it is a known one, else None (no 401: for open routes that
    say more to a known caller)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return request.app.state.parts.principals.get(hash_token(token.strip()))
