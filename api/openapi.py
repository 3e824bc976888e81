"""The OpenAPI 3.1 document, generated from the pydantic models that validate requests."""

from __future__ import annotations

from typing import get_args

from pydantic.json_schema import models_json_schema

from api.schemas import (
    LIST_DEFAULT_LIMIT,
    LIST_MAX_LIMIT,
    REQUEST_ID_PATTERN,
    CallbackBody,
    ErrorBody,
    GenerateRequest,
    Health,
    JobAccepted,
    JobEventData,
    JobList,
    JobState,
    JobStatus,
    StemEventData,
)
from tasks.service import EVENT_ID

_REF = "#/components/schemas/{model}"


def _json(ref: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


def build_openapi(settings) -> dict:
    """OpenAPI document for the gateway; limits that come from settings are filled in."""
    models = [GenerateRequest, JobAccepted, JobStatus, JobList, JobEventData, StemEventData,
              ErrorBody, Health, CallbackBody]
    refs, schema = models_json_schema([(m, "validation" if m is GenerateRequest else "serialization")
                                       for m in models], ref_template=_REF)
    components = schema.get("$defs", {})
    # The configured maximum duration is a runtime setting: show it in the document.
    duration = components["GenerationParameters"]["properties"]["duration_seconds"]
    for branch in duration.get("anyOf", [duration]):  # optional: [number, null]
        if branch.get("type") == "number":
            branch["maximum"] = settings.max_duration_seconds
    region = components["SourceRegion"]["properties"]["start_seconds"]
    for branch in region.get("anyOf", [region]):
        if branch.get("type") == "number":
            branch["exclusiveMaximum"] = settings.source_audio_max_seconds

    def ref(model, mode="serialization"):
        return refs[(model, mode)]["$ref"]

    error = {"$ref": ref(ErrorBody)}
    err = lambda d: {"description": d, "content": {"application/json": {"schema": error}}}  # noqa: E731
    unauthorized = err("No valid API key (only when STEMGEN_API_KEYS is set).")
    unavailable = err("Job store unreachable; retry the same request (Retry-After).")
    job_id = {"name": "job_id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": "^[A-Za-z0-9]{1,64}$"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "stemgen", "version": "0.1.0",
                 "description": "Generates guitar, bass and drum stems at a target BPM with MusicGen."},
        "paths": {
            "/generate": {"post": {
                "operationId": "generate",
                "summary": "Request stems; answered 202 with a job id (200 for a repeated request).",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": ref(GenerateRequest, "validation")}}}},
                "responses": {
                    "202": _json(ref(JobAccepted), "Job accepted."),
                    "200": _json(ref(JobAccepted), "The same request was already accepted: that job."),
                    "400": err("Body is not JSON."),
                    "409": err("generation_request_id reused by this API key with a different "
                               "body (names this key's own job)."),
                    "413": err("Body too large."),
                    "415": err("Content-Type is not application/json."),
                    "422": err("A field is invalid (callback_url included: not http(s), or not a "
                               "public address); error.fields names it."),
                    "401": unauthorized,
                    "429": {**err("A new job over one of the API key's limits; error.fields[0].field "
                                  "names it (max_active_jobs, max_submissions_per_minute)."),
                            "headers": {"Retry-After": {"description": "Seconds to wait.",
                                                        "schema": {"type": "integer"}}}},
                    "503": unavailable,
                },
                "callbacks": {"generationFinished": {"{$request.body#/callback_url}": {"post": {
                    "requestBody": {"content": {"application/json": {
                        "schema": {"$ref": ref(CallbackBody)}}}},
                    "responses": {"200": {"description": "Received."}}}}}},
            }},
            "/jobs": {"get": {
                "operationId": "listJobs",
                "summary": "The caller's jobs (submitted with its API key), newest first, a page "
                           "at a time.",
                "parameters": [
                    {"name": "status", "in": "query", "required": False,
                     "description": "Only jobs in this state.",
                     "schema": {"type": "string",
                                "enum": list(get_args(JobState))}},
                    {"name": "generation_request_id", "in": "query", "required": False,
                     "description": "Only the job of this generation_request_id.",
                     "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN}},
                    {"name": "limit", "in": "query", "required": False,
                     "description": "Most jobs in the page.",
                     "schema": {"type": "integer", "minimum": 1, "maximum": LIST_MAX_LIMIT,
                                "default": LIST_DEFAULT_LIMIT}},
                    {"name": "cursor", "in": "query", "required": False,
                     "description": "next_cursor of the previous page (opaque).",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
                ],
                "responses": {"200": _json(ref(JobList), "A page of jobs."),
                              "422": err("A query parameter is invalid (limit out of range, "
                                         "unknown status, a cursor not made here); "
                                         "error.fields names it."),
                              "401": unauthorized,
                              "503": unavailable},
            }},
            "/jobs/{job_id}": {"get": {
                "operationId": "getJob",
                "parameters": [job_id],
                "responses": {"200": _json(ref(JobStatus), "Job state."),
                              "404": err("No such job, or another API key's job."),
                              "401": unauthorized,
                              "503": unavailable},
            }, "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel the job: a queued stem never starts, a running one stops within "
                           "about a second, finished stems stay stored; the job ends `cancelled` "
                           "and its callback is sent once with that status. Idempotent.",
                "parameters": [job_id],
                "responses": {"202": _json(ref(JobStatus), "Cancellation requested (status "
                                                           "`cancelling`)."),
                              "404": err("No such job, or another API key's job."),
                              "409": err("The job already finished."),
                              "401": unauthorized,
                              "503": unavailable},
            }},
            "/jobs/{job_id}/events": {"get": {
                "operationId": "jobEvents",
                "summary": "The job's state and progress changes as Server-Sent Events, until its "
                           "final state.",
                "description": (
                    "text/event-stream. Each event has an `id` (resume with Last-Event-ID), an "
                    "`event` type and one line of JSON `data`: `job` (the job's status changed; "
                    f"data: {ref(JobEventData)}), `stem` (a stem's status changed) and "
                    f"`progress` (a running stem's progress moved, at most every 2 %; data of "
                    f"both: {ref(StemEventData)}). The stream starts with the job's stored events "
                    "(after Last-Event-ID when given), sends a comment line every "
                    "EVENTS_HEARTBEAT_SECONDS (15) while idle, and ends after the `job` event of "
                    "a final status (completed, partial, failed, cancelled)."),
                "parameters": [
                    job_id,
                    {"name": "Last-Event-ID", "in": "header", "required": False,
                     "description": "Resume after this event (sent by EventSource on reconnect).",
                     "schema": {"type": "string", "pattern": EVENT_ID.pattern}},
                ],
                "responses": {"200": {"description": "The event stream.",
                                      "content": {"text/event-stream": {
                                          "schema": {"type": "string"}}}},
                              "404": err("No such job, or another API key's job."),
                              "422": err("Last-Event-ID is not an event id."),
                              "401": unauthorized,
                              "503": unavailable},
            }},
            "/health": {"get": {"operationId": "health", "responses": {
                "200": _json(ref(Health), "Broker and storage reachable (status degraded: no worker)."),
                "503": _json(ref(Health), "Broker or storage unreachable."),
                "401": unauthorized}}},
            "/health/live": {"get": {"operationId": "live", "security": [], "responses": {
                "200": {"description": "Process alive."}}}},
            "/health/ready": {"get": {"operationId": "ready", "security": [], "responses": {
                "200": {"description": "Broker and storage reachable (details only with a key)."},
                "503": {"description": "Broker or storage unreachable."}}}},
        },
        # Every operation needs an API key unless it says otherwise (security: []).
        "security": [{"bearerAuth": []}, {"apiKeyHeader": []}],
        "components": {"schemas": components, "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer",
                           "description": "Authorization: Bearer <one of STEMGEN_API_KEYS>"},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }},
    }
