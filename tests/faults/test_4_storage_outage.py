"""Blob storage (Azurite) is stopped for about 30 s while the stems are being uploaded: the
uploads are retried (the Azure SDK's policy, then the task's own retry) and every job completes
with downloadable stems."""

import time

import requests

from tests.faults.conftest import VISIBILITY_TIMEOUT_SECONDS
from tests.faults.flow import LEDGER, Client, Scenario, bodies, check_clean, settle
from tests.harness import CallbackReceiver

OUTAGE_SECONDS = 30


def test_storage_down_during_uploads(stack, azurite, timed):
    scenario = Scenario(f"Azurite down {OUTAGE_SECONDS}s during uploads")
    LEDGER.append(scenario)
    client = Client(stack.base, scenario)
    with CallbackReceiver() as receiver:
        submitted = client.submit_all(bodies(12, receiver.url, tag="blob"))
        azurite.stop()  # before any stem is rendered: every upload meets the outage
        time.sleep(OUTAGE_SECONDS)
        azurite.start()
        records = settle(scenario, client, [receiver], submitted,
                         timeout=VISIBILITY_TIMEOUT_SECONDS + 240)
    logs = "".join(w.log() for w in stack.workers.values())
    scenario.notes.append(f"{logs.count('storage unavailable for')} task-level storage retries "
                          "(the rest waited inside the SDK's retry policy)")
    check_clean(scenario, records)
    stems = [s for r in records.values() for s in r["stems"]]
    for stem in stems[:: max(1, len(stems) // 4)]:
        audio = requests.get(stem["url"], timeout=10)
        assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
