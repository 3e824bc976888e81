"""JobStore against the real Redis."""

import pytest

from tasks.jobstore.records import source_excerpt_key
from tasks.jobstore import IdempotencyConflict, JobNotFound, JobStore, request_fingerprint
from tests.harness import REDIS

URL = f"{REDIS}/13"


@pytest.fixture
def store():
    s = JobStore(URL, ttl_seconds=60)
    s._redis.flushdb()
    return s


def req(rid="gen-1", **params):
    return {"generation_request_id": rid, "audio_file_id": "a", "target_stems": ["bass", "drums"],
            "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0, **params}}


def test_fingerprint_ignores_key_order():
    assert request_fingerprint({"a": 1, "b": [1, 2]}) == request_fingerprint({"b": [1, 2], "a": 1})
    assert request_fingerprint({"a": 1}) != request_fingerprint({"a": 2})


def test_create_is_idempotent_per_request_id(store):
    first = store.create(req(), ["bass", "drums"], "http://cb")
    again = store.create(req(), ["bass", "drums"], "http://cb")
    assert first.created and not again.created
    assert again.job_id == first.job_id
    with pytest.raises(IdempotencyConflict):
        store.create(req(seed=3), ["bass", "drums"], "http://cb")
    assert store.create(req("gen-2"), ["bass"], None).job_id != first.job_id


def test_stem_progress_and_job_state(store):
    job_id = store.create(req(), ["bass", "drums"], "http://cb").job_id
    job = store.get(job_id)
    assert job["status"] == "queued" and job["progress"] == 0.0
    assert job["callback"] == {"url": "http://cb", "state": "pending", "attempts": 0, "error": None}
    store.update_stem(job_id, "bass", "running", 0.5)
    job = store.get(job_id)
    assert job["status"] == "running"
    assert job["progress"] == 0.25
    store.update_stem(job_id, "bass", "completed", 1.0, url="http://x", bpm=120.0)
    store.update_stem(job_id, "drums", "failed", 1.0, error="boom")
    job = store.get(job_id)
    assert job["stems"][0]["url"] == "http://x"
    assert job["stems"][1]["error"] == "boom"
    assert job["progress"] == 1.0
    store.finish(job_id, "partial", {"status": "partial"})
    store.update_delivery(job_id, "delivered", attempts=1)
    job = store.get(job_id)
    assert job["status"] == "partial"
    assert job["callback_payload"] == {"status": "partial"}
    assert job["callback"]["state"] == "delivered" and job["callback"]["attempts"] == 1


def test_missing_job(store):
    with pytest.raises(JobNotFound):
        store.get("0" * 32)


def test_rejects_non_redis_backend():
    with pytest.raises(ValueError):
        JobStore("rpc://")


def test_plan_recorded_at_creation_or_claimed_once(store):
    plan = {"key": "A minor", "bpm": 120.0, "chords": ["Am", "F"]}
    with_plan = store.create(req(), ["bass"], None, plan).job_id
    assert store.get(with_plan)["plan"] == plan
    assert store.claim_plan(with_plan, {"key": "C major"}) == plan  # the recorded one wins
    later = store.create(req("gen-later"), ["bass"], None).job_id
    assert store.get(later)["plan"] is None
    first = {"key": "D minor", "bpm": 97.0}
    assert store.claim_plan(later, first) == first
    assert store.claim_plan(later, {"key": "E major", "bpm": 97.0}) == first
    assert store.get(later)["plan"] == first


def test_finished_job_exposes_error_and_coherence(store):
    job_id = store.create(req(), ["bass"], None).job_id
    assert store.get(job_id)["error"] is None and store.get(job_id)["coherence"] is None
    store.finish(job_id, "failed", {"error": "bass: no source audio", "coherence": None})
    assert store.get(job_id)["error"] == "bass: no source audio"


def test_the_songs_analysis_is_recorded_once_with_its_plan_and_excerpt(store):
    job_id = store.create(req(), ["bass", "drums"], None, {"key": "A minor", "bpm": 120.0}).job_id
    assert store.source_of(job_id) is None and store.source_excerpt(job_id) is None
    first = store.record_source(job_id, {"grid": "song-beats"}, {"key": "A minor", "bpm": 120.0,
                                                                  "source_audio": {"bpm": 119.8}},
                                b"\x00\x01flac")
    assert first == {"grid": "song-beats"}
    # a second analysis (a redelivered message) changes nothing
    again = store.record_source(job_id, {"grid": "constant-bpm"}, {"key": "C major"}, b"other")
    assert again == first == store.source_of(job_id)
    assert store.get(job_id)["plan"] == {"key": "A minor", "bpm": 120.0, "source_audio": {"bpm": 119.8}}
    assert store.source_excerpt(job_id) == b"\x00\x01flac"
    assert 0 < store._redis.ttl(source_excerpt_key(job_id)) <= 60  # at most as long as the job
    store.drop_source_excerpt(job_id)  # the job finished
    assert store.source_excerpt(job_id) is None and store.source_of(job_id) == first
    # a failed analysis records its error and leaves the plan as it was
    other = store.create(req("gen-2"), ["bass"], None).job_id
    assert store.record_source(other, {"error": "no source audio"}, None) == {"error": "no source audio"}
    assert store.get(other)["plan"] is None and store.source_excerpt(other) is None
