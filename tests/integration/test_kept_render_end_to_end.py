"""A rendered stem whose upload failed is not generated again: the first worker cannot reach
storage and keeps the render in Redis; it stops, and a second worker (reaching storage) takes the
retry and uploads the kept render. The stem counts one MusicGen generation across both workers."""

import time
import uuid

import requests

from tasks.jobstore import JobStore
from tests.harness import (REDIS, TEST_RESULT_DB, CallbackReceiver, free_port, service_env,
                           start_gateway, start_worker)


def test_a_retried_upload_lands_on_another_worker_without_a_second_generation(tmp_path):
    store = JobStore(f"{REDIS}/{TEST_RESULT_DB}")
    with CallbackReceiver() as receiver:
        env = service_env(tmp_path, DEFAULT_CALLBACK_URL=receiver.url,
                          # a lost message would wait this long: keep it short
                          VISIBILITY_TIMEOUT_SECONDS="120", CALLBACK_BACKOFF_MAX_SECONDS="10",
                          GENERATION_DEADLINE_SECONDS="110")
        dead = env.get("AZURE_STORAGE_CONNECTION_STRING", "")
        unreachable = {**env, "STORAGE_RETRY_TOTAL": "0", "AZURE_STORAGE_CONNECTION_STRING": (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey="
            "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
            f"BlobEndpoint=http://127.0.0.1:{free_port()}/devstoreaccount1;")}
        assert unreachable["AZURE_STORAGE_CONNECTION_STRING"] != dead
        first = start_worker(unreachable, tmp_path, name="no-storage")
        second = gateway = None
        try:
            gateway, base = start_gateway(env, tmp_path)
            body = {"generation_request_id": f"gen-{uuid.uuid4().hex[:10]}", "audio_file_id": "a",
                    "target_stems": ["bass"],
                    "parameters": {"target_bpm": 120, "duration_seconds": 2.0, "seed": 1}}
            answer = requests.post(f"{base}/generate", json=body, timeout=10)
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["job_id"]
            deadline = time.monotonic() + 240
            while store.staged_rendered(job_id, "bass") is None:
                assert time.monotonic() < deadline, first.log()[-3000:]
                time.sleep(0.1)
            first.stop()  # its retry message goes back to the queue
            assert "its render" in first.log() and "is kept for the retry" in first.log()
            second = start_worker(env, tmp_path, name="with-storage")
            payload = receiver.wait(timeout=240)["json"]
            assert payload["job_id"] == job_id
            assert payload["status"] == "completed", (payload, second.log()[-3000:])
            (stem,) = payload["stems"]
            assert stem["blob_name"] == f"{job_id}/bass.wav"
            assert requests.get(stem["url"], timeout=10).content[:4] == b"RIFF"
            assert "uploading its kept render, without generating it again" in second.log()
            status = requests.get(f"{base}/jobs/{job_id}", timeout=10).json()
            assert status["stems"][0]["runs"] == 1  # one MusicGen generation, on the first worker
            assert store.staged_rendered(job_id, "bass") is None  # forgotten once stored
        finally:
            for process in (gateway, second, first):
                if process is not None:
                    process.stop()
