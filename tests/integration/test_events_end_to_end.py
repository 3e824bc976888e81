"""Live progress on real parts: a gunicorn gateway (gevent workers), a Celery worker (tiny MusicGen),
Redis and Azurite. A plain HTTP client follows GET /jobs/<id>/events while the job runs, then
reconnects with Last-Event-ID; GET /jobs lists the job.

The stack has Redis DBs of its own (6 and 7): the outbox is per DB, and two stacks on one DB would
dispatch each other's jobs.
"""

import json
import time
import uuid

import pytest
import requests

from tests.harness import REDIS, running_stack, service_env

KEY = "e2e-events-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEMS = ["guitar", "bass"]


@pytest.fixture(scope="module")
def events_stack(tmp_path_factory):
    import redis

    tmp = tmp_path_factory.mktemp("events-stack")
    env = service_env(tmp, BROKER_URL=f"{REDIS}/6", RESULT_BACKEND=f"{REDIS}/7",
                      STEMGEN_API_KEYS=KEY, EVENTS_HEARTBEAT_SECONDS="1")
    for db in (6, 7):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
    try:
        with running_stack(env, tmp) as (base, _, _):
            yield base
    finally:
        for db in (6, 7):
            redis.Redis.from_url(f"{REDIS}/{db}").flushdb()


def read_stream(base: str, job_id: str, last_event_id: str | None = None) -> list[dict]:
    """Every event of one connection, with the time it arrived, once the server ended the stream
    (a stream that does not end raises requests' ReadTimeout after 60 s without a byte)."""
    headers = dict(AUTH, **({"Last-Event-ID": last_event_id} if last_event_id else {}))
    events, block = [], {}
    with requests.get(f"{base}/jobs/{job_id}/events", headers=headers, stream=True,
                      timeout=(5, 60)) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.iter_lines(chunk_size=None, decode_unicode=True):
            if line:
                name, _, value = line.partition(":")
                block[name] = value.lstrip(" ")
                continue
            if "event" in block:
                events.append({"id": block.get("id"), "event": block["event"],
                               "data": json.loads(block["data"]), "at": time.time()})
            block = {}
    return events


def test_progress_events_in_order_resume_and_end(events_stack):
    base = events_stack
    body = {"generation_request_id": f"gen-{uuid.uuid4().hex[:10]}", "audio_file_id": "audio-1",
            "target_stems": STEMS,
            "parameters": {"target_bpm": 120.0, "duration_seconds": 6.0, "seed": 3}}
    accepted = requests.post(f"{base}/generate", json=body, headers=AUTH, timeout=10)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]

    events = read_stream(base, job_id)
    kinds = [(e["event"], e["data"].get("stem"), e["data"]["status"]) for e in events]
    assert kinds[0] == ("job", None, "queued")
    assert kinds[1] == ("job", None, "running")
    assert kinds[-1] == ("job", None, "completed")
    assert [k for k in kinds if k[0] == "job"] == [("job", None, s) for s in ("queued", "running", "completed")]
    for stem in STEMS:
        mine = [e for e in events if e["data"].get("stem") == stem]
        assert mine[0]["event"] == "stem" and mine[0]["data"]["status"] == "running"
        assert mine[-1]["event"] == "stem" and mine[-1]["data"]["status"] == "completed"
        assert mine[-1]["data"]["url"].startswith("http")
        progress = [e["data"]["progress"] for e in mine if e["event"] == "progress"]
        assert len(progress) >= 5, progress  # MusicGen's progress, stored every 2 %
        assert progress == sorted(progress) and 0 < progress[-1] < 1
    ids = [tuple(map(int, e["id"].split("-"))) for e in events]
    assert ids == sorted(set(ids))  # increasing: in order, no repeats
    job = requests.get(f"{base}/jobs/{job_id}", headers=AUTH, timeout=5).json()
    assert job["status"] == "completed"
    # The stream was open while the job ran: the first event came before the job finished.
    assert events[0]["at"] < job["finished_at"]

    cut = len(events) // 2
    resumed = read_stream(base, job_id, last_event_id=events[cut]["id"])
    assert [e["id"] for e in resumed] == [e["id"] for e in events[cut + 1:]]
    assert read_stream(base, job_id, last_event_id=events[-1]["id"]) == []

    listed = requests.get(f"{base}/jobs", params={"generation_request_id": body["generation_request_id"]},
                          headers=AUTH, timeout=5).json()
    assert [(j["job_id"], j["status"]) for j in listed["jobs"]] == [(job_id, "completed")]
