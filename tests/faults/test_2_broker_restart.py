"""The Redis that is broker, result backend and job store restarts while requests are in flight
and while the backend is still submitting: nothing accepted is lost, nothing is sent twice. The
restart must hit work in flight (a job generating when Redis stopped completes after it), the
workers' broker connections and the submissions that meet it; their retries are counted.

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
#: What a Celery worker logs when its broker connection drops (celery.worker.consumer).
BROKER_LOST = "Connection to broker lost"


def test_broker_restart_with_requests_in_flight(stack, redis_server, timed):
    scenario = Scenario(f"Redis broker+store restart ({OUTAGE_SECONDS}s down)")
    LEDGER.append(scenario)
    client = Client(stack.base, scenario)
    with CallbackReceiver() as receiver:
        submitted = client.submit_all(bodies(8, receiver.url, tag="broker"))
        workers = list(stack.live_workers().values())
        wait_until_generating(client, workers, list(submitted))
        in_flight = {job_id for job_id, record in client.jobs(list(submitted)).items()
                     if record["status"] not in ("completed", "failed", "partial", "cancelled")}
        lost_before = sum(w.log().count(BROKER_LOST) for w in workers)
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
    resubmitted = scenario.http_attempts - scenario.sent
    reconnects = sum(w.log().count(BROKER_LOST) for w in workers) - lost_before
    declared = sum(w.log().count("job store unreachable for") for w in workers)
    scenario.notes.append(f"{resubmitted} POSTs answered 503/refused during the outage and retried; "
                          f"{reconnects} worker broker reconnections; {declared} task retries for "
                          f"an unreachable job store; {len(in_flight)} jobs in flight at the stop")
    check_clean(scenario, records)
    assert len(submitted) == 14
    # the fault was hit: work in flight, the workers' connections, the submissions
    assert in_flight and all(records[job_id]["status"] == "completed" for job_id in in_flight)
    assert reconnects >= 1, "no worker lost its broker connection: the restart hit nothing"
    assert resubmitted >= 1, "no submission met the outage"
