"""Errors as OpenAI's API returns them: `{"error": {"message", "type", "param", "code"}}`
with the HTTP status a client's retry logic expects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runtime.errors import AudioError, BundleError, ContextLengthError, RuntimeUserError


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_user_error(err: RuntimeUserError, param: str | None = None) -> ApiError:
    """The runtime's one-line user errors (the same messages as `runtime.infer`) as 400s."""
    if isinstance(err, ContextLengthError):
        return ApiError(400, str(err), param="max_tokens", code="context_length_exceeded")
    if isinstance(err, AudioError):
        return ApiError(400, str(err), param=param or "file", code="invalid_audio")
    if isinstance(err, BundleError):
        return ApiError(500, str(err), type="server_error", code="bundle_error")
    return ApiError(400, str(err), param=param)


def unavailable(message: str, retry_after_s: int, code: str) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after_s)})


def as_api_error(call: Callable[[], Any], param: str | None = None) -> Any:
    """Run a runtime check or step; its user error becomes the API error with the same message."""
    try:
        return call()
    except RuntimeUserError as err:
        raise from_user_error(err, param) from None
