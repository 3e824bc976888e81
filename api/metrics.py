"""The gateway's Prometheus metrics (``GET /metrics``) and per-request instrumentation.

Under gunicorn the workers are separate processes: prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by deploy/gunicorn.conf.py before the workers start) has each
worker write its samples to files there, and ``/metrics`` on any worker adds them up. Without the
variable (tests, ``flask run``) the process's own registry is served.

Metrics (all prefixed ``stemgen_``; docs/operations.md, "Metrics and logs"):

- ``http_requests_total{method, route, status}``: requests answered. ``route`` is the Flask URL
  rule (``/jobs/<job_id>``), ``unmatched`` for paths no rule matches; ``method`` is one of the
  HTTP methods or ``other``: the label sets stay bounded whatever clients send.
- ``http_request_duration_seconds{method, route}``: time to the response's headers (a streamed
  body, ``/jobs/<id>/events``, is not included).
- ``jobs_accepted_total``: jobs recorded by ``POST /generate`` (202; a repeated
  ``generation_request_id`` answered 200 is not counted again).
- ``submissions_refused_total{limit}``: submissions answered 429 for a key's limit
  (``max_active_jobs``, ``max_submissions_per_minute``).
- ``outbox_jobs`` / ``outbox_overdue_seconds`` / ``job_store_up``: read from the job store at
  each scrape: jobs waiting for the dispatcher and how late the oldest is.

``/metrics`` needs an API key as every endpoint but the probes does (api.auth): Prometheus sends
one with ``authorization: {credentials_file: …}`` in the scrape config. ``GATEWAY_METRICS_ENABLED=false``
removes the route.

Each request also opens a log scope (stemgen_logging): its lines carry ``method``, ``route``,
``job_id`` (from the URL or, for ``POST /generate``, the answer) and ``duration_seconds``, and an
accepted job is logged with its ``job_id`` and ``generation_request_id``.
"""

from __future__ import annotations

import logging
import os
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

import stemgen_logging

log = logging.getLogger(__name__)

metrics_bp = Blueprint("metrics", __name__)

#: Seconds: a request is a Redis script (ms); a slow one is the tail that matters.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
GENERATE_ENDPOINT = "generate.generate"

REQUESTS = Counter("stemgen_http_requests", "HTTP requests answered by the gateway",
                   ["method", "route", "status"])
LATENCY = Histogram("stemgen_http_request_duration_seconds",
                    "Time from a request's arrival to its response's headers",
                    ["method", "route"], buckets=LATENCY_BUCKETS)
JOBS_ACCEPTED = Counter("stemgen_jobs_accepted", "Jobs recorded by POST /generate (answered 202)")
SUBMISSIONS_REFUSED = Counter("stemgen_submissions_refused",
                              "Submissions refused (429) for an API key's limit", ["limit"])


def init_app(app: Flask, settings) -> None:
    """Time and count every request, open its log scope, and serve /metrics (unless disabled).
    Call before api.auth.init_app, so that refused requests are timed from their start too."""
    if settings.gateway_metrics_enabled:
        app.register_blueprint(metrics_bp)
    app.before_request(_start)
    app.after_request(_finish)
    app.teardown_request(_end_scope)


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


def _start() -> None:
    g.stemgen_started = time.perf_counter()
    job_id = (request.view_args or {}).get("job_id")
    g.stemgen_log_scope = stemgen_logging.scope(method=request.method, route=_route(),
                                                job_id=job_id if isinstance(job_id, str) else None)


def _finish(response: Response) -> Response:
    started = g.get("stemgen_started")
    method = request.method if request.method in METHODS else "other"
    route = _route()
    REQUESTS.labels(method, route, str(response.status_code)).inc()
    if started is not None:
        LATENCY.labels(method, route).observe(time.perf_counter() - started)
    if request.endpoint == GENERATE_ENDPOINT and response.status_code in (200, 202):
        _log_submission(response)
    return response


def _log_submission(response: Response) -> None:
    body = response.get_json(silent=True) or {}
    job_id, request_id = body.get("job_id"), body.get("generation_request_id")
    stemgen_logging.bind(job_id=job_id, generation_request_id=request_id)
    if response.status_code == 202:
        JOBS_ACCEPTED.inc()
        log.info("job %s accepted: %s", job_id, ",".join(body.get("stems") or []))
    else:
        log.info("job %s already recorded for this generation_request_id (%s)", job_id,
                 body.get("status"))


def _end_scope(_exc=None) -> None:
    stemgen_logging.end_scope(g.pop("stemgen_log_scope", None))


class OutboxCollector:
    """The outbox backlog, read from the job store at scrape time (JobService.outbox)."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        outbox = getattr(self.service, "outbox", None)
        backlog = outbox() if outbox is not None else None
        up = GaugeMetricFamily("stemgen_job_store_up",
                               "1 when the job store answered this scrape's outbox query")
        up.add_metric([], 0 if backlog is None else 1)
        yield up
        if backlog is None:
            return
        yield GaugeMetricFamily("stemgen_outbox_jobs", "Jobs waiting in the outbox to be dispatched",
                                value=backlog["pending"])
        yield GaugeMetricFamily("stemgen_outbox_overdue_seconds",
                                "How long the most overdue outbox entry has been due",
                                value=backlog["overdue_seconds"])


def scrape_registry(service) -> CollectorRegistry:
    """What one scrape serves: every worker's samples (multiprocess mode) or this process's, and
    the outbox backlog."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ProcessRegistry())
    registry.register(OutboxCollector(service))
    return registry


class _ProcessRegistry:
    """The default registry as one collector of another registry."""

    def collect(self):
        return REGISTRY.collect()


@metrics_bp.get("/metrics")
def metrics():
    """Prometheus text exposition format."""
    registry = scrape_registry(current_app.extensions["stemgen.service"])
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
