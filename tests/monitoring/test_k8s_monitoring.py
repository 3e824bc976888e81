"""The monitoring component as rendered (overlays/production): its PodMonitors scrape every
gateway and worker pod on a port they have, under the job and role labels the alert rules select
on; the PrometheusRule holds the rules; the dashboard ConfigMap holds the dashboard."""

from __future__ import annotations

import json
import re

from deploy.monitoring import alerts, build
from tests.test_k8s import _all, _container, _one, _render, _workloads

OVERLAY = "production"


def _relabel(relabelings: list[dict], target: dict) -> dict:
    """Prometheus' relabelling (action replace, the only one used) on a target's labels."""
    labels = dict(target)
    for step in relabelings:
        assert step.get("action", "replace") == "replace"
        source = ";".join(labels.get(name, "") for name in step.get("sourceLabels", []))
        match = re.fullmatch(step.get("regex", "(.*)"), source)
        if match:
            labels[step["targetLabel"]] = match.expand(step.get("replacement", "$1").replace("$", "\\"))
    return labels


def _selects(selector: dict, labels: dict) -> bool:
    from tests.test_k8s_fences import _selects as selects

    return selects(selector, labels)


def test_pod_monitors_scrape_every_stemgen_pod_as_the_rules_expect():
    docs = _render(OVERLAY)
    monitors = _all(docs, "PodMonitor")
    scraped = {}
    for workload in _workloads(docs):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"] for p in _container(workload).get("ports", [])}
        target = {f"__meta_kubernetes_pod_label_{k.replace('.', '_').replace('/', '_').replace('-', '_')}": v
                  for k, v in labels.items()}
        target["job"] = "default-job-name"
        for monitor in monitors:
            if not _selects(monitor["spec"]["selector"], labels):
                continue
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert endpoint["port"] in ports, (workload["metadata"]["name"], endpoint["port"])
                result = _relabel(endpoint.get("relabelings", []), target)
                scraped[labels["app.kubernetes.io/component"]] = (result["job"], result.get("role"),
                                                                  endpoint.get("path", "/metrics"))
    assert scraped.pop("gateway") == (alerts.GATEWAY_JOB, None, "/metrics")
    assert scraped.pop("worker-callbacks") == (alerts.WORKER_JOB, "callbacks", "/metrics")
    assert scraped.pop("worker-gpu") == (alerts.WORKER_JOB, "generation", "/metrics")
    assert scraped == {}  # Redis exports nothing of ours
    gateway = _one(docs, "PodMonitor", "stemgen-gateway")["spec"]["podMetricsEndpoints"][0]
    assert gateway["authorization"]["credentials"]["name"] == "stemgen-secrets"


def test_the_cpu_worker_is_a_generation_worker_too():
    target = {"__meta_kubernetes_pod_label_app_kubernetes_io_component": "worker-cpu"}
    monitor = next(m for m in _all(_render(OVERLAY), "PodMonitor") if m["metadata"]["name"] == "stemgen-worker")
    assert _selects(monitor["spec"]["selector"], {"app.kubernetes.io/name": "stemgen",
                                                  "app.kubernetes.io/component": "worker-cpu"})
    labels = _relabel(monitor["spec"]["podMetricsEndpoints"][0]["relabelings"], target)
    assert labels["role"] == "generation"


def test_the_rules_and_the_dashboard_are_the_built_ones():
    docs = _render(OVERLAY)
    assert _one(docs, "PrometheusRule")["spec"] == alerts.rule_groups()
    dashboard = _one(docs, "ConfigMap", "stemgen-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["stemgen.json"]) == json.loads(build.DASHBOARD.read_text())
    for overlay in ("gpu", "cpu-only"):  # optional: only where the Prometheus Operator is assumed
        assert not [d for d in _render(overlay) if d["apiVersion"].startswith("monitoring.coreos.com/")]
