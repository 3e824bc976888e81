"""The OpenAPI 3.1 document, generated from the pydantic models that validate requests."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from api.schemas import (
    CallbackBody,
    ErrorBody,
    GenerateRequest,
    Health,
    JobAccepted,
    JobStatus,
)

_REF = "#/components/schemas/{model}"


def _json(ref: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


def build_openapi(settings) -> dict:
    """OpenAPI document for the gateway; limits that come from settings are filled in."""
    models = [GenerateRequest, JobAccepted, JobStatus, ErrorBody, Health, CallbackBody]
    refs, schema = models_json_schema([(m, "validation" if m is GenerateRequest else "serialization")
                                       for m in models], ref_template=_REF)
    components = schema.get("$defs", {})
    # The configured maximum duration is a runtime setting: show it in the document.
    duration = components["GenerationParameters"]["properties"]["duration_seconds"]
    duration["maximum"] = settings.max_duration_seconds

    def ref(model, mode="serialization"):
        return refs[(model, mode)]["$ref"]

    error = {"$ref": ref(ErrorBody)}
    err = lambda d: {"description": d, "content": {"application/json": {"schema": error}}}  # noqa: E731
    unauthorized = err("No valid API key (only when STEMGEN_API_KEYS is set).")
    unavailable = err("Job store unreachable; retry the same request (Retry-After).")
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
                    "409": err("generation_request_id reused with a different body."),
                    "413": err("Body too large."),
                    "415": err("Content-Type is not application/json."),
                    "422": err("A field is invalid (callback_url included: not http(s), or not a "
                               "public address); error.fields names it."),
                    "401": unauthorized,
                    "503": unavailable,
                },
                "callbacks": {"generationFinished": {"{$request.body#/callback_url}": {"post": {
                    "requestBody": {"content": {"application/json": {
                        "schema": {"$ref": ref(CallbackBody)}}}},
                    "responses": {"200": {"description": "Received."}}}}}},
            }},
            "/jobs/{job_id}": {"get": {
                "operationId": "getJob",
                "parameters": [{"name": "job_id", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": "^[A-Za-z0-9]{1,64}$"}}],
                "responses": {"200": _json(ref(JobStatus), "Job state."),
                              "404": err("No such job."),
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
