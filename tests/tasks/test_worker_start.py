"""A worker's start: it consumes nothing and exits non-zero when its model cannot load, and writes
its ready flag only once the model is loaded, warmed up and self-checked (tasks.worker.ModelStart,
tasks.readiness). Real Celery worker processes on the tests' Redis."""

import json
import subprocess
import sys

import redis

from tests.harness import ROOT, service_env, start_worker


def test_a_worker_whose_model_cannot_load_exits_non_zero_before_consuming(tmp_path):
    env = service_env(tmp_path, MUSICGEN_MODEL=str(tmp_path / "no-such-model"),
                      DISPATCHER_ENABLED="false", WORKER_READY_FILE=str(tmp_path / "ready"))
    client = redis.Redis.from_url(env["BROKER_URL"])
    client.lpush(env["STEMS_QUEUE"], b"a message no one may take")
    try:
        worker = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert worker.returncode != 0, worker.stdout + worker.stderr
        assert "cannot load MusicGen model" in worker.stdout + worker.stderr
        assert client.llen(env["STEMS_QUEUE"]) == 1  # nothing consumed
        assert not (tmp_path / "ready").exists()
    finally:
        client.delete(env["STEMS_QUEUE"])


def test_the_ready_flag_follows_the_self_check(tmp_path):
    ready = tmp_path / "ready"
    env = service_env(tmp_path, DISPATCHER_ENABLED="false", WORKER_READY_FILE=str(ready),
                      ENGINE_MODE="static", ENGINE_PRECISION="float32")
    worker = start_worker(env, tmp_path)
    try:
        info = json.loads(ready.read_text())
        assert info["mode"] == "static" and info["precision"] == "float32"
        assert info["self_check"]["passed"] is True
    finally:
        worker.stop()
    assert not ready.exists()  # removed at shutdown
