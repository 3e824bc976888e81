"""The outbox dispatcher against the real Redis job store: every job's chord is sent, once per
successful send; failures are tried again; a dead dispatcher's entries go to another."""

import threading
import time

import pytest
from kombu.exceptions import OperationalError

from tasks import stem_tasks
from tasks.dispatcher import DispatcherThread, OutboxDispatcher
from tasks.jobstore import JobStore
from tests.harness import REDIS

URL = f"{REDIS}/12"


@pytest.fixture
def store():
    s = JobStore(URL, ttl_seconds=120)
    s._redis.flushdb()
    return s


def req(rid, stems=("bass", "drums")):
    return {"generation_request_id": rid, "audio_file_id": "a", "target_stems": list(stems),
            "parameters": {"target_bpm": 120, "duration_seconds": 4}}


def new_job(store, rid="gen-1", stems=("bass", "drums")) -> str:
    return store.create(req(rid, stems), list(stems), None).job_id


class Broker:
    """Records the jobs it is sent; refuses them while ``down``."""

    def __init__(self):
        self.sent: list[str] = []
        self.down = False
        self.lock = threading.Lock()

    def __call__(self, job: dict) -> None:
        if self.down:
            raise OperationalError("connection refused")
        with self.lock:
            self.sent.append(job["job_id"])


def test_each_due_job_is_sent_once(store):
    broker = Broker()
    ids = [new_job(store, f"gen-{i}") for i in range(5)]
    dispatcher = OutboxDispatcher(store, broker, batch_size=3)
    assert dispatcher.dispatch_due() == 3
    assert dispatcher.dispatch_due() == 2
    assert dispatcher.dispatch_due() == 0
    assert broker.sent == ids
    assert all(store.get(j)["dispatched"] for j in ids)
    assert store.outbox_backlog() == (0, 0.0)


def test_broker_down_defers_the_job_until_it_is_back(store):
    broker = Broker()
    broker.down = True
    job_id = new_job(store)
    dispatcher = OutboxDispatcher(store, broker, retry_seconds=0.2, lease_seconds=30)
    assert dispatcher.dispatch_due() == 1
    assert broker.sent == [] and not store.get(job_id)["dispatched"]
    assert dispatcher.dispatch_due() == 0  # not due yet
    broker.down = False
    time.sleep(0.3)
    assert dispatcher.dispatch_due() == 1
    assert broker.sent == [job_id] and store.get(job_id)["dispatched"]


def test_broker_down_defers_the_rest_of_the_batch(store):
    broker = Broker()
    broker.down = True
    ids = [new_job(store, f"gen-{i}") for i in range(4)]
    dispatcher = OutboxDispatcher(store, broker, retry_seconds=0.2, lease_seconds=30)
    assert dispatcher.dispatch_due() == 4
    broker.down = False
    assert dispatcher.dispatch_due() == 0  # all deferred by the retry interval, not the lease
    time.sleep(0.3)
    assert dispatcher.dispatch_due() == 4 and broker.sent == ids


def test_a_dead_dispatchers_jobs_are_sent_after_the_lease(store):
    job_id = new_job(store)
    assert store.claim_due(10, lease_seconds=0.2) == [job_id]  # claimed, then its dispatcher died
    broker = Broker()
    dispatcher = OutboxDispatcher(store, broker)
    assert dispatcher.dispatch_due() == 0
    time.sleep(0.3)
    assert dispatcher.dispatch_due() == 1 and broker.sent == [job_id]


def test_dispatched_or_vanished_jobs_are_not_sent(store):
    done, gone = new_job(store, "gen-1"), new_job(store, "gen-2")
    store._redis.hset(store._job_key(done), "dispatched", 1)  # sent by a dispatcher whose lease ended
    store._redis.delete(store._job_key(gone))  # expired
    broker = Broker()
    assert OutboxDispatcher(store, broker).dispatch_due() == 2
    assert broker.sent == [] and store.outbox_backlog() == (0, 0.0)


def test_the_thread_dispatches_new_jobs_and_stops(store):
    broker = Broker()
    thread = DispatcherThread(OutboxDispatcher(store, broker, poll_seconds=0.02))
    thread.start()
    try:
        ids = [new_job(store, f"gen-{i}") for i in range(20)]
        deadline = time.monotonic() + 5
        while len(broker.sent) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        thread.stop(timeout=2)
    assert sorted(broker.sent) == sorted(ids)
    assert not thread._thread.is_alive()


def test_the_thread_survives_a_lost_job_store(store):
    unreachable = JobStore("redis://127.0.0.1:1/0")
    thread = DispatcherThread(OutboxDispatcher(unreachable, Broker(), poll_seconds=0.01))
    thread.start()
    time.sleep(0.2)
    assert thread._thread.is_alive()
    thread.stop(timeout=7)
    assert not thread._thread.is_alive()


class _Sent:
    """A canvas that records what was sent instead of publishing it."""

    def __init__(self, sent: list, *parts):
        self.sent, self.parts = sent, parts

    def apply_async(self):
        self.sent.append(self.parts)


def test_send_job_chord_sends_the_stems_then_finalize(store, monkeypatch):
    sent = []
    monkeypatch.setattr(stem_tasks, "chord", lambda header, body: _Sent(sent, list(header), body))
    job_id = new_job(store)
    job = store.get(job_id)
    stem_tasks.send_job_chord(job)
    header, body = sent[0]
    assert [(s.task, s.args, s.immutable) for s in header] == [
        ("stemgen.generate_stem", (job_id, "bass", job["request"]), True),
        ("stemgen.generate_stem", (job_id, "drums", job["request"]), True)]
    # finalize gets the stem results first (a mutable signature), then the job id
    assert (body.task, body.args, body.immutable) == ("stemgen.finalize_request", (job_id,), False)
    app = stem_tasks.app
    assert app.amqp.router.route({}, "stemgen.generate_stem")["queue"].name == app.stemgen_settings.stems_queue


def test_a_song_is_analysed_once_before_the_stems(store, monkeypatch):
    sent = []
    monkeypatch.setattr(stem_tasks, "chord", lambda header, body: ("chord", list(header), body))
    monkeypatch.setattr(stem_tasks, "chain", lambda *steps: _Sent(sent, *steps))
    job = store.get(new_job(store))
    job["request"]["parameters"]["condition_on_audio"] = True
    stem_tasks.send_job_chord(job)
    first, then = sent[0]
    assert (first.task, first.args) == ("stemgen.analyse_source", (job["job_id"], job["request"]))
    assert then[0] == "chord" and [s.task for s in then[1]] == ["stemgen.generate_stem"] * 2
    assert first.options["queue"] == then[1][0].options["queue"]


def test_overdue_deliveries_are_sent_again_once_per_grace_period(store):
    late, on_time = new_job(store, "gen-1"), new_job(store, "gen-2")
    store.mark_delivery_enqueued(late)  # due now; its message then lost
    store.update_delivery(on_time, "pending", next_attempt_at=time.time() + 60)
    resent = []
    dispatcher = OutboxDispatcher(store, Broker(), resend_delivery=resent.append,
                                  delivery_grace_seconds=0.2)
    assert dispatcher.resend_overdue_deliveries() == 0  # not yet past the grace period
    time.sleep(0.3)
    assert dispatcher.resend_overdue_deliveries() == 1 and resent == [late]
    assert dispatcher.resend_overdue_deliveries() == 0  # leased for another grace period
    time.sleep(0.3)
    assert dispatcher.resend_overdue_deliveries() == 1 and resent == [late, late]
    store.update_delivery(late, "delivered")
    time.sleep(0.3)
    assert dispatcher.resend_overdue_deliveries() == 0
    assert OutboxDispatcher(store, Broker()).resend_overdue_deliveries() == 0  # no sweep configured


def test_the_thread_resends_overdue_deliveries(store):
    job_id = new_job(store)
    store.mark_delivery_enqueued(job_id)
    resent = []
    thread = DispatcherThread(OutboxDispatcher(store, Broker(), poll_seconds=0.02,
                                               resend_delivery=resent.append,
                                               delivery_grace_seconds=0.1))
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not resent and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        thread.stop(timeout=2)
    assert resent and set(resent) == {job_id}
