"""stemgen's Prometheus alert rules, on the metrics of api/metrics.py and tasks/metrics.py.

Durations are written ``{10m}`` in an expression (and as ``for``): ``rule_groups(scale)`` multiplies
every one of them, so a test can run the same rules with windows of seconds (the production file,
deploy/monitoring/alerts.yaml, is ``scale=1``). Each alert's runbook is the section
``docs/operations.md#<alert name, lower case>``.

Scrape conventions the rules rely on (docs/operations.md, "Scraping"): the gateways' ``/metrics``
under ``job="stemgen-gateway"``; the workers' metrics port under ``job="stemgen-worker"`` with
``role="generation"`` (queue stems) or ``role="callbacks"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GATEWAY_JOB = "stemgen-gateway"
WORKER_JOB = "stemgen-worker"
#: Where each alert's runbook_url points: its section of docs/operations.md (build.py --runbook-base
#: puts the address where an operator reads the docs before it).
RUNBOOK = "docs/operations.md#{anchor}"

_DURATION = re.compile(r"\{(\d+)([smh])\}")
_UNIT = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Alert:
    name: str
    severity: str  # "critical" pages; "warning" goes to a ticket queue
    expr: str  # PromQL, durations as {10m}
    for_: str  # "{10m}", or "" for at once
    summary: str
    description: str


ALERTS: tuple[Alert, ...] = (
    Alert("StemgenOutboxBacklogGrowing", "warning",
          "max(deriv(stemgen_outbox_jobs[{10m}])) > 0"
          " and max(min_over_time(stemgen_outbox_jobs[{10m}])) > 0",
          "{10m}", "The outbox backlog has been growing for 10 minutes",
          "The backlog grows by {{ $value | humanize }} jobs/s: the dispatchers fall behind."),
    Alert("StemgenOutboxOverdue", "critical",
          "max(stemgen_outbox_overdue_seconds) > 300",
          "{5m}", "An accepted job has waited over 5 minutes for a dispatcher",
          "The oldest outbox entry is {{ $value | humanizeDuration }} overdue: no dispatcher runs."),
    Alert("StemgenQueueWaitHigh", "warning",
          "histogram_quantile(0.9, sum by (task, le) (rate(stemgen_queue_wait_seconds_bucket[{10m}])))"
          " > 300",
          "{10m}", "Tasks {{ $labels.task }} wait over 5 minutes in the queue (p90)",
          "p90 queue wait of {{ $labels.task }}: {{ $value | humanizeDuration }}."),
    Alert("StemgenStemFailuresHigh", "warning",
          "sum(rate(stemgen_stems_failed_total[{15m}]))"
          " / (sum(rate(stemgen_stems_failed_total[{15m}]))"
          " + (sum(rate(stemgen_stems_generated_total[{15m}])) or vector(0))) > 0.05",
          "{10m}", "Over 5 % of stems fail for good",
          "{{ $value | humanizePercentage }} of the stems of the last 15 minutes failed after their retries."),
    Alert("StemgenCallbacksFailing", "warning",
          'sum(rate(stemgen_callback_deliveries_total{outcome!="success"}[{10m}]))'
          " / sum(rate(stemgen_callback_deliveries_total[{10m}])) > 0.5",
          "{10m}", "Most callback attempts fail",
          "{{ $value | humanizePercentage }} of the callback attempts of the last 10 minutes failed."),
    Alert("StemgenCallbacksGivenUp", "warning",
          "sum by (reason) (increase(stemgen_callbacks_failed_total[{1h}])) > 0",
          "", "Callbacks were given up ({{ $labels.reason }})",
          "About {{ $value | humanize }} callbacks were marked failed in the last hour (reason {{ $labels.reason }})."),
    Alert("StemgenNoReadyWorker", "critical",
          "(count by (model) (max_over_time(stemgen_model_load_seconds[{6h}]))"
          " unless on (model) count by (model) (stemgen_model_load_seconds))"
          " and on () sum(increase(stemgen_jobs_accepted_total[{15m}])) > 0",
          "{10m}", "No ready worker holds {{ $labels.model }} while jobs arrive",
          "No worker has loaded {{ $labels.model }} for 10 minutes although jobs are accepted."),
    Alert("StemgenWorkerNotReady", "warning",
          f'(up{{job="{WORKER_JOB}", role="generation"}} == 1)'
          " unless on (instance) stemgen_model_load_seconds",
          "{30m}", "Generation worker {{ $labels.instance }} has not loaded its model in 30 minutes",
          "The worker answers scrapes but exports no stemgen_model_load_seconds: still loading, or stuck."),
    Alert("StemgenScaleToZeroStuck", "critical",
          "sum(increase(stemgen_jobs_accepted_total[{30m}])) > 0"
          f' unless on () count(up{{job="{WORKER_JOB}", role="generation"}} == 1) > 0',
          "{15m}", "Jobs are accepted but no generation worker runs",
          "Jobs were accepted in the last 30 minutes and no generation worker has been up for 15."),
    Alert("StemgenGatewayErrors", "critical",
          'sum(rate(stemgen_http_requests_total{status=~"5..", route!~"/health.*"}[{5m}]))'
          ' / sum(rate(stemgen_http_requests_total{route!~"/health.*"}[{5m}])) > 0.01',
          "{5m}", "Over 1 % of the gateway's answers are 5xx",
          "{{ $value | humanizePercentage }} of the gateway's answers were 5xx in the last 5 minutes."),
    Alert("StemgenGatewayLatencyHigh", "warning",
          "histogram_quantile(0.99, sum by (le) (rate("
          'stemgen_http_request_duration_seconds_bucket{route!~"/health.*|/metrics"}[{5m}]))) > 0.5',
          "{10m}", "The gateway's p99 latency is above 500 ms",
          "p99 time to the response headers: {{ $value | humanizeDuration }}."),
    Alert("StemgenRedisUnreachable", "critical",
          "min(stemgen_job_store_up) == 0",
          "{1m}", "A gateway cannot reach the job store (Redis)",
          "The job store did not answer a gateway's outbox query for a minute."),
    Alert("StemgenTargetDown", "warning",
          f'up{{job=~"{GATEWAY_JOB}|{WORKER_JOB}"}} == 0',
          "{5m}", "{{ $labels.job }} {{ $labels.instance }} cannot be scraped",
          "Prometheus has not scraped {{ $labels.instance }} for 5 minutes."),
)


def scale_duration(text: str, scale: float) -> str:
    """``"10m"`` times ``scale``, as whole seconds (at least 1 s) or unchanged at scale 1."""
    match = re.fullmatch(r"(\d+)([smh])", text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    if scale == 1:
        return text
    return f"{max(1, round(int(match.group(1)) * _UNIT[match.group(2)] * scale))}s"


def _durations(text: str, scale: float) -> str:
    return _DURATION.sub(lambda m: scale_duration(m.group(1) + m.group(2), scale), text)


def rule_groups(scale: float = 1.0, interval: str | None = None, runbook_base: str = "") -> dict:
    """The rule file's content (``{"groups": [...]}``, Prometheus' rule file format; also the
    ``spec`` of the PrometheusRule). ``scale`` multiplies every window and ``for``; ``interval``
    sets the group's evaluation interval (default: Prometheus' global one); ``runbook_base`` is put
    before each runbook_url."""
    rules = []
    for alert in ALERTS:
        rule = {"alert": alert.name, "expr": _durations(alert.expr, scale)}
        if alert.for_:
            rule["for"] = _durations(alert.for_, scale)
        rule["labels"] = {"severity": alert.severity}
        rule["annotations"] = {"summary": alert.summary, "description": alert.description,
                               "runbook_url": runbook_base + RUNBOOK.format(anchor=alert.name.lower())}
        rules.append(rule)
    group = {"name": "stemgen", "rules": rules}
    if interval:
        group["interval"] = interval
    return {"groups": [group]}
