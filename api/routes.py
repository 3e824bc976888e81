"""Blueprints: generate (POST /generate), jobs (GET /jobs/<id>), health, openapi."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from api.errors import ApiError
from api.openapi import build_openapi
from api.schemas import GenerateRequest, JobAccepted, JobStatus

generate_bp = Blueprint("generate", __name__)
jobs_bp = Blueprint("jobs", __name__)
health_bp = Blueprint("health", __name__)
openapi_bp = Blueprint("openapi", __name__)


def _service():
    return current_app.extensions["stemgen.service"]


def _settings():
    return current_app.extensions["stemgen.settings"]


def _json_body() -> object:
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)",
                       [{"field": "Content-Type", "message": "expected application/json", "type": "content_type"}])
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "invalid_json", "the body is not valid JSON",
                       [{"field": "body", "message": "not valid JSON", "type": "json_invalid"}])
    return body


def _status_url(job_id: str) -> str:
    base = _settings().public_base_url or request.host_url
    return f"{base.rstrip('/')}/jobs/{job_id}"


@generate_bp.post("/generate")
def generate():
    """Validate, record (idempotent on generation_request_id) and enqueue a stem job."""
    settings = _settings()
    parsed = GenerateRequest.model_validate(
        _json_body(), context={"max_duration_seconds": settings.max_duration_seconds})
    callback_url = str(parsed.callback_url) if parsed.callback_url else (settings.default_callback_url or None)
    submission = _service().submit(parsed.model_dump(mode="json"), callback_url)
    job = _service().get(submission.job_id)
    body = JobAccepted(job_id=submission.job_id, generation_request_id=parsed.generation_request_id,
                       status=job["status"], status_url=_status_url(submission.job_id),
                       stems=parsed.target_stems)
    response = jsonify(body.model_dump(mode="json"))
    response.status_code = 202 if submission.created else 200
    response.headers["Location"] = body.status_url
    return response


@jobs_bp.get("/jobs/<job_id>")
def job_status(job_id: str):
    """State, per-stem progress and, once done, stem URLs."""
    if len(job_id) > 64 or not job_id.isalnum():
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    job = _service().get(job_id)
    return jsonify(JobStatus.model_validate(job).model_dump(mode="json"))


@health_bp.get("/health/live")
def live():
    """The process serves requests."""
    return jsonify({"status": "ok"})


@health_bp.get("/health/ready")
def ready():
    """Ready when the broker (and job store) and blob storage answer."""
    service = _service()
    broker, storage = service.broker_health(), service.storage_health()
    ok = broker.ok and storage.ok
    body = {"status": "ok" if ok else "unavailable",
            "broker": vars(broker), "storage": vars(storage)}
    return jsonify(body), 200 if ok else 503


@health_bp.get("/health")
def health():
    """Broker, storage and the workers that answer (with their model and device)."""
    service = _service()
    broker, storage = service.broker_health(), service.storage_health()
    workers = service.workers() if broker.ok else []
    if not (broker.ok and storage.ok):
        status, code = "unavailable", 503
    elif not workers:
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    return jsonify({"status": status, "broker": vars(broker), "storage": vars(storage),
                    "workers": workers}), code


@openapi_bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 document, generated from api.schemas."""
    return jsonify(build_openapi(_settings()))
