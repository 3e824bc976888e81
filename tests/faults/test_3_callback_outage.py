"""The backend's callback endpoint is down for minutes (scaled: CALLBACK_BACKOFF_* are seconds
here): jobs finish, deliveries wait with backoff, and once the endpoint is back each job is
delivered exactly once, without generating anything again.

While the deliveries wait, every worker is replaced, one killed (SIGKILL), one stopped (SIGTERM):
a waiting retry is an unacknowledged message in the broker, so it survives both (SIGTERM: handed
back at shutdown; SIGKILL: handed out again after the visibility timeout).
"""

import os
import signal
import time

from tests.faults.conftest import VISIBILITY_TIMEOUT_SECONDS
from tests.faults.flow import LEDGER, Client, Scenario, bodies, check_clean, settle
from tests.harness import CallbackReceiver

OUTAGE_SECONDS = 75


def test_callback_endpoint_down_then_back(stack, timed):
    scenario = Scenario(f"callback endpoint down {OUTAGE_SECONDS}s")
    LEDGER.append(scenario)
    client = Client(stack.base, scenario)
    with CallbackReceiver() as first:  # reserve a port, then take the endpoint down
        port = first.server.server_address[1]
        url = first.url
    down_since = time.monotonic()
    submitted = client.submit_all(bodies(12, url, tag="cbdown"))

    # Every job finishes and keeps retrying its delivery while the endpoint is down.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        records = client.jobs(submitted)
        if all(r["status"] == "completed" and r["callback"]["attempts"] >= 2 for r in records.values()):
            break
        time.sleep(1)
    assert all(r["status"] == "completed" for r in records.values()), records
    assert all(r["callback"]["state"] in ("pending", "delivering") for r in records.values())
    assert all("failed" in (r["callback"]["error"] or "") for r in records.values()
               if r["callback"]["state"] == "pending")

    live = list(stack.live_workers().values())
    assert len(live) >= 2
    os.killpg(live[0].proc.pid, signal.SIGKILL)
    for worker in live[1:]:
        os.killpg(worker.proc.pid, signal.SIGTERM)
    for worker in live:
        worker.proc.wait(120)
    stack.start_workers("w1-after-outage", "w2-after-outage")
    scenario.notes.append(f"all {len(live)} workers replaced while deliveries waited "
                          "(1 SIGKILL, the rest SIGTERM)")
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_since)))

    with CallbackReceiver(port=port) as receiver:
        back = time.time()
        records = settle(scenario, client, [receiver], submitted,
                         timeout=VISIBILITY_TIMEOUT_SECONDS + 60)
        lag = max(r["callback"].get("delivered_at") or 0 for r in records.values()) - back
        scenario.notes.append(f"all delivered within {lag:.0f}s of the endpoint's return "
                              f"(backoff max 8s); attempts per job "
                              f"{min(r['callback']['attempts'] for r in records.values())}-"
                              f"{max(r['callback']['attempts'] for r in records.values())}")
    check_clean(scenario, records)
    assert scenario.regenerated == 0
    assert all(s.get("runs") == 1 for r in records.values() for s in r["stems"])
