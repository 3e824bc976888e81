"""The Redis that is broker, result backend and job store restarts while requests are in flight
and while the backend is still submitting: nothing accepted is lost, nothing is sent twice.

Redis runs with an fsync-always append-only file, so a restart keeps the queues, the
unacknowledged messages and the job records. Submissions during the outage get 503 (or no
connection) and are retried with the same body, as a backend would.
"""

import threading
import time

from tests.faults.conftest import VISIBILITY_TIMEOUT_SECONDS
from tests.faults.flow import LEDGER, Client, Scenario, bodies, check_clean, settle, wait_until_generating
from tests.harness import CallbackReceiver

OUTAGE_SECONDS = 8


def test_broker_restart_with_requests_in_flight(stack, redis_server, timed):
    scenario = Scenario(f"Redis broker+store restart ({OUTAGE_SECONDS}s down)")
    LEDGER.append(scenario)
    client = Client(stack.base, scenario)
    with CallbackReceiver() as receiver:
        submitted = client.submit_all(bodies(8, receiver.url, tag="broker"))
        wait_until_generating(client, list(stack.live_workers().values()), list(submitted))
        redis_server.stop()
        late: dict = {}
        submitter = threading.Thread(
            target=lambda: late.update(client.submit_all(bodies(6, receiver.url, tag="broker-late"))))
        submitter.start()  # these meet the outage: 503 or refused, retried until accepted
        time.sleep(OUTAGE_SECONDS)
        redis_server.start()
        submitter.join(180)
        submitted.update(late)
        records = settle(scenario, client, [receiver], submitted,
                         timeout=VISIBILITY_TIMEOUT_SECONDS + 240)
    scenario.notes.append(f"{scenario.http_attempts - scenario.sent} POSTs answered 503/refused "
                          "during the outage and retried")
    check_clean(scenario, records)
    assert len(submitted) == 14
