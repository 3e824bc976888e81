"""Typed errors → JSON answers, in one place. Every error body is ``api.schemas.ErrorBody``."""

from __future__ import annotations

import logging
import time

from flask import Flask, current_app, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from tasks.service import (IdempotencyConflict, JobFinished, JobNotFound, LimitExceeded,
                           ServiceUnavailable)

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


def drain_body(limit_bytes: int, limit_seconds: float) -> int:
    """Read and discard what is left of the request body, up to ``limit_bytes`` bytes and
    ``limit_seconds`` seconds; returns the bytes read.

    A client that sends its whole body before it reads the answer (Python's urllib, many HTTP
    libraries) gets a connection reset instead of an early answer: closing a socket with unread
    data in it makes the kernel send RST, which destroys the answer in flight. Reading the rest of
    the body first lets the answer (a 413) reach the client; past the bounds the connection is
    closed as before.
    """
    stream = request.environ.get("wsgi.input")
    if stream is None:
        return 0
    length = request.content_length
    remaining = limit_bytes if length is None else min(length, limit_bytes)
    deadline = time.monotonic() + limit_seconds
    done = 0
    try:
        while remaining > 0 and time.monotonic() < deadline:
            chunk = stream.read(min(64 * 1024, remaining))
            if not chunk:
                break
            done += len(chunk)
            remaining -= len(chunk)
    except (OSError, ValueError) as exc:  # the client went away: nothing to answer
        log.info("request body not drained: %s", exc)
    return done


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

    @app.errorhandler(LimitExceeded)
    def _limited(exc: LimitExceeded):
        from api.metrics import SUBMISSIONS_REFUSED

        SUBMISSIONS_REFUSED.labels(exc.limit).inc()
        message = str(exc)
        return error_response(429, "limit_exceeded", message,
                              [{"field": exc.limit, "message": message, "type": "limit_exceeded"}],
                              headers={"Retry-After": str(exc.retry_after_seconds)})

    @app.errorhandler(JobFinished)
    def _finished(exc: JobFinished):
        return error_response(409, "job_finished", str(exc),
                              [{"field": "job_id", "message": f"the job is {exc.state}",
                                "type": "job_finished"}])

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
        settings = current_app.extensions["stemgen.settings"]
        drain_body(settings.request_drain_bytes, settings.request_drain_seconds)
        return error_response(413, "request_entity_too_large", message,
                              [{"field": "body", "message": message, "type": "too_large"}],
                              headers={"Connection": "close"})

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
