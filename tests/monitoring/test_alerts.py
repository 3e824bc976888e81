"""The alert rules (deploy/monitoring/alerts.py, written to alerts.yaml and the PrometheusRule):
checked and unit-tested with promtool (Debian's `prometheus` package, which `make install`
installs), every alert fired by a series that should trigger it and silent on one that should not
(alerts_test.yaml), every query naming exported metrics, every alert with its runbook."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.monitoring import alerts, build
from tests.monitoring.exported import (PROMETHEUS_SERIES, TARGET_LABELS, exported_labels, exported_names,
                                       matcher_labels, metric_names)

HERE = Path(__file__).resolve().parent
UNIT_TESTS = HERE / "alerts_test.yaml"
OPERATIONS = build.ROOT / "docs" / "operations.md"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("no promtool: `make install` installs Debian's prometheus package")
    return path


def _run(*args: str, cwd: Path = HERE) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_committed_files_are_what_the_build_writes():
    for path, text in build.outputs().items():
        assert path.read_text() == text, f"{path} is out of date: run `make monitoring`"
    rule = yaml.safe_load(build.PROMETHEUS_RULE.read_text())
    assert rule["spec"] == yaml.safe_load(build.RULE_FILE.read_text())


def test_promtool_checks_the_rule_file():
    done = _run("check", "rules", str(build.RULE_FILE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts.ALERTS)} rules found" in done.stdout


def test_promtool_unit_tests_pass():
    done = _run("test", "rules", UNIT_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_fires_in_one_test_and_stays_silent_in_another():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fires, silent = set(), set()
    for group in tests:
        name = group["name"]
        for case in group["alert_rule_test"]:
            alertname, says = name.split(": ", 1)
            assert alertname == case["alertname"], name
            assert bool(case["exp_alerts"]) == says.startswith("fires"), name
            (fires if case["exp_alerts"] else silent).add(alertname)
    names = {alert.name for alert in alerts.ALERTS}
    assert fires == names and silent == names


def test_the_unit_tests_fail_when_the_alerts_never_fire(tmp_path):
    """The firing cases are real: with every expression replaced by one that never holds, promtool
    reports each alert's firing test as failed."""
    never = alerts.rule_groups()
    for rule in never["groups"][0]["rules"]:
        rule["expr"] = "vector(0) > 1"
    (tmp_path / "deploy" / "monitoring").mkdir(parents=True)
    (tmp_path / "deploy" / "monitoring" / "alerts.yaml").write_text(yaml.safe_dump(never))
    (tmp_path / "tests" / "monitoring").mkdir(parents=True)
    (tmp_path / "tests" / "monitoring" / UNIT_TESTS.name).write_text(UNIT_TESTS.read_text())
    done = _run("test", "rules", UNIT_TESTS.name, cwd=tmp_path / "tests" / "monitoring")
    assert done.returncode != 0
    for alert in alerts.ALERTS:
        assert f"alertname: {alert.name}," in done.stdout + done.stderr, alert.name


def test_rules_name_only_exported_metrics(monkeypatch):
    exported = exported_names(monkeypatch) | PROMETHEUS_SERIES
    for alert in alerts.ALERTS:
        named = metric_names(alert.expr)
        assert named, alert.name
        assert named <= exported, (alert.name, named - exported)


def test_rules_match_on_labels_their_metrics_have(monkeypatch):
    labels = exported_labels(monkeypatch)
    for alert in alerts.ALERTS:
        for name, matched in matcher_labels(alert.expr).items():
            if name in PROMETHEUS_SERIES:
                continue  # up: the target's labels
            assert matched <= labels[name] | TARGET_LABELS, (alert.name, name, matched - labels[name])


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section():
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), flags=re.M)}
    for rule in alerts.rule_groups()["groups"][0]["rules"]:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        page, anchor = rule["annotations"]["runbook_url"].split("#")
        assert page == "docs/operations.md" and anchor in anchors, rule["alert"]


def test_durations_scale_for_fast_tests():
    fast = alerts.rule_groups(scale=1 / 60, interval="1s")["groups"][0]
    (failing,) = [r for r in fast["rules"] if r["alert"] == "StemgenCallbacksFailing"]
    assert failing["for"] == "10s"
    assert failing["expr"] == ('sum(rate(stemgen_callback_deliveries_total{outcome!="success"}[10s]))'
                               " / sum(rate(stemgen_callback_deliveries_total[10s])) > 0.5")
    assert fast["interval"] == "1s"
    assert alerts.scale_duration("6h", 1 / 60) == "360s"
    assert alerts.scale_duration("1m", 1 / 600) == "1s"  # never 0


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")
