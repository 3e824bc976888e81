"""Two API keys on the real stack (gunicorn, Celery worker, Redis, Azurite, callback receiver):
tenants stay apart, and the per-key limits hold under a burst through two gateway processes."""

import threading
import time
import uuid

import pytest
import requests

from api.auth import key_id_of
from stemgen_settings import load_settings
from storage import store_from_settings
from tasks.jobstore import JobStore
from tests.harness import (REDIS, TEST_RESULT_DB, CallbackReceiver, groove_wav, running_stack,
                           service_env, start_gateway)

FIRST, SECOND = "tenant-first-0123456789", "tenant-second-0123456789"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def job_body(rid: str, audio_file_id: str = "song.wav", **parameters) -> dict:
    return {"generation_request_id": rid, "audio_file_id": audio_file_id, "target_stems": ["bass"],
            "parameters": {"duration_seconds": 2.0, "style": "rock", "seed": 3,
                           "condition_on_audio": True, **parameters}}


@pytest.fixture(scope="module")
def receiver():
    with CallbackReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, receiver):
    tmp = tmp_path_factory.mktemp("tenants")
    env = service_env(tmp, DEFAULT_CALLBACK_URL=receiver.url, STEMGEN_API_KEYS=f"{FIRST},{SECOND}",
                      SOURCE_AUDIO_CONTAINER=f"src-{uuid.uuid4().hex[:10]}")
    settings = load_settings(source_audio_container=env["SOURCE_AUDIO_CONTAINER"])
    # the first key's song, under its prefix (docs/api.md "Source songs")
    store_from_settings(settings, container=settings.source_audio_container).upload(
        f"{key_id_of(FIRST)}/song.wav", groove_wav(120.0, seconds=6.0), content_type="audio/wav")
    with running_stack(env, tmp, name="tenants") as (base, worker, gateway):
        yield {"base": base, "worker": worker}


def callbacks_for(receiver, job_ids: set[str], timeout: float) -> dict[str, dict]:
    deadline, found = time.monotonic() + timeout, {}
    while set(found) != job_ids:
        payload = receiver.wait(timeout=max(1.0, deadline - time.monotonic()))["json"]
        if payload["job_id"] in job_ids:
            found[payload["job_id"]] = payload
    return found


def test_the_second_key_cannot_read_follow_cancel_reuse_or_condition_on_the_first_keys_job(
        tenants, receiver):
    base, rid = tenants["base"], f"gen-{uuid.uuid4().hex[:10]}"
    first = requests.post(f"{base}/generate", json=job_body(rid), headers=auth(FIRST), timeout=10)
    assert first.status_code == 202, first.text
    job = first.json()["job_id"]

    unknown = requests.get(f"{base}/jobs/{'0' * 32}", headers=auth(SECOND), timeout=10)
    for answer in (requests.get(f"{base}/jobs/{job}", headers=auth(SECOND), timeout=10),
                   requests.get(f"{base}/jobs/{job}/events", headers=auth(SECOND), timeout=10),
                   requests.delete(f"{base}/jobs/{job}", headers=auth(SECOND), timeout=10)):
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == unknown.json()["error"]["code"]
        assert answer.json()["error"]["message"] == f"no job {job!r}"  # as for any unknown id

    # the same id and body under the second key: its own job, conditioned on its own (absent) song
    same = requests.post(f"{base}/generate", json=job_body(rid), headers=auth(SECOND), timeout=10)
    assert same.status_code == 202 and same.json()["job_id"] != job
    # a different body under that id: a conflict with the second key's job, never the first's
    different = requests.post(f"{base}/generate", json=job_body(rid, seed=4), headers=auth(SECOND),
                              timeout=10)
    assert different.status_code == 409 and job not in different.text
    assert same.json()["job_id"] in different.text
    # a name that would climb into the first key's prefix
    climb = requests.post(f"{base}/generate",
                          json=job_body(f"gen-{uuid.uuid4().hex[:10]}",
                                        f"../{key_id_of(FIRST)}/song.wav"),
                          headers=auth(SECOND), timeout=10)
    assert climb.status_code == 202

    found = callbacks_for(receiver, {job, same.json()["job_id"], climb.json()["job_id"]}, 300)
    mine = found[job]
    assert mine["status"] == "completed", mine
    (stem,) = mine["stems"]
    assert stem["blob_name"] == f"{job}/bass.wav"
    assert stem["source_region"]["bars"] >= 1  # the first key's song was analysed and used
    before = requests.get(stem["url"], timeout=10).content
    for other in (same.json()["job_id"], climb.json()["job_id"]):
        assert found[other]["status"] == "failed"
        (failed,) = found[other]["stems"]
        assert "blob_name" not in failed
    assert "no source audio 'song.wav'" in found[same.json()["job_id"]]["error"]
    assert "not a plain blob name" in found[climb.json()["job_id"]]["error"]
    assert requests.get(stem["url"], timeout=10).content == before  # untouched
    status = requests.get(f"{base}/jobs/{job}", headers=auth(FIRST), timeout=10).json()
    assert status["status"] == "completed" and status["cancel_requested_at"] is None


def test_limits_hold_under_a_burst_through_two_gateways(tmp_path):
    env = service_env(tmp_path, STEMGEN_API_KEYS=FIRST, MAX_ACTIVE_JOBS_PER_KEY="5",
                      MAX_SUBMISSIONS_PER_MINUTE_PER_KEY="8")
    store = JobStore(f"{REDIS}/{TEST_RESULT_DB}")
    owner = key_id_of(FIRST)
    for key in ("live-jobs", "submissions"):  # this key's state from an earlier run
        store._redis.delete(f"stemgen:{key}:{owner}")
    gateways = []
    try:
        for n in range(2):
            (tmp_path / f"g{n}").mkdir()
            gateways.append(start_gateway(env, tmp_path / f"g{n}"))

        def burst(count: int) -> list[requests.Response]:
            answers, lock, start = [], threading.Lock(), threading.Barrier(count)

            def send(n: int) -> None:
                base = gateways[n % 2][1]
                body = job_body(f"burst-{uuid.uuid4().hex[:12]}", condition_on_audio=False,
                                target_bpm=120)
                start.wait()
                answer = requests.post(f"{base}/generate", json=body, headers=auth(FIRST), timeout=30)
                with lock:
                    answers.append(answer)

            threads = [threading.Thread(target=send, args=(n,)) for n in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert len(answers) == count
            return answers

        def refused_for(answers, limit):
            refused = [a for a in answers if a.status_code == 429]
            for answer in refused:
                assert int(answer.headers["Retry-After"]) >= 1
                assert answer.json()["error"]["fields"][0]["field"] == limit
            return len(refused)

        first = burst(20)  # no worker runs: the admitted jobs stay active
        admitted = [a.json()["job_id"] for a in first if a.status_code == 202]
        assert len(admitted) == 5
        assert refused_for(first, "max_active_jobs") == 15
        for job_id in admitted:  # they finish: the active limit frees, the minute's count stays
            assert store.finish(job_id, "completed", {"error": None})
        second = burst(20)
        assert sum(a.status_code == 202 for a in second) == 3  # 8 a minute, 5 already
        assert refused_for(second, "max_submissions_per_minute") == 17
    finally:
        for gateway, _ in gateways:
            gateway.stop()
