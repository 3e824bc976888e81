"""stemgen's Grafana dashboard, built with grafana-foundation-sdk (Grafana Labs' builders for
dashboards as code, Apache-2.0). build.py writes it as JSON to
deploy/k8s/components/monitoring/dashboard.json; tests/monitoring checks that every query names a
metric the code exports.

Rows: jobs (accepted, finished by state, stems, outbox backlog), generation (queue wait and
generation time by model, audio seconds per second, batch sizes, GPU memory), callbacks and the
gateway. A worker's model comes from its ``stemgen_model_load_seconds{model}`` (exported once the
model is loaded), joined on ``instance`` to the metrics that have no model label.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef

import json

from deploy.monitoring.alerts import GATEWAY_JOB, WORKER_JOB

UID = "stemgen-overview"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
#: Each worker instance's model, for the metrics that carry none.
MODEL_OF_INSTANCE = "on (instance) group_left (model) max by (instance, model) (stemgen_model_load_seconds)"


def _query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def _panel(title: str, description: str, unit: str, queries: list[tuple[str, str]], *,
           width: int = 8, stacked: bool = False) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).span(width).height(8).fill_opacity(10)
             .legend(common_builder.VizLegendOptions().show_legend(True)
                     .display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM)))
    if stacked:
        panel = panel.stacking(common_builder.StackingConfig().mode(common.StackingMode.NORMAL))
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + index)))
    return panel


def _quantiles(metric: str, by: str, selector: str = "", join: str = "") -> list[tuple[str, str]]:
    """p50 and p90 of a histogram, by ``by``; ``join`` multiplies the rates by a label join."""
    rate = f"rate({metric}_bucket{selector}[{RATE}])"
    if join:
        rate = f"{rate} * {join}"
    return [(f"histogram_quantile({q}, sum by (le, {by}) ({rate}))", f"p{int(q * 100)} {{{{{by}}}}}")
            for q in (0.5, 0.9)]


def build() -> dict:
    """The dashboard as Grafana's JSON model (a dict)."""
    board = (
        dash.Dashboard("stemgen").uid(UID).tags(["stemgen"]).refresh("30s").time("now-6h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR).readonly()
        .description("Jobs, generation, callbacks and the gateway of stemgen (deploy/monitoring/dashboard.py)")
        .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_row(dash.Row("Jobs"))
        .with_panel(_panel(
            "Jobs accepted and finished", "Jobs per second: accepted by POST /generate (202), and given "
            "their final state by finalize_request, by state.", "reqps", [
                (f"sum(rate(stemgen_jobs_accepted_total[{RATE}]))", "accepted"),
                (f"sum by (status) (rate(stemgen_jobs_finished_total[{RATE}]))", "{{status}}"),
            ]))
        .with_panel(_panel(
            "Stems", "Stems per second: completed (uploaded) and failed for good, by stem.", "ops", [
                (f"sum by (stem) (rate(stemgen_stems_generated_total[{RATE}]))", "completed {{stem}}"),
                (f"sum by (stem) (rate(stemgen_stems_failed_total[{RATE}]))", "failed {{stem}}"),
            ], stacked=True))
        .with_panel(_panel(
            "Outbox backlog", "Jobs waiting for a dispatcher (read from the job store at each scrape; "
            "every gateway reports the same store) and how late the oldest is.", "short", [
                ("max(stemgen_outbox_jobs)", "jobs"),
                ("max(stemgen_outbox_overdue_seconds)", "oldest overdue (s)"),
            ]))
        .with_row(dash.Row("Generation"))
        .with_panel(_panel(
            "Queue wait by model", "From a generation task's publication to its start.", "s",
            _quantiles("stemgen_queue_wait_seconds", "model", '{task=~"stemgen.generate_.*"}',
                       MODEL_OF_INSTANCE)))
        .with_panel(_panel(
            "Generation time by model", "A task's MusicGen generation through the batcher (the "
            "batch window included).", "s",
            _quantiles("stemgen_generation_seconds", "model", join=MODEL_OF_INSTANCE)))
        .with_panel(_panel(
            "Audio seconds per second", "Seconds of stems completed per second of wall-clock time, "
            "by model (above 1: faster than real time).", "short", [
                (f"sum by (model) (rate(stemgen_stem_audio_seconds_sum[{RATE}]) * {MODEL_OF_INSTANCE})",
                 "{{model}}"),
            ]))
        .with_panel(_panel(
            "Batch sizes", "Clips per MusicGen call: mean and p90, by model.", "short", [
                (f"sum by (model) (rate(stemgen_batch_size_sum[{RATE}]))"
                 f" / sum by (model) (rate(stemgen_batch_size_count[{RATE}]))", "mean {{model}}"),
                (f"histogram_quantile(0.9, sum by (le, model) (rate(stemgen_batch_size_bucket[{RATE}])))",
                 "p90 {{model}}"),
            ]))
        .with_panel(_panel(
            "GPU memory", "torch.cuda's allocator on each CUDA worker: held by tensors, reserved by "
            "the caching allocator, and the peak since start.", "bytes", [
                ("stemgen_cuda_memory_allocated_bytes", "allocated {{instance}} {{device}}"),
                ("stemgen_cuda_memory_reserved_bytes", "reserved {{instance}} {{device}}"),
                ("stemgen_cuda_memory_max_allocated_bytes", "peak {{instance}} {{device}}"),
            ]))
        .with_panel(_panel(
            "Workers up", "Worker metrics targets Prometheus scrapes, by role, and those with their "
            "model loaded.", "short", [
                (f'sum by (role) (up{{job="{WORKER_JOB}"}})', "up {{role}}"),
                ("count by (model) (stemgen_model_load_seconds)", "loaded {{model}}"),
            ]))
        .with_row(dash.Row("Callbacks and gateway"))
        .with_panel(_panel(
            "Callback outcomes", "Callback attempts per second by outcome, and callbacks given up "
            "by reason.", "ops", [
                (f"sum by (outcome) (rate(stemgen_callback_deliveries_total[{RATE}]))", "{{outcome}}"),
                (f"sum by (reason) (rate(stemgen_callbacks_failed_total[{RATE}]))", "given up: {{reason}}"),
            ], stacked=True))
        .with_panel(_panel(
            "Callback attempt time", "One callback attempt, by outcome.", "s",
            _quantiles("stemgen_callback_duration_seconds", "outcome")))
        .with_panel(_panel(
            "Gateway requests by status", "Answers per second by HTTP status.", "reqps", [
                (f'sum by (status) (rate(stemgen_http_requests_total{{job="{GATEWAY_JOB}"}}[{RATE}]))',
                 "{{status}}"),
            ], stacked=True))
        .with_panel(_panel(
            "Gateway p99 latency by route", "Arrival to response headers (probes and /metrics left "
            "out).", "s", [
                ("histogram_quantile(0.99, sum by (le, route) (rate(stemgen_http_request_duration_seconds_bucket"
                 f'{{route!~"/health.*|/metrics"}}[{RATE}])))', "{{route}}"),
            ]))
        .with_panel(_panel(
            "Job store up", "1 when each gateway's scrape found the job store (Redis) answering.",
            "short", [("min(stemgen_job_store_up)", "job store up")]))
    )
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def queries(model: dict) -> list[str]:
    """Every query expression of a dashboard JSON model (panels, rows' panels, variables)."""
    found = []
    for panel in model.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            found.extend(t["expr"] for t in inner.get("targets", []) if "expr" in t)
    for variable in model.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query" and query:
            found.append(query if isinstance(query, str) else query.get("query", ""))
    return found
