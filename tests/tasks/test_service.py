"""JobService.submit: idempotent enqueueing against the real Redis job store (the broker is faked)."""

import threading
import time

import pytest
from kombu.exceptions import OperationalError

import tasks.service
from stemgen_settings import load_settings
from tasks.service import JobService, ServiceUnavailable

URL = "redis://127.0.0.1:6379/12"


def req(rid="gen-1"):
    return {"generation_request_id": rid, "audio_file_id": "a", "target_stems": ["bass", "drums"],
            "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0}}


@pytest.fixture
def service():
    s = JobService(load_settings(result_backend=URL))
    s.jobs._redis.flushdb()
    return s


@pytest.fixture
def enqueued(monkeypatch):
    calls = []
    monkeypatch.setattr(tasks.service, "enqueue_job", lambda job_id, request, stems: calls.append(job_id))
    return calls


def test_failed_enqueue_is_retried_by_the_same_request(service, monkeypatch):
    calls = []

    def broker_down(job_id, request, stems):
        calls.append(job_id)
        raise OperationalError("connection refused")

    monkeypatch.setattr(tasks.service, "enqueue_job", broker_down)
    with pytest.raises(ServiceUnavailable):
        service.submit(req(), None)
    job_id = calls[0]
    assert not service.get(job_id)["enqueued"]

    monkeypatch.setattr(tasks.service, "enqueue_job", lambda j, r, s: calls.append(j))
    again = service.submit(req(), None)  # the backend retries the same body
    assert again.job_id == job_id and not again.created
    assert calls == [job_id, job_id] and service.get(job_id)["enqueued"]
    service.submit(req(), None)
    assert calls == [job_id, job_id]  # enqueued once it succeeded


def test_concurrent_identical_submissions_enqueue_once(service, monkeypatch):
    calls = []

    def slow_enqueue(job_id, request, stems):
        time.sleep(0.3)
        calls.append(job_id)

    monkeypatch.setattr(tasks.service, "enqueue_job", slow_enqueue)
    results, errors = [], []
    barrier = threading.Barrier(8)

    def submit():
        barrier.wait()
        try:
            results.append(service.submit(req(), None))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert {r.job_id for r in results} == {calls[0]}
    assert sum(r.created for r in results) == 1


def test_stuck_enqueue_tells_the_caller_to_retry(service, enqueued, monkeypatch):
    monkeypatch.setattr(tasks.service, "_ENQUEUE_WAIT_SECONDS", 0.2)
    job_id = service.submit(req(), None).job_id
    service.jobs._redis.hset(service.jobs._job_key(job_id), "enqueued", 0)  # as if it died mid-way
    assert service.jobs.claim_enqueue(job_id)  # ... holding the claim
    with pytest.raises(ServiceUnavailable):
        service.submit(req(), None)
    service.jobs.release_enqueue(job_id)  # the claim lapses
    service.submit(req(), None)
    assert enqueued == [job_id, job_id]


def test_unreachable_job_store_is_service_unavailable(enqueued):
    service = JobService(load_settings(result_backend="redis://127.0.0.1:1/0"))
    with pytest.raises(ServiceUnavailable):
        service.submit(req(), None)
    with pytest.raises(ServiceUnavailable):
        service.get("0" * 32)
    assert enqueued == []
