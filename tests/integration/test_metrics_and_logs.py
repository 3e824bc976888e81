"""Metrics and logs on real parts: gunicorn gateway (2 workers, multiprocess metrics) + Celery
worker (tiny MusicGen, metrics port) + callback receiver, on Redis DBs 2/3, LOG_FORMAT=json and
secrets configured. One job goes through; the scrapes before and after must have moved, the job's
log lines from gateway to callback must carry its ids, and no secret may appear in any log."""

import json
import re
import time
import uuid
from collections import defaultdict
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from stemgen_settings import AZURITE_CONNECTION_STRING
from tasks.callbacks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.harness import REDIS, CallbackReceiver, free_port, service_env, start_gateway, start_worker

API_KEY = f"key-{uuid.uuid4().hex}"
CALLBACK_SECRET = f"cbsecret-{uuid.uuid4().hex}"
ACCOUNT_KEY = re.search(r"AccountKey=([^;]+)", AZURITE_CONNECTION_STRING).group(1)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observed")
    with CallbackReceiver() as receiver:
        worker_port = free_port()
        env = service_env(tmp, BROKER_URL=f"{REDIS}/2", RESULT_BACKEND=f"{REDIS}/3",
                          DEFAULT_CALLBACK_URL=receiver.url, LOG_FORMAT="json", LOG_LEVEL="INFO",
                          STEMGEN_API_KEYS=API_KEY, CALLBACK_SECRET=CALLBACK_SECRET,
                          WORKER_METRICS_PORT=str(worker_port), WORKER_METRICS_ADDR="127.0.0.1")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn.conf.py makes a fresh one
        worker = start_worker(env, tmp, name="observed")
        try:
            gateway, base = start_gateway(env, tmp)
            try:
                yield {"base": base, "worker_metrics": f"http://127.0.0.1:{worker_port}/metrics",
                       "receiver": receiver, "worker": worker, "gateway": gateway}
            finally:
                gateway.stop()
        finally:
            worker.stop()


def scrape(url: str, **kwargs) -> dict:
    """{(sample name, frozenset(labels)): value} of a Prometheus text exposition."""
    response = requests.get(url, timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_job_moves_the_metrics_and_its_log_lines_carry_its_ids(observed):
    base, receiver = observed["base"], observed["receiver"]
    gateway_before = scrape(f"{base}/metrics", headers=AUTH)
    worker_before = scrape(observed["worker_metrics"])
    assert requests.get(f"{base}/metrics", timeout=5).status_code == 401  # behind the API key

    body = {"generation_request_id": f"gen-{uuid.uuid4().hex[:10]}", "audio_file_id": "audio-1",
            "target_stems": ["bass", "drums"],
            "parameters": {"target_bpm": 120, "duration_seconds": 2.0, "style": "rock", "seed": 3}}
    answer = requests.post(f"{base}/generate", json=body, headers=AUTH, timeout=10)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    callback = receiver.wait(timeout=180)
    assert callback["json"]["job_id"] == job_id and callback["json"]["status"] == "completed"
    assert verify(CALLBACK_SECRET, callback["headers"][TIMESTAMP_HEADER], callback["raw"],
                  callback["headers"][SIGNATURE_HEADER])
    for _ in range(100):  # the delivery is recorded (and counted) once the receiver answered
        status = requests.get(f"{base}/jobs/{job_id}", headers=AUTH, timeout=5).json()
        if status["callback"]["state"] == "delivered":
            break
        time.sleep(0.1)
    assert status["callback"]["state"] == "delivered"
    # spread over both gunicorn workers: /metrics must add them up. HEAD: a label of this test's
    # own (probes and the harness's readiness poll use GET), so the count is exact.
    for _ in range(8):
        assert requests.head(f"{base}/health/live", timeout=30).status_code == 200
    assert requests.get(f"{base}/no/such/{uuid.uuid4().hex}", headers=AUTH, timeout=5).status_code == 404

    gateway = scrape(f"{base}/metrics", headers=AUTH)
    worker = scrape(observed["worker_metrics"])

    # gateway: requests by route template and status, latency, jobs accepted, outbox backlog
    assert moved(gateway_before, gateway, "stemgen_http_requests_total",
                 method="POST", route="/generate", status="202") == 1
    assert moved(gateway_before, gateway, "stemgen_http_request_duration_seconds_count",
                 method="POST", route="/generate") == 1
    assert moved(gateway_before, gateway, "stemgen_http_requests_total",
                 method="HEAD", route="/health/live", status="200") == 8
    assert value(gateway, "stemgen_http_requests_total", method="GET", route="/jobs/<job_id>",
                 status="200") >= 1
    assert moved(gateway_before, gateway, "stemgen_http_requests_total",
                 method="GET", route="unmatched", status="404") == 1
    assert not any(job_id in str(labels) for _, labels in gateway)  # no raw paths as labels
    assert moved(gateway_before, gateway, "stemgen_jobs_accepted_total") == 1
    assert value(gateway, "stemgen_job_store_up") == 1
    assert ("stemgen_outbox_jobs", frozenset()) in gateway

    # worker: stems, generation and audio seconds, batches, queue wait, callback, model load
    for stem in ("bass", "drums"):
        assert moved(worker_before, worker, "stemgen_stems_generated_total",
                     stem=stem, arrangement="independent") == 1
    assert moved(worker_before, worker, "stemgen_generation_seconds_count", arrangement="independent") == 2
    assert moved(worker_before, worker, "stemgen_generation_seconds_sum", arrangement="independent") > 0
    assert moved(worker_before, worker, "stemgen_stem_audio_seconds_sum",
                 arrangement="independent") == pytest.approx(4.0, abs=0.01)
    assert moved(worker_before, worker, "stemgen_batch_size_count", model="tiny") >= 1
    assert moved(worker_before, worker, "stemgen_batch_size_sum", model="tiny") == 2
    assert moved(worker_before, worker, "stemgen_queue_wait_seconds_count",
                 task="stemgen.generate_stem") == 2
    assert moved(worker_before, worker, "stemgen_queue_wait_seconds_count",
                 task="stemgen.deliver_callback") == 1
    assert moved(worker_before, worker, "stemgen_callback_deliveries_total", outcome="success") == 1
    assert moved(worker_before, worker, "stemgen_task_runs_total",
                 task="stemgen.finalize_request", state="SUCCESS") == 1
    assert moved(worker_before, worker, "stemgen_jobs_finished_total", status="completed") == 1
    for reason in ("window", "rejected"):  # exported at 0 from the start: a first failure is an increase
        assert ("stemgen_callbacks_failed_total", frozenset({("reason", reason)})) in worker_before
        assert value(worker, "stemgen_callbacks_failed_total", reason=reason) == 0
    assert value(worker, "stemgen_model_load_seconds", model="tiny", device="cpu") > 0
    assert value(worker, "stemgen_model_warmup_seconds", model="tiny", device="cpu") > 0
    assert not any(name.startswith("stemgen_cuda_") for name, _ in worker)  # CPU worker

    # logs: JSON lines; the job's ids on its lines from the gateway to the callback
    observed["gateway"].stop()  # flushes and closes the log files (the fixture's stop is a no-op)
    observed["worker"].stop()
    gateway_log, worker_log = observed["gateway"].log(), observed["worker"].log()
    gateway_lines = json_lines(gateway_log)
    assert gateway_lines and all(line.startswith("{") for line in gateway_log.splitlines() if line)
    assert all(line["component"] == "gateway" for line in gateway_lines)
    accepted = [line for line in gateway_lines if line.get("job_id") == job_id]
    assert any(line["message"].startswith(f"job {job_id} accepted") for line in accepted), gateway_lines
    for line in accepted:
        assert line["generation_request_id"] == body["generation_request_id"]
        assert line["route"] == "/generate" and line["duration_seconds"] >= 0

    worker_lines = json_lines(worker_log)
    job_lines = [line for line in worker_lines if line.get("job_id") == job_id]
    messages = [line["message"] for line in job_lines]
    for expected in (f"outbox: job {job_id} dispatched", "task stemgen.generate_stem started",
                     "task stemgen.generate_stem finished: SUCCESS", f"job {job_id} finished: completed",
                     "task stemgen.deliver_callback started", "callback to 127.0.0.1 answered HTTP 200",
                     "task stemgen.deliver_callback finished: SUCCESS"):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    task_ids = {line["task_id"] for line in job_lines if "task_id" in line}
    assert len(task_ids) == 4  # two stems, finalize, delivery
    by_task = defaultdict(list)
    for line in worker_lines:
        if line.get("task_id") in task_ids:
            by_task[line["task_id"]].append(line)
    for lines in by_task.values():  # every line of the job's tasks (Celery's own included)
        for line in lines:
            assert line["job_id"] == job_id, line
            assert line["generation_request_id"] == body["generation_request_id"], line
            assert line["duration_seconds"] >= 0 and line["task"].startswith("stemgen."), line
    stems = {line.get("stem") for line in job_lines if line.get("task") == "stemgen.generate_stem"}
    assert stems == {"bass", "drums"}

    # no secret anywhere, though stem URLs (with their SAS) are in Celery's result lines
    signatures = [parse_qs(urlsplit(s["url"]).query)["sig"][0] for s in callback["json"]["stems"]]
    everything = gateway_log + worker_log
    assert "sig=***" in worker_log
    for secret in (API_KEY, CALLBACK_SECRET, ACCOUNT_KEY, *signatures):
        assert secret not in everything
        assert requests.utils.quote(secret, safe="") not in everything
