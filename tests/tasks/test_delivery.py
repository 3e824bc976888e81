"""finalize_request and deliver_callback, run in-process against the real Redis and a loopback
receiver: one callback however often the tasks run, backoff inside a window, the SSRF guard."""

import threading
import time

import pytest

from stemgen_settings import load_settings
from tasks import callback_delivery, metrics, stem_tasks, worker_jobstore
from tasks.jobstore import JobStore
from tests.harness import CallbackReceiver
from tests.harness import REDIS

URL = f"{REDIS}/12"


class RetryLater(Exception):
    def __init__(self, countdown):
        super().__init__(countdown)
        self.countdown = countdown


@pytest.fixture
def store():
    s = JobStore(URL, ttl_seconds=120)
    s._redis.flushdb()
    return s


@pytest.fixture
def configure(monkeypatch, store):
    """Point the Celery app's tasks at test settings and the test store; retries raise RetryLater."""

    def apply(**overrides):
        values = dict(result_backend=URL, callback_allow_loopback=True, callback_backoff_seconds=2,
                      callback_backoff_max_seconds=60, callback_timeout_seconds=5,
                      callback_secret="k")
        values.update(overrides)
        settings = load_settings(**values)
        app = stem_tasks.app
        monkeypatch.setattr(app, "stemgen_settings", settings, raising=False)
        monkeypatch.setattr(app, "_stemgen_jobstore", store, raising=False)

        def retry(exc=None, countdown=None, **_):
            raise RetryLater(countdown)

        monkeypatch.setattr(callback_delivery.deliver_callback, "retry", retry)
        return settings

    return apply


@pytest.fixture
def sent(monkeypatch):
    calls = []
    monkeypatch.setattr(callback_delivery.deliver_callback, "delay", lambda job_id: calls.append(job_id))
    return calls


def finished_job(store, url):
    request = {"generation_request_id": "gen-1", "audio_file_id": "a", "target_stems": ["bass"],
               "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0}}
    job_id = store.create(request, ["bass"], url).job_id
    store.finish(job_id, "completed", {"event": "generation.finished", "job_id": job_id})
    return job_id


def deliver(job_id):
    try:
        return callback_delivery.deliver_callback.run(job_id)
    except RetryLater as exc:
        return exc


def test_finalize_twice_sends_one_delivery(store, configure, sent):
    configure()
    job_id = store.create({"generation_request_id": "g", "audio_file_id": "a", "target_stems": ["bass"],
                           "parameters": {"target_bpm": 120, "duration_seconds": 4}},
                          ["bass"], "http://127.0.0.1:9/cb").job_id
    finished = metrics.JOBS_FINISHED.labels("completed")._value.get()
    failed = metrics.JOBS_FINISHED.labels("failed")._value.get()
    first = stem_tasks.finalize_request.run([{"stem": "bass", "status": "completed"}], job_id)
    again = stem_tasks.finalize_request.run([{"stem": "bass", "status": "failed", "error": "x"}], job_id)
    assert sent == [job_id]
    assert metrics.JOBS_FINISHED.labels("completed")._value.get() == finished + 1  # counted once
    assert metrics.JOBS_FINISHED.labels("failed")._value.get() == failed
    assert first["status"] == again["status"] == "completed"  # the first result stays
    assert store.get(job_id)["callback_payload"]["status"] == "completed"


def test_concurrent_deliveries_post_once(store, configure):
    configure()
    with CallbackReceiver(delay_seconds=0.5) as receiver:
        job_id = finished_job(store, receiver.url)
        outcomes = []
        threads = [threading.Thread(target=lambda: outcomes.append(deliver(job_id))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count("delivered") == 1
        assert all(isinstance(o, RetryLater) for o in outcomes if o != "delivered")
        # The copies that found the lock taken come back later and find the job delivered.
        assert deliver(job_id) == "delivered"
        time.sleep(0.2)
        assert receiver.received.qsize() == 1
    callback = store.get(job_id)["callback"]
    assert callback["state"] == "delivered" and callback["attempts"] == 1


def test_lock_wait_stays_inside_the_visibility_timeout(store, configure):
    configure(visibility_timeout_seconds=20, callback_backoff_max_seconds=10,
              generation_deadline_seconds=15)
    job_id = finished_job(store, "http://127.0.0.1:9/cb")
    store.acquire_delivery_lock(job_id, 60)
    outcome = deliver(job_id)
    assert isinstance(outcome, RetryLater) and outcome.countdown <= 10
    assert store.get(job_id)["callback"]["attempts"] == 0  # no attempt was made


def test_failing_backend_is_retried_with_backoff_then_delivered(store, configure):
    configure()
    with CallbackReceiver(status_codes=[503, 500]) as receiver:
        job_id = finished_job(store, receiver.url)
        first = deliver(job_id)
        assert isinstance(first, RetryLater) and first.countdown == 2
        callback = store.get(job_id)["callback"]
        assert callback["state"] == "pending" and "503" in callback["error"]
        assert callback["next_attempt_at"] > time.time()
        second = deliver(job_id)
        assert isinstance(second, RetryLater) and second.countdown == 4
        assert deliver(job_id) == "delivered"
    callback = store.get(job_id)["callback"]
    assert callback["attempts"] == 3 and callback["error"] is None


def _given_up(reason: str) -> float:
    return metrics.CALLBACKS_FAILED.labels(reason)._value.get()


def test_delivery_window_ends_in_failed(store, configure):
    configure(callback_delivery_window_seconds=0)
    before = _given_up("window")
    with CallbackReceiver(status_codes=[503]) as receiver:
        job_id = finished_job(store, receiver.url)
        assert deliver(job_id) == "failed"
    callback = store.get(job_id)["callback"]
    assert callback["state"] == "failed" and "503" in callback["error"]
    assert deliver(job_id) == "failed"  # a late copy changes nothing
    assert _given_up("window") == before + 1  # counted once


def test_countdown_doubles_and_ends_with_the_window():
    settings = load_settings(callback_backoff_seconds=2, callback_backoff_max_seconds=600,
                             callback_delivery_window_seconds=3600)
    assert [callback_delivery.delivery_countdown(settings, n, 0) for n in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert callback_delivery.delivery_countdown(settings, 30, 0) == 600
    assert callback_delivery.delivery_countdown(settings, 30, 3500) == 100  # the last one at the window's end
    assert callback_delivery.delivery_countdown(settings, 30, 3600) is None


def test_private_callback_is_refused_at_delivery(store, configure):
    configure(callback_allow_loopback=False)
    before = _given_up("rejected")
    with CallbackReceiver() as receiver:
        job_id = finished_job(store, receiver.url)
        assert deliver(job_id) == "failed"
        assert receiver.received.empty()
    assert _given_up("rejected") == before + 1
    assert "loopback" in store.get(job_id)["callback"]["error"]


def test_signed_and_stable_event_id(store, configure):
    from tasks.callbacks import EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

    configure()
    with CallbackReceiver() as receiver:
        job_id = finished_job(store, receiver.url)
        assert deliver(job_id) == "delivered"
        got = receiver.wait(5)
    assert got["headers"][EVENT_ID_HEADER] == job_id
    assert verify("k", got["headers"][TIMESTAMP_HEADER], got["raw"], got["headers"][SIGNATURE_HEADER])


def test_unreachable_job_store_retries_the_tasks(monkeypatch):
    """Redis gone for longer than the job store waits: the tasks are retried, nothing is lost."""
    unreachable = JobStore("redis://127.0.0.1:1/0", ttl_seconds=60)
    monkeypatch.setattr(stem_tasks.app, "_stemgen_jobstore", unreachable, raising=False)
    monkeypatch.setattr(stem_tasks.app, "stemgen_settings", load_settings(), raising=False)
    for task in (stem_tasks.finalize_request, callback_delivery.deliver_callback):
        retried = []

        def retry(*args, exc=None, **kwargs):
            retried.append(exc)
            raise RetryLater(kwargs.get("countdown"))

        monkeypatch.setattr(task, "retry", retry)
        with pytest.raises(RetryLater):
            if task is stem_tasks.finalize_request:
                task.run([{"stem": "bass", "status": "completed"}], "0" * 32)
            else:
                task.run("0" * 32)
        assert isinstance(retried[0], worker_jobstore.JOBSTORE_UNREACHABLE)


def pending_deliveries(store) -> dict[str, float]:
    return dict(store._redis.zrange(store._DELIVERIES, 0, -1, withscores=True))


def test_pending_deliveries_are_scheduled_and_settled(store, configure, sent):
    configure()
    with CallbackReceiver(status_codes=[503]) as receiver:
        job_id = store.create({"generation_request_id": "g", "audio_file_id": "a",
                               "target_stems": ["bass"],
                               "parameters": {"target_bpm": 120, "duration_seconds": 4}},
                              ["bass"], receiver.url).job_id
        stem_tasks.finalize_request.run([{"stem": "bass", "status": "completed"}], job_id)
        handed_off = pending_deliveries(store)[job_id]  # due at once
        assert isinstance(deliver(job_id), RetryLater)
        assert pending_deliveries(store)[job_id] >= handed_off + 1.5  # rescheduled: next attempt
        assert deliver(job_id) == "delivered"
    assert pending_deliveries(store) == {}
    store.mark_delivery_enqueued(job_id)  # e.g. a late finalize copy: the entry comes back
    assert deliver(job_id) == "delivered" and pending_deliveries(store) == {}  # a copy settles it


def test_failed_for_good_and_gone_deliveries_are_settled(store, configure):
    configure(callback_delivery_window_seconds=0)
    with CallbackReceiver(status_codes=[503]) as receiver:
        job_id = finished_job(store, receiver.url)
        store.mark_delivery_enqueued(job_id)
        assert deliver(job_id) == "failed"
    assert pending_deliveries(store) == {}
    gone = finished_job(store, "http://127.0.0.1:9/cb")
    store.mark_delivery_enqueued(gone)
    store._redis.delete(store._job_key(gone))  # the record expired
    assert deliver(gone) == "gone" and pending_deliveries(store) == {}
