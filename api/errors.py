"""Typed errors → JSON answers, in one place. Every error body is ``api.schemas.ErrorBody``."""

from __future__ import annotations

import logging

from flask import Flask, current_app, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from tasks.jobstore import IdempotencyConflict, JobNotFound
from tasks.service import ServiceUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered with ``status`` and a JSON body."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields or []
        self.headers = headers or {}


def field_errors(exc: ValidationError) -> list[dict]:
    """pydantic errors as ``{"field": "parameters.target_bpm", "message": ..., "type": ...}``."""
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        path = ".".join(str(p) for p in err["loc"]) or "body"
        out.append({"field": path, "message": err["msg"], "type": err["type"]})
    return out


def error_response(status: int, code: str, message: str, fields: list[dict] | None = None,
                   headers: dict[str, str] | None = None):
    body = {"error": {"status": status, "code": code, "message": message, "fields": fields or []}}
    return jsonify(body), status, headers or {}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.fields, exc.headers)

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError):
        fields = field_errors(exc)
        names = ", ".join(f["field"] for f in fields)
        return error_response(422, "validation_error", f"invalid request: {names}", fields)

    @app.errorhandler(IdempotencyConflict)
    def _conflict(exc: IdempotencyConflict):
        return error_response(409, "idempotency_conflict", str(exc),
                              [{"field": "generation_request_id", "message": str(exc),
                                "type": "conflict"}])

    @app.errorhandler(JobNotFound)
    def _not_found(exc: JobNotFound):
        return error_response(404, "not_found", f"no job {exc.args[0]!r}")

    @app.errorhandler(ServiceUnavailable)
    def _unavailable(exc: ServiceUnavailable):
        log.warning("service unavailable: %s", exc)
        return error_response(503, "service_unavailable",
                              "the service cannot take requests right now; retry the same request",
                              headers={"Retry-After": "5"})

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge):
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        message = f"the body is larger than {limit} bytes (MAX_REQUEST_BYTES)"
        return error_response(413, "request_entity_too_large", message,
                              [{"field": "body", "message": message, "type": "too_large"}])

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        # Keep what the exception adds (Allow on 405), not its HTML content type.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return error_response(exc.code or 500, code, exc.description or exc.name, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
