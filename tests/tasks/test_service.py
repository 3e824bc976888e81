"""JobService.submit against the real Redis job store: one record and one outbox entry per job,
whatever the broker is doing (the gateway never talks to it)."""

import threading

import pytest

from stemgen_settings import load_settings
from tasks.service import JobService, ServiceUnavailable
from tests.harness import REDIS

URL = f"{REDIS}/12"


def req(rid="gen-1"):
    return {"generation_request_id": rid, "audio_file_id": "a", "target_stems": ["bass", "drums"],
            "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0}}


@pytest.fixture
def service():
    s = JobService(load_settings(result_backend=URL))
    s.jobs._redis.flushdb()
    return s


def outbox(service) -> list[str]:
    return service.jobs._redis.zrange(service.jobs._OUTBOX, 0, -1)


def test_new_job_is_recorded_due_and_reported_queued(service):
    first = service.submit(req(), None)
    assert first.created and first.status == "queued"
    assert outbox(service) == [first.job_id]
    assert not service.get(first.job_id)["dispatched"]
    service.jobs.update_stem(first.job_id, "bass", "running", 0.5)
    again = service.submit(req(), None)
    assert (again.job_id, again.created, again.status) == (first.job_id, False, "running")
    assert outbox(service) == [first.job_id]


def test_submission_does_not_need_the_broker():
    service = JobService(load_settings(result_backend=URL, broker_url="redis://127.0.0.1:1/0"))
    service.jobs._redis.flushdb()
    submission = service.submit(req(), None)  # no broker on port 1: the job waits in the outbox
    assert submission.created and outbox(service) == [submission.job_id]


def test_concurrent_identical_submissions_record_one_job(service):
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
    assert len({r.job_id for r in results}) == 1 and sum(r.created for r in results) == 1
    assert outbox(service) == [results[0].job_id]


def test_outbox_backlog_for_health(service):
    assert service.outbox() == {"pending": 0, "overdue_seconds": 0.0}
    service.submit(req(), None)
    assert service.outbox()["pending"] == 1
    assert JobService(load_settings(result_backend="redis://127.0.0.1:1/0")).outbox() is None


def test_unreachable_job_store_is_service_unavailable():
    service = JobService(load_settings(result_backend="redis://127.0.0.1:1/0"))
    with pytest.raises(ServiceUnavailable):
        service.submit(req(), None)
    with pytest.raises(ServiceUnavailable):
        service.get("0" * 32)
