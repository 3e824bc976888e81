"""The Redis primary is killed (SIGKILL) in the middle of a burst of submissions and Redis Sentinel
promotes its replica: every job answered 202 before the kill is on the new primary, and every
accepted job completes with exactly one callback.

One primary, one replica and three sentinels (quorum 2, primary down after 1 s without an answer).
The gateway and the worker find the primary through Sentinel: the job store with
``sentinel://...?master=...&wait_replicas=1`` (each job-store write returns only once the replica
holds it, and with it everything the primary had applied before), the Celery broker and result
backend with the same sentinel:// URL (kombu's and Celery's Sentinel support).

Replication is asynchronous, so a primary killed without that wait loses whatever its replica had
not received yet. With it, a 202 means the replica had the job. While the new primary has no
replica (until the killed one is back and Sentinel makes it a replica of the new one) job-store
writes cannot be acknowledged: the gateway answers 503 and the backend retries, and the workers'
tasks retry.
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
from tests.faults.services import RedisSentinel, RedisServer
from tests.harness import CallbackReceiver, start_gateway

MASTER = "stemgen-faults"
BURST = 36
PACE_SECONDS = 0.05
#: The killed primary is restarted this long after the kill (a supervisor bringing it back).
RESTART_AFTER_SECONDS = 6


@pytest.fixture
def sentinel_stack(stack_env, fault_tmp):
    """Primary, replica, three sentinels; a gateway and a worker that know only the sentinels."""
    tmp = fault_tmp / "sentinel"
    primary = RedisServer(tmp / "redis-a")
    primary.start()
    replica = RedisServer(tmp / "redis-b", replica_of=primary.port)
    sentinels = [RedisSentinel(tmp / f"sentinel-{i}", MASTER, primary.port, quorum=2) for i in range(3)]
    started = [primary]
    stack = None
    try:
        replica.start()
        started.append(replica)
        primary.wait_replicas_online(1)
        for sentinel in sentinels:
            sentinel.start()
            started.append(sentinel)
        for sentinel in sentinels:
            sentinel.wait_ready(replicas=1, other_sentinels=len(sentinels) - 1)
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
        env = dict(stack_env, BROKER_URL=f"sentinel://{hosts}/0?master={MASTER}",
                   RESULT_BACKEND=f"sentinel://{hosts}/1?master={MASTER}"
                                  "&wait_replicas=1&wait_timeout_ms=2000")
        stack = Stack(env, tmp)
        stack.gateway, stack.base = start_gateway(env, tmp)
        stack.start_workers("s1")
        yield stack, primary, replica, sentinels
    finally:
        if stack is not None:
            stack.stop()
        for service in reversed(started):
            service.stop()


def test_primary_killed_sentinel_fails_over(sentinel_stack, timed):
    stack, primary, replica, sentinels = sentinel_stack
    scenario = Scenario("Redis primary SIGKILL, Sentinel failover (WAIT 1 replica)")
    LEDGER.append(scenario)
    client = Client(stack.base, scenario)
    timeline: dict[str, float] = {}

    def fail_over():
        primary.kill()
        timeline["killed"] = time.monotonic()
        deadline = timeline["killed"] + 60
        while sentinels[0].primary_port() != replica.port:
            assert time.monotonic() < deadline, "Sentinel did not promote the replica within 60 s"
            time.sleep(0.1)
        timeline["promoted"] = time.monotonic()
        time.sleep(max(0.0, timeline["killed"] + RESTART_AFTER_SECONDS - time.monotonic()))
        primary.start()  # comes back with its own data; Sentinel turns it into a replica
        replica.wait_replicas_online(1)
        timeline["replicated"] = time.monotonic()

    with CallbackReceiver() as receiver:
        submitted, accepted_at, before, started = submit_burst(
            client, bodies(BURST, receiver.url, duration=2.0, tag="failover"),
            pace_seconds=PACE_SECONDS, fault_after=BURST // 3, fault=fail_over)
        assert primary.role() == "slave" and replica.role() == "master"
        last_second = sum(1 for at in accepted_at.values() if started - 1.0 <= at <= started)
        gone = missing_records(client, before)
        scenario.notes.append(
            f"{len(before)} jobs accepted before the kill ({last_second} in its last second), "
            f"{len(gone)} of them missing on the promoted replica; replica promoted "
            f"{timeline['promoted'] - timeline['killed']:.1f}s after the kill, writes acknowledged "
            f"again {timeline['replicated'] - timeline['killed']:.1f}s after it (old primary back as "
            f"replica); {scenario.http_attempts - scenario.sent} POSTs answered 503/refused and retried")
        # A job whose record is gone can never call back: counted lost, not waited for.
        records = settle(scenario, client, [receiver],
                         {job_id: body for job_id, body in submitted.items() if job_id not in gone},
                         timeout=VISIBILITY_TIMEOUT_SECONDS + 240)
        scenario.lost += len(gone)
    assert not gone, f"accepted jobs missing after the failover: {sorted(gone)}"
    check_clean(scenario, records)
    assert len(submitted) == BURST and scenario.http_attempts > scenario.sent  # the kill hit the burst
