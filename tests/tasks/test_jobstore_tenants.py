"""Tenancy and per-key limits of the JobStore against the real Redis: each API key's jobs, claims
and limits are its own; the limits hold under concurrent submissions from separate clients."""

import json
from types import SimpleNamespace
import threading

import pytest

from storage import InvalidBlobName, source_blob_name
from tasks.jobstore import IdempotencyConflict, JobNotFound, JobStore, LimitExceeded
from tests.harness import REDIS

URL = f"{REDIS}/12"
A, B = "a" * 16, "b" * 16


def req(rid="gen-1", **params):
    return {"generation_request_id": rid, "audio_file_id": "a", "target_stems": ["bass"],
            "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0, **params}}


def test_the_same_request_id_under_two_keys_makes_two_jobs(store):
    first = store.create(req(), ["bass"], None, owner=A)
    same_body = store.create(req(), ["bass"], None, owner=B)
    assert same_body.created and same_body.job_id != first.job_id
    # B's claim is B's: a different body under B conflicts with B's own job, never A's
    with pytest.raises(IdempotencyConflict) as conflict:
        store.create(req(seed=3), ["bass"], None, owner=B)
    assert conflict.value.job_id == same_body.job_id
    assert store.create(req(), ["bass"], None, owner=A).job_id == first.job_id  # A's claim holds


def test_another_keys_job_is_not_found_and_not_cancelled(store):
    job_id = store.create(req(), ["bass"], None, owner=A).job_id
    with pytest.raises(JobNotFound):
        store.get(job_id, B)
    with pytest.raises(JobNotFound):
        store.request_cancel(job_id, B)
    assert store.get(job_id, A)["status"] == "queued"
    assert not store.cancel_requested(job_id)
    assert store.get(job_id)["owner"] == A  # no owner given: any job (workers, admins)
    store.request_cancel(job_id, A)
    assert store.get(job_id, A)["status"] == "cancelling"


def test_a_job_without_owner_is_found_only_without_an_owner_filter(store):
    job_id = store.create(req(), ["bass"], None).job_id  # an open API's job
    with pytest.raises(JobNotFound):
        store.get(job_id, A)
    assert store.get(job_id)["job_id"] == job_id
    assert store.get(job_id, "")["job_id"] == job_id


def test_a_claim_from_before_per_key_claims_is_honoured_for_its_own_owner_only(store):
    # a job recorded under the global claim, as before claims were per key
    old = store.create(req(), ["bass"], None, owner=A)
    claim = store._redis.get(store._request_key("gen-1", A))
    store._redis.delete(store._request_key("gen-1", A))
    store._redis.set(store._request_key("gen-1"), claim)
    again = store.create(req(), ["bass"], None, owner=A)
    assert (again.job_id, again.created) == (old.job_id, False)
    other = store.create(req(), ["bass"], None, owner=B)
    assert other.created and other.job_id != old.job_id
    page = store.list_jobs(A, generation_request_id="gen-1")
    assert [job["job_id"] for job in page.jobs] == [old.job_id]


def test_the_active_jobs_limit_counts_live_jobs_only(store):
    limits = dict(owner=A, max_active_jobs=2)
    first = store.create(req("r1"), ["bass"], None, **limits).job_id
    second = store.create(req("r2"), ["bass"], None, **limits).job_id
    with pytest.raises(LimitExceeded) as refused:
        store.create(req("r3"), ["bass"], None, **limits)
    assert refused.value.limit == "max_active_jobs" and refused.value.value == 2
    assert refused.value.retry_after_seconds >= 1
    assert store._redis.scard("stemgen:live-jobs:" + A) == 2  # the refused one left no trace
    # a repeated request is never refused, and B has its own limit
    assert store.create(req("r1"), ["bass"], None, **limits).job_id == first
    assert store.create(req("r3"), ["bass"], None, owner=B, max_active_jobs=2).created
    # a finished job leaves the set; an expired record is dropped at the next submission
    assert store.finish(first, "completed", {"error": None})
    store.create(req("r3"), ["bass"], None, **limits)
    store._redis.delete(store._job_key(second))
    store.create(req("r4"), ["bass"], None, **limits)
    assert store._redis.scard("stemgen:live-jobs:" + A) == 2


def test_the_submissions_a_minute_limit_says_when_to_retry(store):
    limits = dict(owner=A, max_submissions_per_minute=3)
    for n in range(3):
        store.create(req(f"r{n}"), ["bass"], None, **limits)
    with pytest.raises(LimitExceeded) as refused:
        store.create(req("r9"), ["bass"], None, **limits)
    assert refused.value.limit == "max_submissions_per_minute" and refused.value.value == 3
    assert 1 <= refused.value.retry_after_seconds <= 60
    assert store.create(req("r0"), ["bass"], None, **limits).created is False  # a repeat passes


def test_no_limits_without_keys(store):
    for n in range(4):
        assert store.create(req(f"r{n}"), ["bass"], None, max_active_jobs=1,
                            max_submissions_per_minute=1).created


def test_concurrent_submissions_from_separate_clients_never_overrun_the_limits(store):
    """Eight clients (each its own JobStore and connections, as gateway processes have) submit
    40 new jobs at once under one key: exactly the limit is admitted."""
    results: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def client(n: int) -> None:
        mine = JobStore(URL, ttl_seconds=60)
        start.wait()
        for i in range(5):
            try:
                mine.create(req(f"c{n}-{i}"), ["bass"], None, owner=A, max_active_jobs=7,
                            max_submissions_per_minute=100)
                outcome = "admitted"
            except LimitExceeded as exc:
                outcome = exc.limit
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 40
    assert results.count("admitted") == 7
    assert results.count("max_active_jobs") == 33
    assert store._redis.scard("stemgen:live-jobs:" + A) == 7
    assert len(store.list_jobs(A, limit=100).jobs) == 7


def test_an_admin_lists_every_job(store):
    mine = store.create(req("r1"), ["bass"], None, owner=A).job_id
    theirs = store.create(req("r1"), ["bass"], None, owner=B).job_id
    assert {job["job_id"] for job in store.list_jobs("*").jobs} == {mine, theirs}
    assert [job["job_id"] for job in store.list_jobs(A).jobs] == [mine]
    found = store.list_jobs("*", generation_request_id="r1").jobs
    assert {job["job_id"] for job in found} == {mine, theirs}


def test_source_songs_are_under_the_owners_prefix():
    assert source_blob_name(A, "songs/take-1.wav") == f"{A}/songs/take-1.wav"
    assert source_blob_name("", "songs/take-1.wav") == "songs/take-1.wav"  # an open API
    for name in ("../x/song.wav", "a/../../b", "/song.wav", "a//b", ".", "a\\b"):
        with pytest.raises(InvalidBlobName):
            source_blob_name(A, name)


def test_the_chord_carries_the_owner_for_the_source_song(store, monkeypatch):
    from tasks import stem_tasks

    job_id = store.create(req(), ["bass"], None, owner=A).job_id
    chords = []
    monkeypatch.setattr(stem_tasks, "chord", lambda header, body: SimpleNamespace(
        apply_async=lambda: chords.append(list(header))))
    stem_tasks.send_job_chord(store.get(job_id))
    (signature,) = chords[0]
    assert signature.args[2]["owner"] == A
    assert json.loads(store._redis.hget(store._job_key(job_id), "request")).get("owner") is None

