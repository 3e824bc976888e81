"""The Grafana dashboard (deploy/monitoring/dashboard.py, grafana-foundation-sdk), as committed in
deploy/k8s/components/monitoring/dashboard.json: every query names a metric the code exports (from
its collectors, not a hand list), parses as PromQL (promtool), and the panels the runbook relies
on are there."""

from __future__ import annotations

import json
import re

import yaml

from deploy.monitoring import build, dashboard
from tests.monitoring.exported import (PROMETHEUS_SERIES, TARGET_LABELS, exported_labels, exported_names,
                                       matcher_labels, metric_names)
from tests.monitoring.test_alerts import _run


def _model() -> dict:
    return json.loads(build.DASHBOARD.read_text())


def _unknown(model: dict, exported: frozenset[str]) -> dict[str, set[str]]:
    unknown = {}
    for expr in dashboard.queries(model):
        missing = metric_names(expr) - exported - PROMETHEUS_SERIES
        if missing:
            unknown[expr] = missing
    return unknown


def test_every_query_names_exported_metrics(monkeypatch):
    model = _model()
    exported = exported_names(monkeypatch)
    assert len(dashboard.queries(model)) >= 20
    assert all(metric_names(expr) for expr in dashboard.queries(model))
    assert _unknown(model, exported) == {}


def test_every_query_matches_on_labels_its_metric_has(monkeypatch):
    labels = exported_labels(monkeypatch)
    for expr in dashboard.queries(_model()):
        for name, matched in matcher_labels(expr).items():
            if name not in PROMETHEUS_SERIES:
                assert matched <= labels[name] | TARGET_LABELS, (expr, matched - labels[name])


def test_a_query_naming_an_unknown_metric_is_caught(monkeypatch):
    model = _model()
    target = next(p for p in model["panels"] if p.get("targets"))["targets"][0]
    target["expr"] = target["expr"].replace("stemgen_jobs_accepted_total", "stemgen_jobs_acepted_total")
    assert list(_unknown(model, exported_names(monkeypatch)).values()) == [{"stemgen_jobs_acepted_total"}]


def test_every_query_parses_as_promql(tmp_path):
    """promtool checks each query as a recording rule (Grafana's $__rate_interval as 1m)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "1m")}
             for i, expr in enumerate(dashboard.queries(_model()))]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _run("check", "rules", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_shows_what_operators_need():
    model = _model()
    named = set().union(*(metric_names(e) for e in dashboard.queries(model)))
    assert {"stemgen_jobs_accepted_total", "stemgen_jobs_finished_total",  # jobs by state
            "stemgen_queue_wait_seconds_bucket", "stemgen_generation_seconds_bucket",  # by model
            "stemgen_model_load_seconds", "stemgen_stem_audio_seconds_sum",  # audio s per s
            "stemgen_batch_size_bucket", "stemgen_callback_deliveries_total",
            "stemgen_cuda_memory_allocated_bytes", "stemgen_outbox_jobs"} <= named
    by_model = [e for e in dashboard.queries(model) if re.search(r"queue_wait|generation_seconds", e)]
    assert by_model and all("model" in e for e in by_model)
    for panel in model["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"] and panel["description"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    assert [v["name"] for v in model["templating"]["list"]] == ["datasource"]
