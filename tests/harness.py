"""Real parts for integration tests: a callback receiver on loopback, a Celery worker process and a
gunicorn gateway process, configured through the environment exactly as in production."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import requests
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEST_BROKER_DB = 14
TEST_RESULT_DB = 15
#: The Redis server of the tests (STEMGEN_TEST_REDIS lets concurrent checkouts use their own).
REDIS = os.environ.get("STEMGEN_TEST_REDIS", "redis://127.0.0.1:6379")
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CallbackReceiver:
    """HTTP server on 127.0.0.1 that records every POST (headers and JSON body).

    ``status_codes`` (a list) answers the first requests with those codes, then 200.
    ``port`` binds a given port (to bring a receiver back where a stopped one was);
    ``delay_seconds`` holds every answer that long (a slow backend).
    """

    def __init__(self, status_codes: list[int] | None = None, port: int = 0,
                 delay_seconds: float = 0.0):
        self.received: "queue.Queue[dict]" = queue.Queue()
        self.status_codes = list(status_codes or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay_seconds)
                status = receiver.status_codes.pop(0) if receiver.status_codes else 200
                receiver.received.put({"path": self.path, "headers": dict(self.headers),
                                       "raw": body, "json": json.loads(body or b"null"),
                                       "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/callback"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait(self, timeout: float) -> dict:
        """Next accepted (2xx) callback; raises queue.Empty after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.received.get(timeout=max(0.01, deadline - time.monotonic()))
            if 200 <= item["status"] < 300:
                return item


def service_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """Environment for a worker/gateway pair isolated from `make run` (own Redis DBs, container)."""
    env = dict(os.environ)
    env.update({
        "BROKER_URL": f"{REDIS}/{TEST_BROKER_DB}",
        "RESULT_BACKEND": f"{REDIS}/{TEST_RESULT_DB}",
        "MUSICGEN_MODEL": "tiny",
        "STEMGEN_DEVICE": "cpu",
        "AZURE_STORAGE_CONTAINER": f"test-{uuid.uuid4().hex[:12]}",
        # Own queues: stacks of concurrent test runs share the Redis DBs but never a message.
        "STEMS_QUEUE": f"stems-{uuid.uuid4().hex[:8]}",
        "CALLBACKS_QUEUE": f"callbacks-{uuid.uuid4().hex[:8]}",
        "STEMGEN_CACHE_DIR": str(tmp_path / "cache"),
        "CALLBACK_SECRET": "test-secret",
        "CALLBACK_BACKOFF_SECONDS": "1",
        # The receiver listens on loopback, which the SSRF guard refuses unless allowed.
        "CALLBACK_ALLOW_LOOPBACK": "true",
        "USER": env.get("USER", "stemgen"),
        "PYTHONUNBUFFERED": "1",
        # Several workers run at once: none binds the metrics port unless a test asks for it.
        "WORKER_METRICS_PORT": "0",
    })
    env.update(overrides)
    return env


class Process:
    """A child process whose output goes to a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def start_worker(env: dict[str, str], tmp_path: Path, name: str = "w1", timeout: float = 120) -> Process:
    """A real Celery worker (threads pool, as configured) consuming both queues; returns once ready."""
    hostname = f"{name}-{uuid.uuid4().hex[:6]}@test"
    worker = Process([str(BIN / "celery"), "-A", "tasks.app", "worker",
                      "--hostname", hostname,
                      "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
                     env, tmp_path / f"worker-{name}.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{worker.log()}")
        # The ready line comes after the model was loaded (tasks.worker, worker_init).
        if "ready." in worker.log():
            return worker
        time.sleep(0.25)
    worker.stop()
    raise TimeoutError(f"worker not ready in {timeout}s:\n{worker.log()}")


def start_gateway(env: dict[str, str], tmp_path: Path, timeout: float = 60) -> tuple[Process, str]:
    """gunicorn serving ``api:create_app()`` on a free loopback port; returns (process, base URL)."""
    port = free_port()
    gateway = Process([str(BIN / "gunicorn"), "-c", "deploy/gunicorn.conf.py", "--bind",
                       f"127.0.0.1:{port}", "--workers", "2", "api:create_app()"],
                      env, tmp_path / "gateway.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.proc.poll() is not None:
            raise RuntimeError(f"gateway exited:\n{gateway.log()}")
        try:
            # A request once sent is waited for (read timeout 60 s): one given up on could still
            # be served later and show in a test's metrics. Only the connection attempt is short.
            if requests.get(f"{base}/health/live", timeout=(1, 60)).status_code == 200:
                return gateway, base
        except requests.RequestException:  # not listening yet, or busy starting
            pass
        time.sleep(0.2)
    gateway.stop()
    raise TimeoutError(f"gateway not up in {timeout}s:\n{gateway.log()}")


@contextlib.contextmanager
def running_stack(env: dict[str, str], tmp_path: Path, name: str = "w1", worker_timeout: float = 120):
    """A worker (``start_worker``) and a gateway (``start_gateway``) on ``env``, stopped on exit:
    yields (gateway base URL, worker Process, gateway Process)."""
    worker = start_worker(env, tmp_path, name=name, timeout=worker_timeout)
    try:
        gateway, base = start_gateway(env, tmp_path)
        try:
            yield base, worker, gateway
        finally:
            gateway.stop()
    finally:
        worker.stop()


def wait_job(base: str, job_id: str, timeout: float, states=("completed", "failed", "partial")) -> dict:
    """Poll GET /jobs/<id> until the job reaches one of ``states``."""
    deadline = time.monotonic() + timeout
    body = {}
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/jobs/{job_id}", timeout=5).json()
        if body.get("status") in states:
            return body
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {body.get('status')} after {timeout}s: {body}")


#: Frequency ratios of a triad over its root: minor (A-C-E over A) and major.
MINOR_TRIAD = (1.0, 1.189, 1.498)
MAJOR_TRIAD = (1.0, 1.26, 1.498)


def groove_wav(bpm: float, seconds: float = 12.0, *, root_hz: float = 220.0,
               triad: tuple[float, ...] = MINOR_TRIAD, channels: int = 1, rate: int = 22050) -> bytes:
    """A user's song stand-in, as WAV bytes: a sustained triad on ``root_hz`` with a kick-like
    click on every beat at ``bpm``, ``seconds`` long, ``channels`` identical channels."""
    t = np.arange(int(seconds * rate)) / rate
    pad = sum(np.sin(2 * np.pi * root_hz * r * t) for r in triad) * 0.15
    clicks = np.zeros_like(t)
    for beat in np.arange(0, seconds, 60.0 / bpm):
        i = int(beat * rate)
        n = min(800, len(t) - i)
        clicks[i:i + n] += 0.8 * np.exp(-np.arange(n) / 120.0) * np.sin(2 * np.pi * 80 * np.arange(n) / rate)
    mix = pad + clicks
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([mix] * channels, axis=1) if channels > 1 else mix, rate, format="WAV")
    return buffer.getvalue()
