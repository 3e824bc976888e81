"""The fault suite (`make faults`): real gateway, real Celery workers (tiny MusicGen), real Redis,
Azurite and a loopback callback receiver, with parts killed and restarted under load.

It runs only when asked for (``pytest tests/faults`` or STEMGEN_FAULTS=1): it takes minutes and
stops and starts processes. The stack uses its own Redis and Azurite (other ports), so `make run`
and other test runs on the shared services are not disturbed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults.flow import API_KEY, CALLBACK_SECRET, LEDGER
from tests.faults.services import Azurite, RedisServer
from tests.harness import RABBITMQ, service_env, start_gateway, start_worker

#: Seconds after which Redis hands an unacknowledged message to another worker: above the longest
#: task here (tiny model, a few seconds of audio), short enough that recovery fits the suite.
VISIBILITY_TIMEOUT_SECONDS = 45


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: fault-injection scenarios (make faults)")


def _selected(config) -> bool:
    if os.environ.get("STEMGEN_FAULTS"):
        return True
    return any("faults" in str(arg) for arg in config.args)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="fault suite: run `make faults` (about 10 minutes)")
    run = _selected(config)
    for item in items:
        if "/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)
            if not run:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not LEDGER:
        return
    write = terminalreporter.write_line
    header = ("scenario", "sent", "http", "accepted", "completed", "lost", "dup cb", "regen", "s")
    rows = [(s.name, s.sent, s.http_attempts, s.accepted, s.completed, s.lost, s.duplicates,
             s.regenerated, f"{s.seconds:.0f}") for s in LEDGER]
    delivery = [s for s in LEDGER if not s.fuzz]
    totals = [sum(getattr(s, f) for s in delivery)
              for f in ("sent", "http_attempts", "accepted", "completed", "lost", "duplicates", "regenerated")]
    rows.append(("TOTAL (generation requests)", *totals, f"{sum(s.seconds for s in LEDGER):.0f}"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    terminalreporter.section("fault suite summary")
    write(line(header))
    for r in rows:
        write(line(r))
    for s in LEDGER:
        for note in s.notes:
            write(f"  {s.name}: {note}")
    write("sent: generation requests (fuzz rows: HTTP requests); http: POST attempts, retries after "
          "503 included; dup cb: callbacks acknowledged more than once per job; regen: stems "
          "generated more than once; s: seconds (TOTAL: all scenarios)")


@pytest.fixture(scope="session")
def fault_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def redis_server(fault_tmp):
    server = RedisServer(fault_tmp / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(fault_tmp):
    blob = Azurite(fault_tmp / "azurite")
    blob.start()
    yield blob
    blob.stop()


@pytest.fixture(scope="session")
def stack_env(fault_tmp, redis_server, azurite) -> dict[str, str]:
    return service_env(
        fault_tmp,
        BROKER_URL=redis_server.url(0),
        RESULT_BACKEND=redis_server.url(1),
        AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string(),
        STEMGEN_API_KEYS=API_KEY,
        CALLBACK_SECRET=CALLBACK_SECRET,
        VISIBILITY_TIMEOUT_SECONDS=str(VISIBILITY_TIMEOUT_SECONDS),
        GENERATION_DEADLINE_SECONDS=str(VISIBILITY_TIMEOUT_SECONDS - 5),
        # The SDK's retries of one upload (waits of 2+2, 2+4, 2+8 s) stay well inside the
        # visibility timeout; a longer outage is the task's retry, which uploads the kept render.
        STORAGE_RETRY_TOTAL="3",
        CALLBACK_BACKOFF_SECONDS="1",
        CALLBACK_BACKOFF_MAX_SECONDS="8",
        CALLBACK_CONNECT_TIMEOUT_SECONDS="2",
        CALLBACK_TIMEOUT_SECONDS="5",
        CALLBACK_DELIVERY_WINDOW_SECONDS="900",
        DELIVERY_SWEEP_GRACE_SECONDS="20",
        BATCH_WINDOW_SECONDS="0.3",
        WORKER_CONCURRENCY="4",
        LOG_LEVEL="INFO",
    )


class Stack:
    """Gateway and workers of the fault suite; scenarios replace workers they kill."""

    def __init__(self, env: dict[str, str], tmp: Path):
        self.env, self.tmp = env, tmp
        self.workers = {}
        self.gateway = None
        self.base = ""

    def start_worker(self, name: str):
        self.workers[name] = start_worker(self.env, self.tmp, name=name, timeout=240)
        return self.workers[name]

    def start_workers(self, *names: str) -> None:
        with ThreadPoolExecutor(len(names)) as pool:  # the model loads overlap
            for started in [pool.submit(self.start_worker, name) for name in names]:
                started.result()

    def live_workers(self) -> dict:
        return {name: w for name, w in self.workers.items() if w.proc.poll() is None}

    def stop(self):
        if self.gateway:
            self.gateway.stop()
        for worker in self.workers.values():
            worker.stop(timeout=60)


@pytest.fixture(scope="session")
def stack(stack_env, fault_tmp):
    stack = Stack(stack_env, fault_tmp)
    try:
        stack.gateway, stack.base = start_gateway(stack_env, fault_tmp)
        stack.start_workers("w1", "w2")
        yield stack
    finally:
        stack.stop()


RABBITMQ_VHOST = "stemgen-faults"


@pytest.fixture
def rabbitmq_stack(stack_env, redis_server, fault_tmp):
    """Gateway and two workers on RabbitMQ, in a vhost of their own (created afresh, so no other
    test run's messages or consumers share its queues); Redis db 4/5 as result backend/job store."""
    ctl = shutil.which("rabbitmqctl")
    if not ctl:
        pytest.skip("rabbitmqctl not found")
    subprocess.run([ctl, "delete_vhost", RABBITMQ_VHOST], capture_output=True)
    for args in (["add_vhost", RABBITMQ_VHOST],
                 ["set_permissions", "-p", RABBITMQ_VHOST, "guest", ".*", ".*", ".*"]):
        done = subprocess.run([ctl, *args], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"rabbitmqctl {args[0]} failed: {done.stderr.strip()}")
    tmp = fault_tmp / "rabbitmq"
    tmp.mkdir(exist_ok=True)
    env = dict(stack_env, BROKER_URL=f"{RABBITMQ.rstrip('/')}/{RABBITMQ_VHOST}",
               RESULT_BACKEND=redis_server.url(4))
    stack = Stack(env, tmp)
    try:
        stack.gateway, stack.base = start_gateway(env, tmp)
        stack.start_workers("r1", "r2")
        yield stack
    finally:
        stack.stop()
        subprocess.run([ctl, "delete_vhost", RABBITMQ_VHOST], capture_output=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stemgen_failed = report.failed
    return report


@pytest.fixture
def timed(request):
    """Stamps the scenario's duration (tests append their Scenario to LEDGER first) and marks a
    scenario whose test failed (its counts may be incomplete)."""
    started = time.monotonic()
    count = len(LEDGER)
    yield
    for scenario in LEDGER[count:]:
        scenario.seconds = time.monotonic() - started
        if getattr(request.node, "stemgen_failed", False):
            scenario.name += " [FAILED]"
