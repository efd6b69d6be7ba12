"""Bearer-token auth for writes (`PUT` / `DELETE /v1/adapters/...`).

The server keeps only the sha256 of the token (`TokenCheck`), so the token itself never travels in
deployment arguments, and compares digests with `hmac.compare_digest` (constant time: the time a
check takes says nothing about how much of a guess was right).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from petserve.serving.errors import ApiError


@dataclass(frozen=True)
class ResolvedToken:
    token: str
    generated: bool          # True: nobody chose it, so print it for the operator


def resolve_token(explicit: str | None, env_var: str) -> ResolvedToken:
    """The explicit token, else the environment variable, else a fresh random one."""
    if explicit:
        return ResolvedToken(explicit, False)
    from_env = os.environ.get(env_var, "")
    if from_env:
        return ResolvedToken(from_env, False)
    return ResolvedToken(secrets.token_urlsafe(24), True)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenCheck:
    """Checks `Authorization: Bearer <token>` headers against a token's sha256 digest."""

    digest: str

    @classmethod
    def for_token(cls, token: str) -> TokenCheck:
        return cls(token_digest(token))

    def require(self, authorization: str | None) -> None:
        """Return if the header carries the token; else raise ApiError 401."""
        if not authorization:
            raise ApiError.unauthorized(
                "this operation needs an 'Authorization: Bearer <token>' header")
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError.unauthorized(
                "the Authorization header must look like 'Bearer <token>'")
        presented_digest = token_digest(presented.strip())
        if not hmac.compare_digest(presented_digest.encode(), self.digest.encode()):
            raise ApiError.unauthorized("invalid token")
