"""A generation that outlives its deadline, on the real stack: its stem fails with a clear error
within the deadline, the worker exits non-zero (tasks.device_watchdog), and a fresh worker
finishes the job's bookkeeping.

The hang is injected by the deadline itself: a 2 s deadline for a 60 s stem, which the tiny model
cannot generate that fast on a CPU (the watchdog cannot tell a stuck device call from a slow one).
"""

import json
import uuid

import requests

from tasks.device_watchdog import EXIT_HUNG
from tasks.jobstore import JobStore
from tests.harness import (REDIS, TEST_RESULT_DB, CallbackReceiver, service_env, start_gateway,
                           start_worker)

DEADLINE_SECONDS = 2.0


def test_a_hung_generation_fails_its_stem_in_time_and_the_worker_exits_non_zero(tmp_path):
    store = JobStore(f"{REDIS}/{TEST_RESULT_DB}")
    with CallbackReceiver() as receiver:
        env = service_env(tmp_path, DEFAULT_CALLBACK_URL=receiver.url, VISIBILITY_TIMEOUT_SECONDS="60",
                          CALLBACK_BACKOFF_MAX_SECONDS="10",
                          GENERATION_DEADLINE_SECONDS=str(DEADLINE_SECONDS),
                          GENERATION_DEADLINE_MIN_SECONDS="1")
        worker = start_worker(env, tmp_path, name="hangs")
        fresh = gateway = None
        try:
            gateway, base = start_gateway(env, tmp_path)
            body = {"generation_request_id": f"gen-{uuid.uuid4().hex[:10]}", "audio_file_id": "a",
                    "target_stems": ["bass"],
                    "parameters": {"target_bpm": 120, "duration_seconds": 60.0, "seed": 1}}
            answer = requests.post(f"{base}/generate", json=body, timeout=10)
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["job_id"]
            assert worker.proc.wait(180) == EXIT_HUNG, worker.log()[-3000:]
            log = worker.log()
            assert "ran past its deadline" in log and "worker not ready" in log
            fresh = start_worker({**env, "GENERATION_DEADLINE_SECONDS": "50"}, tmp_path, name="fresh")
            payload = receiver.wait(timeout=180)["json"]
            assert payload["job_id"] == job_id and payload["status"] == "failed", payload
            (stem,) = payload["stems"]
            assert "GenerationTimeout" in stem["error"] and "ran past its deadline" in stem["error"]
            # from the stem's start to its failure: the deadline, one look of the watchdog (at most
            # 1 s), and the task's own bookkeeping
            stem_events = [(int(e.id.split("-")[0]) / 1000, json.loads(e.data))
                           for e in store.read_events(job_id) if e.type == "stem"]
            started = min(t for t, data in stem_events if data["status"] == "running")
            failed = min(t for t, data in stem_events if data["status"] == "failed")
            assert failed - started <= DEADLINE_SECONDS + 1.0 + 3.0, stem_events
        finally:
            for process in (gateway, fresh, worker):
                if process is not None:
                    process.stop()
