"""Blueprints: generate (POST /generate), jobs (GET /jobs, GET /jobs/<id>,
GET /jobs/<id>/events), health, openapi."""

from __future__ import annotations

import functools
import logging
import threading

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import BadRequest
from werkzeug.sansio.utils import get_current_url

from api.auth import authenticated, caller_key_id, job_scope
from api.errors import ApiError
from api.events import EventHub, event_stream
from api.openapi import build_openapi
from api.schemas import GenerateRequest, JobAccepted, JobList, JobListQuery, JobStatus
from tasks.callback_target import CallbackHostUnresolvable, CallbackPolicy, UnsafeCallbackURL, check_url
from tasks.service import EVENT_ID, InvalidCursor

log = logging.getLogger(__name__)

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
    try:
        return request.get_json()
    except RecursionError:  # json's decoder gives up on very deep nesting (within MAX_REQUEST_BYTES)
        reason = "nested too deeply"
    except BadRequest as exc:
        if exc.code != 400:  # 413 from MAX_CONTENT_LENGTH
            raise
        reason = "not valid JSON"
    raise ApiError(400, "invalid_json", f"the body is {reason}",
                   [{"field": "body", "message": reason, "type": "json_invalid"}])


def _check_outbound_url(url: str, field: str = "callback_url") -> None:
    """The SSRF guard at submission (tasks.callback_target), for the callback URL and the source
    audio URL. A host that does not resolve now is accepted: DNS trouble may be passing, and the
    worker checks (and retries) again."""
    try:
        check_url(url, _callback_policy())
    except UnsafeCallbackURL as exc:
        raise ApiError(422, "validation_error", f"invalid request: {field}",
                       [{"field": field, "message": str(exc),
                         "type": f"{field.rsplit('.', 1)[-1]}_refused"}])
    except CallbackHostUnresolvable as exc:
        log.info("accepting a callback URL that does not resolve now: %s", exc)


def _callback_policy() -> CallbackPolicy:
    return current_app.extensions["stemgen.callback_policy"]


def _status_url(job_id: str) -> str:
    base = _settings().public_base_url or _host_url(request.scheme, request.host)
    return f"{base.rstrip('/')}/jobs/{job_id}"


def _check_job_id(job_id: str) -> None:
    """404 without a look-up for an id no job can have."""
    if len(job_id) > 64 or not job_id.isalnum() or not job_id.isascii():
        raise ApiError(404, "not_found", f"no job {job_id!r}")


_HUB_LOCK = threading.Lock()


def _event_hub() -> EventHub:
    """The app's one EventHub (per process: made on the first events request, after the fork)."""
    hub = current_app.extensions.get("stemgen.event_hub")
    if hub is None:
        with _HUB_LOCK:
            hub = current_app.extensions.get("stemgen.event_hub")
            if hub is None:
                hub = current_app.extensions["stemgen.event_hub"] = EventHub(_service().event_feed)
    return hub


@functools.lru_cache(maxsize=64)
def _host_url(scheme: str, host: str) -> str:
    """``request.host_url`` (werkzeug's IRI-to-URI encoding of scheme and validated host), cached:
    it is the same for every request through one front end, and it showed in the gateway profile."""
    return get_current_url(scheme, host)


@generate_bp.post("/generate")
def generate():
    """Validate, record (idempotent on generation_request_id) and enqueue a stem job."""
    settings = _settings()
    parsed = GenerateRequest.model_validate(
        _json_body(), context={"max_duration_seconds": settings.max_duration_seconds,
                               "beats_per_bar": settings.beats_per_bar,
                               "source_audio_max_seconds": settings.source_audio_max_seconds})
    if parsed.callback_url:
        callback_url = str(parsed.callback_url)
        _check_outbound_url(callback_url)
    else:  # the operator's default is checked at start-up (api.create_app) and at delivery
        callback_url = settings.default_callback_url or None
    if parsed.parameters.source_audio_url:
        _check_outbound_url(str(parsed.parameters.source_audio_url), "parameters.source_audio_url")
    served = settings.served_models
    if parsed.parameters.model is None:
        parsed.parameters.model = served[0]  # recorded: the dispatcher routes by it
    elif parsed.parameters.model not in served:
        message = f"not served here; choose one of: {', '.join(served)}"
        raise ApiError(422, "validation_error", "invalid request: parameters.model",
                       [{"field": "parameters.model", "message": message, "type": "model_not_served"}])
    # The key's identifier goes with the job (GET /jobs lists a caller's own jobs).
    submission = _service().submit(parsed.model_dump(mode="json"), callback_url,
                                   owner=caller_key_id())
    body = JobAccepted(job_id=submission.job_id, generation_request_id=parsed.generation_request_id,
                       status=submission.status, status_url=_status_url(submission.job_id),
                       stems=parsed.target_stems)
    response = jsonify(body.model_dump(mode="json"))
    response.status_code = 202 if submission.created else 200
    response.headers["Location"] = body.status_url
    return response


@jobs_bp.get("/jobs")
def list_jobs():
    """The caller's jobs (those submitted with its API key; all jobs for an admin key, and when
    the API is open), newest first, a page at a time."""
    query = JobListQuery.model_validate(request.args.to_dict())  # a repeated parameter: the first
    scope = job_scope()
    try:
        page = _service().list_jobs("*" if scope is None and caller_key_id() else caller_key_id(),
                                    status=query.status,
                                    generation_request_id=query.generation_request_id,
                                    limit=query.limit, cursor=query.cursor)
    except InvalidCursor as exc:
        raise ApiError(422, "validation_error", "invalid request: cursor",
                       [{"field": "cursor", "message": str(exc), "type": "cursor_invalid"}])
    jobs = []
    for job in page.jobs:
        status_url = _status_url(job["job_id"])
        jobs.append({**job, "status_url": status_url, "events_url": f"{status_url}/events"})
    return jsonify(JobList.model_validate({"jobs": jobs, "next_cursor": page.next_cursor})
                   .model_dump(mode="json"))


@jobs_bp.get("/jobs/<job_id>")
def job_status(job_id: str):
    """State, per-stem progress and, once done, stem URLs (404 for another key's job)."""
    _check_job_id(job_id)
    job = _service().get(job_id, job_scope())
    return jsonify(JobStatus.model_validate(job).model_dump(mode="json"))


@jobs_bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str):
    """Cancel the job (202 with its state, ``cancelling``); 409 once it has finished; 404 for
    another key's job."""
    _check_job_id(job_id)
    job = _service().cancel(job_id, job_scope())
    response = jsonify(JobStatus.model_validate(job).model_dump(mode="json"))
    response.status_code = 202
    return response


@jobs_bp.get("/jobs/<job_id>/events")
def job_events(job_id: str):
    """The job's state and progress changes as Server-Sent Events, until its final state
    (api.events); ``Last-Event-ID`` resumes after that event."""
    _check_job_id(job_id)
    after = request.headers.get("Last-Event-ID", "").strip() or None
    if after is not None and not EVENT_ID.match(after):
        raise ApiError(422, "validation_error", "invalid request: Last-Event-ID",
                       [{"field": "Last-Event-ID", "message": "not an event id of this stream "
                         "(<milliseconds>-<sequence>)", "type": "event_id"}])
    service = _service()
    hub = _event_hub()
    with hub.setup_slots:  # a reconnect storm must not take the Redis pool (api.events)
        job = service.get(job_id, job_scope())  # 404 (also another key's job), 503
        subscription = hub.subscribe(job_id)  # before the backlog is read: nothing falls between
        try:
            backlog = service.job_events(job_id, after)
            hub.ready(subscription, backlog[-1].id if backlog else (after or "0-0"))
        except BaseException:
            hub.unsubscribe(subscription)
            raise
    stream = event_stream(hub, subscription, backlog, after=after, job_status=job["status"],
                          heartbeat_seconds=_settings().events_heartbeat_seconds)
    response = Response(stream, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    # Also when the client leaves before the stream started (a generator not started has no finally).
    response.call_on_close(lambda: hub.unsubscribe(subscription))
    return response


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
    if not authenticated():  # open to probes: no error details (host names, exception text)
        body = {"status": body["status"], "broker": {"ok": broker.ok}, "storage": {"ok": storage.ok}}
    return jsonify(body), 200 if ok else 503


@health_bp.get("/health")
def health():
    """Broker, storage, the workers that answer (with their model and device) and the served
    models with the workers holding each."""
    service = _service()
    broker, storage = service.broker_health(), service.storage_health()
    workers = service.workers() if broker.ok else []
    if not (broker.ok and storage.ok):
        status, code = "unavailable", 503
    elif not any(w.get("ready", True) for w in workers):  # none, or only hung ones (exiting)
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    settings = _settings()
    models = [{"model": model, "default": i == 0, "queue": settings.stems_queue_for(model),
               "workers": [w["name"] for w in workers if w.get("model") == model]}
              for i, model in enumerate(settings.served_models)]
    return jsonify({"status": status, "broker": vars(broker), "storage": vars(storage),
                    "workers": workers, "models": models, "outbox": service.outbox()}), code


@openapi_bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 document, generated from api.schemas."""
    return jsonify(build_openapi(_settings()))
