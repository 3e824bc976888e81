"""The alert rules on a real Prometheus (Debian's package, on loopback) scraping a real gunicorn
gateway (its /metrics behind an API key) and a real Celery worker (its metrics port), tiny model,
Azurite, Redis. A job finishes while its callback receiver is down: StemgenCallbacksFailing goes
pending, then firing; the receiver comes back on the same port, the retried callback is delivered
and the alert resolves. The rules are deploy/monitoring/alerts.py's, with every window and `for`
scaled from minutes to seconds (10 m -> 10 s) and Prometheus scraping and evaluating every second.

Nothing sleeps for a guessed time: the test polls Prometheus' alerts API for each state, each with
a deadline. Pending lasts the rule's `for` (10 s), far longer than one poll (0.1 s)."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
import requests
import yaml

from deploy.monitoring import alerts
from tests.harness import CallbackReceiver, Process, free_port, running_stack, service_env

ALERT = "StemgenCallbacksFailing"
API_KEY = f"key-{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SCALE = 1 / 60


def _prometheus_config(tmp, gateway: str, worker: str) -> str:
    rules = tmp / "rules.yaml"
    rules.write_text(yaml.safe_dump(alerts.rule_groups(scale=SCALE)))
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": alerts.GATEWAY_JOB, "metrics_path": "/metrics",
             "authorization": {"type": "Bearer", "credentials_file": str(key_file)},
             "static_configs": [{"targets": [gateway]}]},
            {"job_name": alerts.WORKER_JOB,
             "static_configs": [{"targets": [worker], "labels": {"role": "generation"}}]},
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _state(prometheus: str) -> str:
    """The alert's state in Prometheus ("inactive" when it is not listed)."""
    answer = requests.get(f"{prometheus}/api/v1/alerts", timeout=5).json()
    states = {a["state"] for a in answer["data"]["alerts"] if a["labels"]["alertname"] == ALERT}
    assert len(states) <= 1, states
    return states.pop() if states else "inactive"


def _wait_state(prometheus: str, wanted: str, timeout: float, seen: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(prometheus)
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == wanted:
            return
        time.sleep(0.1)
    raise AssertionError(f"{ALERT} not {wanted} within {timeout}s; states seen: {seen}")


def _targets_up(server: Process, prometheus: str, timeout: float) -> None:
    """Waits for Prometheus to answer, then for both targets to have been scraped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.log()
        try:
            if requests.get(f"{prometheus}/-/ready", timeout=1).status_code == 200:
                break
        except requests.RequestException:  # not listening yet
            pass
        time.sleep(0.1)
    targets = []
    while time.monotonic() < deadline:
        targets = requests.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        if len(targets) == 2 and all(t["health"] == "up" for t in targets):
            return
        time.sleep(0.2)
    raise AssertionError(f"targets not up: {targets}")


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("no prometheus: `make install` installs Debian's prometheus package")
    return path


def test_callback_failures_fire_and_resolve_on_a_real_prometheus(tmp_path, prometheus_binary):
    callback_port = free_port()  # nothing listens there until the receiver comes back
    worker_port = free_port()
    env = service_env(tmp_path, DEFAULT_CALLBACK_URL=f"http://127.0.0.1:{callback_port}/callback",
                      STEMGEN_API_KEYS=API_KEY, CALLBACK_BACKOFF_SECONDS="1",
                      CALLBACK_BACKOFF_MAX_SECONDS="1", WORKER_METRICS_PORT=str(worker_port),
                      WORKER_METRICS_ADDR="127.0.0.1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn.conf.py makes a fresh one
    with running_stack(env, tmp_path, name="alerts") as (base, _worker, _gateway):
        web = f"127.0.0.1:{free_port()}"
        config = _prometheus_config(tmp_path, base.removeprefix("http://"), f"127.0.0.1:{worker_port}")
        server = Process([prometheus_binary, f"--config.file={config}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}"],
                         env, tmp_path / "prometheus.log")
        prometheus = f"http://{web}"
        try:
            _targets_up(server, prometheus, timeout=30)
            assert _state(prometheus) == "inactive"
            body = {"generation_request_id": f"gen-{uuid.uuid4().hex[:10]}", "audio_file_id": "a-1",
                    "target_stems": ["bass"],
                    "parameters": {"target_bpm": 120, "duration_seconds": 2.0, "seed": 1}}
            answer = requests.post(f"{base}/generate", json=body, headers=AUTH, timeout=10)
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["job_id"]

            seen: list[str] = []
            _wait_state(prometheus, "pending", timeout=240, seen=seen)
            _wait_state(prometheus, "firing", timeout=30, seen=seen)
            with CallbackReceiver(port=callback_port) as receiver:
                callback = receiver.wait(timeout=30)
                assert callback["json"]["job_id"] == job_id
                _wait_state(prometheus, "inactive", timeout=40, seen=seen)
            assert seen == ["inactive", "pending", "firing", "inactive"], seen
            status = requests.get(f"{base}/jobs/{job_id}", headers=AUTH, timeout=5).json()
            assert status["callback"]["state"] == "delivered"
        except BaseException:
            print(server.log()[-4000:])
            raise
        finally:
            server.stop()
