"""JobStore's once-only transitions against the real Redis: creation, outbox, finish, delivery lock."""

import json
import threading
import time

import pytest

from tasks.jobstore import IdempotencyConflict, JobStore
from tests.harness import REDIS

URL = f"{REDIS}/12"


@pytest.fixture
def store():
    s = JobStore(URL, ttl_seconds=60)
    s._redis.flushdb()
    return s


def req(rid="gen-1", **params):
    return {"generation_request_id": rid, "audio_file_id": "a", "target_stems": ["bass"],
            "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0, **params}}


def test_claim_whose_record_is_gone_is_replaced(store):
    first = store.create(req(), ["bass"], "http://cb")
    store._redis.delete(store._job_key(first.job_id))  # expired, or lost in a Redis failover
    again = store.create(req(), ["bass"], "http://cb")
    assert again.created and again.job_id != first.job_id
    assert store.get(again.job_id)["status"] == "queued"
    assert store.create(req(), ["bass"], "http://cb") == type(again)(again.job_id, created=False)


def test_unreadable_claim_is_replaced(store):
    store._redis.set(store._request_key("gen-1"), "not json")
    assert store.create(req(), ["bass"], None).created


def test_claim_and_record_share_the_ttl(store):
    job_id = store.create(req(), ["bass"], None).job_id
    assert 0 < store._redis.ttl(store._request_key("gen-1")) <= 60
    assert 0 < store._redis.ttl(store._job_key(job_id)) <= 60


def test_concurrent_identical_submissions_create_one_job(store):
    results, errors = [], []
    barrier = threading.Barrier(16)

    def submit(body):
        barrier.wait()
        try:
            results.append(store.create(body, ["bass"], None))
        except IdempotencyConflict as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(req(seed=1 if i % 4 else 2),)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.created for r in results) == 1
    assert len({r.job_id for r in results}) == 1
    # Whichever body won, every submission of the other one is a conflict.
    assert len(errors) in (4, 12) and len(errors) + len(results) == 16
    assert len(store._redis.keys("stemgen:job:*")) == 1


def test_a_new_job_enters_the_outbox_once(store):
    job_id = store.create(req(), ["bass"], None).job_id
    assert store._redis.zrange(store._OUTBOX, 0, -1) == [job_id]
    assert not store.create(req(), ["bass"], None).created  # a replay adds no entry
    assert store._redis.zcard(store._OUTBOX) == 1
    assert not store.get(job_id)["dispatched"]


def test_outbox_entries_are_leased_deferred_and_taken_out(store):
    first = store.create(req("gen-1"), ["bass"], None).job_id
    second = store.create(req("gen-2"), ["bass"], None).job_id
    assert store.claim_due(10, lease_seconds=30) == [first, second]  # oldest first
    assert store.claim_due(10, lease_seconds=30) == []  # leased
    count, overdue = store.outbox_backlog()
    assert count == 2 and overdue == 0.0
    store.defer_dispatch(first, 0.0)
    assert store.claim_due(10, lease_seconds=30) == [first]
    store.mark_dispatched(first)
    assert store.get(first)["dispatched"] and store._redis.zcard(store._OUTBOX) == 1
    store.drop_from_outbox(second)
    assert store.outbox_backlog() == (0, 0.0)


def test_claim_due_respects_the_limit_and_the_lease_end(store):
    ids = [store.create(req(f"gen-{i}"), ["bass"], None).job_id for i in range(5)]
    assert store.claim_due(2, lease_seconds=0.2) == ids[:2]
    assert store.claim_due(10, lease_seconds=30) == ids[2:]
    assert store.claim_due(10, lease_seconds=30) == []
    time.sleep(0.3)  # the first lease ends: its holder is presumed dead
    # (both are due again at the same instant: Redis orders such ties by member, not by age)
    assert sorted(store.claim_due(10, lease_seconds=30)) == sorted(ids[:2])
    assert store.outbox_backlog()[0] == 5


def test_mark_dispatched_does_not_recreate_an_expired_record(store):
    job_id = store.create(req(), ["bass"], None).job_id
    store._redis.delete(store._job_key(job_id))
    store.mark_dispatched(job_id)
    assert not store._redis.exists(store._job_key(job_id))
    assert store._redis.zcard(store._OUTBOX) == 0


def test_overdue_backlog_is_reported(store):
    store.create(req(), ["bass"], None)
    time.sleep(0.2)
    count, overdue = store.outbox_backlog()
    assert count == 1 and 0.15 < overdue < 5


def test_finish_keeps_the_first_result(store):
    job_id = store.create(req(), ["bass"], "http://cb").job_id
    assert store.finish(job_id, "completed", {"status": "completed", "n": 1})
    assert not store.finish(job_id, "failed", {"status": "failed"})
    job = store.get(job_id)
    assert job["status"] == "completed" and job["callback_payload"]["n"] == 1
    assert not store.finish("0" * 32, "completed", {})  # no record: nothing is written
    assert not store._redis.exists(store._job_key("0" * 32))


def test_delivery_lock_and_attempts(store):
    job_id = store.create(req(), ["bass"], "http://cb").job_id
    token = store.acquire_delivery_lock(job_id, 30)
    assert token and store.acquire_delivery_lock(job_id, 30) is None
    store.release_delivery_lock(job_id, "someone-else")  # not the holder: no effect
    assert store.acquire_delivery_lock(job_id, 30) is None
    store.release_delivery_lock(job_id, token)
    assert store.acquire_delivery_lock(job_id, 30)

    attempts, started = store.start_delivery_attempt(job_id)
    assert attempts == 1 and store.get(job_id)["callback"]["state"] == "delivering"
    attempts2, started2 = store.start_delivery_attempt(job_id)
    assert attempts2 == 2 and started2 == started  # the window starts at the first attempt
    store.update_delivery(job_id, "pending", error="down", next_attempt_at=started + 10)
    callback = store.get(job_id)["callback"]
    assert callback["state"] == "pending" and callback["next_attempt_at"] == started + 10
    store.update_delivery(job_id, "delivered")
    callback = store.get(job_id)["callback"]
    assert callback["state"] == "delivered" and "next_attempt_at" not in callback
    assert callback["delivered_at"] >= started and callback["attempts"] == 2


def test_runs_are_counted_per_stem(store):
    job_id = store.create(req(), ["bass"], None).job_id
    assert "runs" not in store.get(job_id)["stems"][0]
    store.count_run(job_id, "bass")
    assert store.count_run(job_id, "bass") == 2
    assert store.get(job_id)["stems"][0]["runs"] == 2


def test_delivery_enqueued_flag(store):
    job_id = store.create(req(), ["bass"], "http://cb").job_id
    assert not store.get(job_id)["delivery_enqueued"]
    store.mark_delivery_enqueued(job_id)
    assert store.get(job_id)["delivery_enqueued"]
    assert json.loads(store._redis.get(store._request_key("gen-1")))["job_id"] == job_id
