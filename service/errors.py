"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`APIError` is what routes raise for an expected failure (a client's mistake, a model still
loading, a full queue); `install_error_handlers` renders it, FastAPI's own validation errors and
Starlette's HTTP errors (unknown route, wrong method) in that one shape. Unexpected exceptions
are not handled here: `service.middleware` logs them with the request id and answers a plain 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the API returns."""

    error: ErrorDetail


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class APIError(Exception):
    """An expected failure, answered with `status` and a message naming the field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _error_type(status), "param": param,
                      "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def from_validation_errors(
    errors: list[Any], accepted: list[str] | None = None, status: int = 400
) -> APIError:
    """The first pydantic error as an `APIError` naming the field (and what it accepts)."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "missing":
        return APIError(status, f"missing required parameter '{param}'", param,
                        "missing_required_parameter")
    if kind == "extra_forbidden":
        known = f"; accepted: {', '.join(accepted)}" if accepted else ""
        return APIError(status, f"unknown parameter '{param}'{known}", param,
                        "unknown_parameter")
    if kind in ("json_invalid", "json_type"):
        return APIError(status, f"request body is not valid JSON: {first.get('msg')}", None,
                        "invalid_json")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(status, f"invalid '{param}': {message}" if param else message, param,
                    "invalid_value")


def validation_error(error: ValidationError, model: type[BaseModel]) -> APIError:
    return from_validation_errors(error.errors(), accepted=list(model.model_fields))


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (one route per method, as FastAPI has)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def request_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation_errors(list(exc.errors())))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(APIError(exc.status_code, message, None,
                                       codes.get(exc.status_code), headers))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
