"""Workers stopped in the middle of generating.

- SIGKILL: the worker's unacknowledged messages come back (Redis: once older than the visibility
  timeout, swept by a live worker; RabbitMQ: as soon as the dead connection closes), another worker
  generates those stems again, and the backend gets exactly one callback per request.
- SIGTERM: a warm shutdown; the running generations finish first, nothing is generated twice.
"""

import os
import signal

from tests.faults.conftest import VISIBILITY_TIMEOUT_SECONDS
from tests.faults.flow import (
    DONE,
    LEDGER,
    Client,
    Scenario,
    bodies,
    check_clean,
    settle,
    wait_until_generating,
)
from tests.harness import CallbackReceiver


def test_worker_killed_mid_generation(stack, timed):
    scenario = Scenario("worker SIGKILL mid-generation (Redis)")
    LEDGER.append(scenario)
    client = Client(stack.base, scenario)
    with CallbackReceiver() as receiver:
        submitted = client.submit_all(bodies(14, receiver.url, tag="kill"))
        repeats = client.resubmit(submitted)
        scenario.notes.append(f"{repeats} repeated POSTs of accepted requests: same job (200) or 409")
        victim = stack.workers["w1"]
        held = wait_until_generating(client, victim, list(submitted))
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        scenario.notes.append(f"killed w1 holding {len(held)} generate_stem tasks")
        # The restarted worker (and w2) pick the lost messages up once they are older than the
        # visibility timeout; the sweep runs every 10 s.
        stack.start_worker("w1-restarted")
        records = settle(scenario, client, [receiver], submitted,
                         timeout=VISIBILITY_TIMEOUT_SECONDS + 240)
    check_clean(scenario, records)
    assert scenario.regenerated >= 1, "no stem was generated again: the kill hit nothing"


def test_worker_sigterm_finishes_its_tasks(stack, timed):
    """SIGTERM is a warm shutdown: the running generations finish (nothing is generated twice),
    messages not started go back to the queue, and the restarted worker carries on."""
    scenario = Scenario("worker SIGTERM mid-generation (Redis)")
    LEDGER.append(scenario)
    client = Client(stack.base, scenario)
    with CallbackReceiver() as receiver:
        submitted = client.submit_all(bodies(8, receiver.url, tag="term"))
        victim = stack.workers["w2"]
        held = wait_until_generating(client, victim, list(submitted))
        os.killpg(victim.proc.pid, signal.SIGTERM)
        victim.proc.wait(180)
        finished = set(DONE.findall(victim.log()))
        scenario.notes.append(f"w2 held {len(held)} generate_stem tasks at SIGTERM, "
                              f"finished {len(held & finished)} before exiting")
        stack.start_worker("w2-restarted")
        records = settle(scenario, client, [receiver], submitted, timeout=240)
    check_clean(scenario, records)
    assert held <= finished
    assert scenario.regenerated == 0


def test_worker_killed_mid_generation_rabbitmq(rabbitmq_stack, timed):
    scenario = Scenario("worker SIGKILL mid-generation (RabbitMQ)")
    LEDGER.append(scenario)
    client = Client(rabbitmq_stack.base, scenario)
    with CallbackReceiver() as receiver:
        submitted = client.submit_all(bodies(10, receiver.url, tag="rkill"))
        victim = rabbitmq_stack.workers["r1"]
        held = wait_until_generating(client, victim, list(submitted))
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        scenario.notes.append(f"killed r1 holding {len(held)} generate_stem tasks; r2 took them over "
                              "without a restart (RabbitMQ requeues at once)")
        records = settle(scenario, client, [receiver], submitted, timeout=240)
    check_clean(scenario, records)
    assert scenario.regenerated >= 1
