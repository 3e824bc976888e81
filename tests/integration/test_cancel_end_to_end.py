"""DELETE /jobs/<id> on real parts: gunicorn gateway, Celery worker (tiny MusicGen, batch window
1.5 s so that two jobs' stems share one MusicGen call), Redis DBs 2/3, Azurite and a callback
receiver.

- A job cancelled while its stem shares a batch with another job's stem stops within about a
  second; the other job completes, and its stem is bit-identical to the same stem of an earlier,
  uncancelled run with the same seed and the same batch (the worker's batch-size histogram shows
  both runs were one 2-row call).
- Each cancelled job ends `cancelled` with one callback saying so; a job cancelled before its
  stems start never generates anything.
"""

import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import REDIS, CallbackReceiver, free_port, running_stack, service_env, wait_job

DURATION = 24.0  # seconds per stem: long enough (on the tiny model) to cancel in the middle


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cancel")
    with CallbackReceiver() as receiver:
        metrics_port = free_port()
        env = service_env(tmp, BROKER_URL=f"{REDIS}/2", RESULT_BACKEND=f"{REDIS}/3",
                          DEFAULT_CALLBACK_URL=receiver.url, BATCH_WINDOW_SECONDS="1.5",
                          BATCH_MAX_SIZE="4", WORKER_METRICS_PORT=str(metrics_port),
                          WORKER_METRICS_ADDR="127.0.0.1", CANCEL_POLL_SECONDS="0.2")
        with running_stack(env, tmp, name="cancel") as (base, _, _):
            yield {"base": base, "receiver": receiver,
                   "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}


def submit(base, stem, seed=17, duration=DURATION):
    body = {"generation_request_id": f"cancel-{uuid.uuid4().hex[:10]}", "audio_file_id": "audio-1",
            "target_stems": [stem],
            "parameters": {"target_bpm": 120, "duration_seconds": duration, "seed": seed}}
    answer = requests.post(f"{base}/generate", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["job_id"]


def batch_sizes(url) -> tuple[float, float]:
    """(calls, rows) of the worker's batch-size histogram."""
    samples = {s.name: s.value for family in text_string_to_metric_families(requests.get(url, timeout=5).text)
               for s in family.samples if s.name.startswith("stemgen_batch_size")}
    return samples.get("stemgen_batch_size_count", 0.0), samples.get("stemgen_batch_size_sum", 0.0)


def wait_running(base, job_id, above=0.05, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{base}/jobs/{job_id}", timeout=5).json()
        if job["stems"][0]["status"] == "running" and job["stems"][0]["progress"] > above:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not start")


def callbacks_for(receiver, job_ids, timeout=120):
    """Every callback received until each of ``job_ids`` had one (and 2 s more for duplicates)."""
    got, deadline = [], time.monotonic() + timeout
    while {c["json"]["job_id"] for c in got} < set(job_ids) and time.monotonic() < deadline:
        try:
            got.append(receiver.wait(timeout=1))
        except Exception:
            pass
    time.sleep(2)
    while not receiver.received.empty():
        item = receiver.received.get()
        if 200 <= item["status"] < 300:
            got.append(item)
    return got


def stem_bytes(job):
    return requests.get(job["stems"][0]["url"], timeout=10).content


def test_cancel_during_a_shared_batch_leaves_the_other_job_bit_identical(stack):
    base, receiver = stack["base"], stack["receiver"]
    calls0, rows0 = batch_sizes(stack["metrics"])
    # reference: the same two stems, same seed, uncancelled
    ref_keep, ref_other = submit(base, "bass"), submit(base, "guitar")
    reference = wait_job(base, ref_keep, 240)
    assert wait_job(base, ref_other, 240)["status"] == "completed"
    calls1, rows1 = batch_sizes(stack["metrics"])
    assert (calls1 - calls0, rows1 - rows0) == (1, 2)  # one call of two rows
    callbacks_for(receiver, [ref_keep, ref_other])

    keep, drop = submit(base, "bass"), submit(base, "guitar")
    wait_running(base, drop)
    asked = time.monotonic()
    answer = requests.delete(f"{base}/jobs/{drop}", timeout=5)
    assert answer.status_code == 202 and answer.json()["status"] == "cancelling"
    assert requests.delete(f"{base}/jobs/{drop}", timeout=5).status_code == 202  # idempotent
    cancelled = wait_job(base, drop, 60, states=("cancelled",))
    stopped_after = time.monotonic() - asked
    assert cancelled["stems"][0]["status"] == "cancelled"
    assert cancelled["stems"][0]["progress"] < 0.9
    assert stopped_after < 5, stopped_after  # poll 0.2 s + the next step + finalize
    kept = wait_job(base, keep, 240)
    assert kept["status"] == "completed"
    calls2, rows2 = batch_sizes(stack["metrics"])
    assert (calls2 - calls1, rows2 - rows1) == (1, 2)  # the same batch as the reference
    assert stem_bytes(kept) == stem_bytes(reference)  # bit-identical audio

    got = callbacks_for(receiver, [keep, drop])
    by_job = {}
    for item in got:
        by_job.setdefault(item["json"]["job_id"], []).append(item["json"])
    assert [c["status"] for c in by_job[drop]] == ["cancelled"]  # once
    assert [c["status"] for c in by_job[keep]] == ["completed"]
    assert by_job[drop][0]["stems"][0]["status"] == "cancelled"
    assert requests.delete(f"{base}/jobs/{keep}", timeout=5).status_code == 409
    assert requests.delete(f"{base}/jobs/{drop}", timeout=5).status_code == 409


def test_a_job_cancelled_before_it_starts_never_generates(stack):
    base, receiver = stack["base"], stack["receiver"]
    blocker = submit(base, "drums", seed=1, duration=20.0)  # holds the batcher meanwhile
    wait_running(base, blocker, above=0.0)
    queued = submit(base, "bass", seed=2, duration=4.0)
    assert requests.delete(f"{base}/jobs/{queued}", timeout=5).status_code == 202
    job = wait_job(base, queued, 120, states=("cancelled",))
    assert job["stems"][0]["status"] == "cancelled"
    assert "runs" not in job["stems"][0]  # no generation was counted
    assert wait_job(base, blocker, 240)["status"] == "completed"
    got = [c["json"] for c in callbacks_for(receiver, [queued, blocker])]
    assert [c["status"] for c in got if c["job_id"] == queued] == ["cancelled"]
