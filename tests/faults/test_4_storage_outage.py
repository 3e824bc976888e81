"""Blob storage (Azurite) is stopped for about 30 s while the stems are being uploaded: the
uploads are retried (the Azure SDK's policy, then the task's own retry) and every job completes
with downloadable stems. The outage must be hit: at least one upload retried (both kinds of retry
are counted from the workers' logs), and a render kept by a failed upload is uploaded without a
second generation."""

import re
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
    sdk_retries, task_retries = logs.count("storage retry "), logs.count("storage unavailable for")
    kept_uploads = logs.count("uploading its kept render")
    scenario.notes.append(f"{sdk_retries} storage requests retried by the SDK's policy, "
                          f"{task_retries} task-level storage retries, {kept_uploads} kept renders "
                          "uploaded without generating again")
    check_clean(scenario, records)
    assert sdk_retries + task_retries >= 1, "no upload met the outage"
    assert scenario.regenerated == 0, "a stem was generated again"
    # a stem whose upload was retried by its task shows one model call (its render was kept)
    retried = set(re.findall(r"storage unavailable for ([0-9a-f]{32})/(\w+),", logs))
    runs = {(job_id, s["stem"]): s.get("runs", 1) for job_id, r in records.items() for s in r["stems"]}
    assert all(runs[stem] == 1 for stem in retried), {stem: runs[stem] for stem in retried}
    stems = [s for r in records.values() for s in r["stems"]]
    for stem in stems[:: max(1, len(stems) // 4)]:
        audio = requests.get(stem["url"], timeout=10)
        assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
