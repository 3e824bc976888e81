"""Redis is killed (SIGKILL) in the middle of a burst of submissions and restarted on its own data:
every job answered 202 before the kill is still recorded, and every accepted job completes with
exactly one callback.

This Redis holds everything (job store, outbox, broker queues and unacknowledged messages, Celery
results) and runs the shipped configuration (deploy/local/redis-durable.conf: append-only file,
fsynced before each answer). Submissions that meet the outage get 503 (or no connection) and are
retried with the same body, as a backend would. Messages the workers held at the kill come back
after the visibility timeout.

A kill -9 leaves what Redis had written in the kernel's page cache, so it cannot tell
``appendfsync always`` from ``everysec`` (only a crash of the host can); it does tell a durable
configuration from one that keeps nothing (``appendonly no``: every record below would be gone).
"""

import time

import pytest

from tests.faults.conftest import VISIBILITY_TIMEOUT_SECONDS, Stack
from tests.faults.flow import (
    LEDGER,
    Client,
    Scenario,
    bodies,
    check_clean,
    missing_records,
    settle,
    submit_burst,
)
from tests.faults.services import RedisServer
from tests.harness import CallbackReceiver, start_gateway

BURST = 36
PACE_SECONDS = 0.05
DOWN_SECONDS = 5


@pytest.fixture
def crash_stack(stack_env, fault_tmp):
    """A Redis of its own (broker db 0, results and job store db 1), a gateway and a worker."""
    tmp = fault_tmp / "redis-crash"
    server = RedisServer(tmp / "redis")
    server.start()
    env = dict(stack_env, BROKER_URL=server.url(0), RESULT_BACKEND=server.url(1))
    stack = Stack(env, tmp)
    try:
        stack.gateway, stack.base = start_gateway(env, tmp)
        stack.start_workers("c1")
        yield stack, server
    finally:
        stack.stop()
        server.stop()


def test_redis_killed_mid_burst(crash_stack, timed):
    stack, server = crash_stack
    config = server.client().config_get("append*")
    assert (config["appendonly"], config["appendfsync"]) == ("yes", "always")  # the shipped file
    scenario = Scenario(f"Redis SIGKILL mid-burst, AOF always ({DOWN_SECONDS}s down)")
    LEDGER.append(scenario)
    client = Client(stack.base, scenario)

    def crash():
        server.kill()
        time.sleep(DOWN_SECONDS)
        server.start()  # same port, same directory: it loads its append-only file

    with CallbackReceiver() as receiver:
        submitted, accepted_at, before, started = submit_burst(
            client, bodies(BURST, receiver.url, duration=2.0, tag="crash"),
            pace_seconds=PACE_SECONDS, fault_after=BURST // 3, fault=crash)
        last_second = sum(1 for at in accepted_at.values() if started - 1.0 <= at <= started)
        gone = missing_records(client, before)
        scenario.notes.append(f"{len(before)} jobs accepted before the kill ({last_second} in its last "
                              f"second), {len(gone)} of them missing after the restart; "
                              f"{scenario.http_attempts - scenario.sent} POSTs answered 503/refused "
                              "during the outage and retried")
        # A job whose record is gone can never call back: counted lost, not waited for.
        records = settle(scenario, client, [receiver],
                         {job_id: body for job_id, body in submitted.items() if job_id not in gone},
                         timeout=VISIBILITY_TIMEOUT_SECONDS + 240)
        scenario.lost += len(gone)
    assert not gone, f"accepted jobs gone after the restart: {sorted(gone)}"
    check_clean(scenario, records)
    assert len(submitted) == BURST and scenario.http_attempts > scenario.sent  # the kill hit the burst
