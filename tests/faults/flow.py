"""What every fault scenario does: submit requests as the backend would (retrying a 503 or a refused
connection with the same body), collect the callbacks, and count what was lost or duplicated.

The counts go to ``LEDGER``; tests/faults/conftest.py prints it as a table at the end of the run.
"""

from __future__ import annotations

import queue
import re
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from tasks.callbacks import EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

API_KEY = "faults-api-key-0123456789abcdef"
CALLBACK_SECRET = "test-secret"


@dataclass
class Scenario:
    """One row of the summary table."""

    name: str
    sent: int = 0            # distinct generation requests submitted
    http_attempts: int = 0   # POST /generate calls, retries after 503 / refused connections included
    accepted: int = 0        # requests answered 202/200 (a job exists)
    completed: int = 0       # accepted requests whose one callback said "completed"
    lost: int = 0            # accepted requests without a final callback by the deadline
    duplicates: int = 0      # 2xx-acknowledged callbacks beyond the first, per job
    regenerated: int = 0     # stems generated more than once (a worker died mid-task, or a retry)
    seconds: float = 0.0
    fuzz: bool = False       # a fuzzing row: "sent" counts HTTP requests, nothing is generated
    notes: list[str] = field(default_factory=list)


LEDGER: list[Scenario] = []


def request_body(stems: list[str], callback_url: str, *, duration: float = 4.0, bpm: float = 120.0,
                 tag: str = "f") -> dict:
    return {
        "generation_request_id": f"{tag}-{uuid.uuid4().hex[:12]}",
        "audio_file_id": f"audio-{uuid.uuid4().hex[:6]}",
        "target_stems": stems,
        "callback_url": callback_url,
        "parameters": {"target_bpm": bpm, "duration_seconds": duration, "style": "rock"},
    }


STEM_SETS = (["guitar", "bass"], ["drums"], ["guitar", "bass", "drums"], ["bass"])


def bodies(n: int, callback_url: str, **kwargs) -> list[dict]:
    return [request_body(STEM_SETS[i % len(STEM_SETS)], callback_url, **kwargs) for i in range(n)]


class Client:
    """The backend's side of the API: authenticated, and retrying what it is told to retry."""

    def __init__(self, base: str, scenario: Scenario):
        self.base = base
        self.scenario = scenario
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {API_KEY}"
        self._lock = threading.Lock()

    def submit(self, body: dict, deadline_seconds: float = 120) -> str:
        """POST /generate until accepted (202/200); returns the job id."""
        with self._lock:
            self.scenario.sent += 1
        deadline = time.monotonic() + deadline_seconds
        while True:
            with self._lock:
                self.scenario.http_attempts += 1
            try:
                r = self.session.post(f"{self.base}/generate", json=body, timeout=30)
                if r.status_code in (200, 202):
                    with self._lock:
                        self.scenario.accepted += 1
                    return r.json()["job_id"]
                if r.status_code != 503:
                    raise AssertionError(f"POST /generate answered {r.status_code}: {r.text}")
            except requests.RequestException:
                pass  # the gateway cannot be reached: the backend retries
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {body['generation_request_id']} never accepted")
            time.sleep(1)

    def submit_all(self, many: list[dict]) -> dict[str, dict]:
        """Submit concurrently (as several backend threads would); job id → body."""
        with ThreadPoolExecutor(max_workers=max(1, len(many))) as pool:
            job_ids = list(pool.map(self.submit, many))  # re-raises a submission's error
        return dict(zip(job_ids, many))

    def resubmit(self, submitted: dict[str, dict], copies: int = 3) -> int:
        """Send accepted bodies again, ``copies`` at once each (a backend retrying after a lost
        answer): every copy must get the same job back (200), and a changed body under the same
        generation_request_id a 409. Returns the number of POSTs made."""
        def post(job_id, body):
            r = self.session.post(f"{self.base}/generate", json=body, timeout=30)
            return job_id, r.status_code, r.json().get("job_id", "")

        sends = [(job_id, body) for job_id, body in submitted.items() for _ in range(copies)]
        with ThreadPoolExecutor(max_workers=max(1, len(sends))) as pool:
            # map re-raises a POST that failed outright (before, its thread died unnoticed)
            answers = list(pool.map(lambda send: post(*send), sends))
        assert all(code == 200 and got == job_id for job_id, code, got in answers), answers
        job_id, body = next(iter(submitted.items()))
        changed = dict(body, audio_file_id="another-file")
        conflict = self.session.post(f"{self.base}/generate", json=changed, timeout=30)
        assert conflict.status_code == 409, conflict.text
        assert conflict.json()["error"]["fields"][0]["field"] == "generation_request_id"
        return len(answers) + 1

    def job(self, job_id: str) -> dict:
        r = self.session.get(f"{self.base}/jobs/{job_id}", timeout=10)
        r.raise_for_status()
        return r.json()

    def jobs(self, job_ids) -> dict[str, dict]:
        return {job_id: self.job(job_id) for job_id in job_ids}


class Callbacks:
    """Everything the receivers acknowledged (2xx), per event id (= job id)."""

    def __init__(self):
        self.by_job: dict[str, list[dict]] = defaultdict(list)
        self.bad_signatures = 0

    def drain(self, receivers) -> None:
        for receiver in receivers:
            while True:
                try:
                    item = receiver.received.get_nowait()
                except queue.Empty:
                    break
                if not 200 <= item["status"] < 300:
                    continue
                headers = item["headers"]
                if not verify(CALLBACK_SECRET, headers.get(TIMESTAMP_HEADER, ""), item["raw"],
                              headers.get(SIGNATURE_HEADER, "")):
                    self.bad_signatures += 1
                self.by_job[headers[EVENT_ID_HEADER]].append(item["json"])

    def wait_for(self, receivers, job_ids, timeout: float) -> set[str]:
        """Wait until every job has a callback; returns the ones still missing at the deadline."""
        deadline = time.monotonic() + timeout
        missing = set(job_ids)
        while missing and time.monotonic() < deadline:
            time.sleep(0.5)
            self.drain(receivers)
            missing = {j for j in job_ids if not self.by_job.get(j)}
        return missing


def settle(scenario: Scenario, client: Client, receivers, submitted: dict[str, dict], *,
           timeout: float, grace: float = 10.0) -> dict[str, dict]:
    """Wait for every accepted job's callback, then ``grace`` seconds more for duplicates; fill
    the scenario's counts; return the final GET /jobs records."""
    callbacks = Callbacks()
    missing = callbacks.wait_for(receivers, submitted, timeout)
    time.sleep(grace)
    callbacks.drain(receivers)
    records = client.jobs(submitted)
    scenario.lost = len(missing)
    scenario.completed = sum(1 for j in submitted
                             if callbacks.by_job.get(j) and callbacks.by_job[j][0]["status"] == "completed")
    scenario.duplicates = sum(max(0, len(callbacks.by_job.get(j, [])) - 1) for j in submitted)
    scenario.regenerated = sum(1 for rec in records.values() for s in rec["stems"] if s.get("runs", 1) > 1)
    unexpected = set(callbacks.by_job) - set(submitted)
    if unexpected:
        scenario.notes.append(f"{len(unexpected)} callbacks for unknown jobs")
    if callbacks.bad_signatures:
        scenario.notes.append(f"{callbacks.bad_signatures} bad signatures")
    for job_id, body in submitted.items():
        got = callbacks.by_job.get(job_id)
        if got:
            payload = got[0]
            assert payload["generation_request_id"] == body["generation_request_id"]
            assert {s["stem"] for s in payload["stems"]} == set(body["target_stems"])
    return records


def check_clean(scenario: Scenario, records: dict[str, dict]) -> None:
    """The scenario's promise: every request completed, one callback each, delivery recorded."""
    assert scenario.lost == 0, f"{scenario.lost} requests lost"
    assert scenario.duplicates == 0, f"{scenario.duplicates} duplicate callbacks"
    assert scenario.completed == scenario.accepted == len(records), scenario
    assert not any("bad signatures" in note for note in scenario.notes), scenario.notes
    for job_id, record in records.items():
        assert record["status"] == "completed", record
        assert record["callback"]["state"] == "delivered", record["callback"]


RECEIVED = re.compile(r"Task stemgen\.generate_stem\[([0-9a-f-]+)\] received")
DONE = re.compile(r"Task stemgen\.generate_stem\[([0-9a-f-]+)\] (?:succeeded|failed|retry)")


def in_flight(log: str) -> set[str]:
    """generate_stem tasks a worker has received and not finished."""
    return set(RECEIVED.findall(log)) - set(DONE.findall(log))


def wait_until_generating(client, workers, job_ids, timeout=180) -> set[str]:
    """Until one of ``workers`` (one or a list) holds generate_stem tasks and some stem of the
    jobs shows progress; returns that worker's in-flight task ids."""
    workers = workers if isinstance(workers, (list, tuple)) else [workers]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = set().union(*(in_flight(w.log()) for w in workers))
        if held and any(s["status"] == "running" and s["progress"] > 0
                        for record in client.jobs(job_ids).values() for s in record["stems"]):
            return held
        time.sleep(0.3)
    logs = "\n".join(w.log()[-2000:] for w in workers)
    raise TimeoutError(f"no worker started generating:\n{logs}")


def submit_burst(client: Client, many: list[dict], *, pace_seconds: float, fault_after: int,
                 fault, threads: int = 8, deadline_seconds: float = 240):
    """Submit ``many`` bodies, a new one every ``pace_seconds`` on ``threads`` threads, each retried
    until accepted (``Client.submit``). Once ``fault_after`` were accepted, ``fault()`` runs on its
    own thread while the submissions go on.

    Returns (job id → body, job id → monotonic time of its 2xx, the job ids accepted when the fault
    started, monotonic time the fault started)."""
    accepted_at: dict[str, float] = {}
    lock = threading.Lock()

    def one(body):
        job_id = client.submit(body, deadline_seconds)
        with lock:
            accepted_at[job_id] = time.monotonic()
        return job_id, body

    fault_thread = None
    before: set[str] = set()
    started = 0.0
    errors: list[BaseException] = []

    def run_fault():
        try:
            fault()
        except BaseException as exc:  # re-raised below, on the test's thread
            errors.append(exc)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = []
        for body in many:
            futures.append(pool.submit(one, body))
            time.sleep(pace_seconds)
            if fault_thread is None and len(accepted_at) >= fault_after:
                with lock:
                    before = set(accepted_at)
                started = time.monotonic()
                fault_thread = threading.Thread(target=run_fault)
                fault_thread.start()
        assert fault_thread is not None, f"fewer than {fault_after} accepted before the burst ended"
        submitted = dict(future.result() for future in futures)
    fault_thread.join()
    if errors:
        raise errors[0]
    return submitted, accepted_at, before, started


def missing_records(client: Client, job_ids, timeout: float = 60) -> set[str]:
    """Job ids whose GET /jobs/<id> answers 404 (the record is gone); 503s and refused connections
    (the store still coming back) are asked again until ``timeout``."""
    gone = set()
    for job_id in job_ids:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = client.session.get(f"{client.base}/jobs/{job_id}", timeout=10)
                if r.status_code in (200, 404):
                    if r.status_code == 404:
                        gone.add(job_id)
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"GET /jobs/{job_id} kept failing for {timeout}s")
            time.sleep(0.5)
    return gone
