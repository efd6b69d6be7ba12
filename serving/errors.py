"""The one exception type that crosses the HTTP boundary.

Every error a client can cause is raised as `ApiError`; the ingress turns it
into a response with `status`, `headers` and the body `to_json()`. Anything
else that escapes a handler is a server bug and becomes a 500.
"""

from __future__ import annotations

import math


class ApiError(Exception):
    """A client-visible error.

    status:  HTTP status code.
    code:    short machine-readable code, e.g. "invalid_image"; stable across
             releases so clients can branch on it.
    message: one human sentence saying what was wrong and, where possible,
             what to do about it.
    headers: extra response headers (e.g. Retry-After).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})

    def to_json(self) -> dict[str, dict[str, str]]:
        """The response body: {"error": {"code": ..., "message": ...}}."""
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"

    @classmethod
    def bad_request(cls, code: str, message: str) -> ApiError:
        return cls(400, code, message)

    @classmethod
    def unauthorized(
        cls, message: str = "missing or invalid API key"
    ) -> ApiError:
        # RFC 9110 requires a challenge on every 401.
        return cls(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})

    @classmethod
    def not_found(cls, code: str, message: str) -> ApiError:
        return cls(404, code, message)

    @classmethod
    def conflict(cls, code: str, message: str) -> ApiError:
        return cls(409, code, message)

    @classmethod
    def payload_too_large(
        cls, message: str, code: str = "payload_too_large"
    ) -> ApiError:
        return cls(413, code, message)

    @classmethod
    def unsupported_media(cls, code: str, message: str) -> ApiError:
        return cls(415, code, message)

    @classmethod
    def unprocessable(cls, code: str, message: str) -> ApiError:
        return cls(422, code, message)

    @classmethod
    def overloaded(
        cls,
        retry_after_s: float,
        message: str = "the server is overloaded; retry later",
    ) -> ApiError:
        """503 with Retry-After in whole seconds (at least 1, as HTTP wants)."""
        return cls.unavailable("overloaded", message, retry_after_s)

    @classmethod
    def unavailable(cls, code: str, message: str, retry_after_s: float) -> ApiError:
        """503 with Retry-After in whole seconds (at least 1, as HTTP wants), e.g. the adapter
        store cannot be reached."""
        seconds = max(1, math.ceil(retry_after_s))
        return cls(503, code, message, {"Retry-After": str(seconds)})
