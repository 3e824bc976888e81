"""Job records: states, key names, errors, the events of a job's stream and the request
fingerprint (see tasks.jobstore)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

STEM_STATES = ("queued", "running", "completed", "failed", "cancelled")
JOB_STATES = ("queued", "running", "cancelling", "completed", "failed", "partial", "cancelled")
DELIVERY_STATES = ("none", "pending", "delivering", "delivered", "failed")
#: Job states after which nothing changes but the callback's delivery (the event stream ends).
FINAL_JOB_STATES = frozenset({"completed", "failed", "partial", "cancelled"})

#: Most events kept per job stream (approximate trim). A job writes about 2 + 52 per stem (progress
#: is stored at most every 2 %), so a three-stem job fits with room for a redelivered task.
EVENTS_MAXLEN = 1000
#: A finished job's event stream is kept this long (seconds; the record, JOB_TTL_SECONDS): a
#: client that resumes later gets the final state from the record (api.events), and a job's
#: progress history (~20 KB for three stems) need not stay in Redis for the record's week.
EVENTS_KEEP_AFTER_FINISH_SECONDS = 3600
#: Most index entries ``list_jobs`` examines per call (a status filter may match few of them).
LIST_SCAN_MAX = 1000

_PREFIX = "stemgen"


def job_key(job_id: str) -> str:
    return f"{_PREFIX}:job:{job_id}"


def source_excerpt_key(job_id: str) -> str:
    """The job's conditioning excerpt of its song (tasks.song_source), kept as long as the job."""
    return f"{_PREFIX}:source-excerpt:{job_id}"


def request_key(generation_request_id: str, owner: str = "") -> str:
    """The idempotency claim of a generation_request_id: one per API key (``owner``); without keys
    (an open API) the one global claim, as before claims were per key."""
    if owner:
        return f"{_PREFIX}:request-of:{owner}:{generation_request_id}"
    return f"{_PREFIX}:request:{generation_request_id}"


def live_jobs_key(owner: str) -> str:
    """The set of an API key's jobs not yet finished (its active-jobs limit counts them)."""
    return f"{LIVE_JOBS_PREFIX}{owner}"


def submissions_key(owner: str) -> str:
    """An API key's submissions of the last minute (sorted set scored by time)."""
    return f"{_PREFIX}:submissions:{owner}"


def events_key(job_id: str) -> str:
    return f"{_PREFIX}:events:{job_id}"


def delivery_lock_key(job_id: str) -> str:
    return f"{_PREFIX}:delivery-lock:{job_id}"


def index_key(owner: str) -> str:
    # "_": jobs submitted without API keys (an open API); key identifiers are hex.
    return f"{_PREFIX}:job-index:{owner or '_'}"


def staged_key(job_id: str, stem: str) -> str:
    """A rendered stem kept while its upload fails (tasks.jobstore.staging)."""
    return f"{_PREFIX}:staged:{job_id}:{stem}"


#: Prefix of the owners' live-job sets (the finish script names the set from the record's owner).
LIVE_JOBS_PREFIX = f"{_PREFIX}:live-jobs:"
#: The index of every job (GET /jobs of an admin key); "*" is no key identifier (those are hex).
ALL_JOBS = "*"
#: The outbox: jobs due for dispatch, scored by when they are next due.
OUTBOX = f"{_PREFIX}:outbox"
#: Pending callback deliveries, scored by when their next attempt is due.
DELIVERIES = f"{_PREFIX}:deliveries"


class JobNotFound(KeyError):
    """No job with that id (never existed, or expired)."""


class JobFinished(Exception):
    """The job reached a final state before it could be cancelled."""

    def __init__(self, job_id: str, state: str):
        super().__init__(f"job {job_id} already finished ({state})")
        self.job_id = job_id
        self.state = state


class IdempotencyConflict(ValueError):
    """A different request body was already submitted under this generation_request_id."""

    def __init__(self, generation_request_id: str, job_id: str):
        super().__init__(f"generation_request_id {generation_request_id!r} was already used for a "
                         f"different request (job {job_id})")
        self.generation_request_id = generation_request_id
        self.job_id = job_id


class LimitExceeded(Exception):
    """A submission over one of its API key's limits (nothing was recorded).

    Attributes:
        limit: "max_active_jobs" or "max_submissions_per_minute". value: the configured maximum.
        retry_after_seconds: when a retry may pass (whole seconds, at least 1).
    """

    def __init__(self, limit: str, value: int, retry_after_seconds: int):
        super().__init__(f"limit {limit} ({value}) reached for this API key; retry after "
                         f"{retry_after_seconds} s")
        self.limit, self.value, self.retry_after_seconds = limit, value, retry_after_seconds


@dataclass(frozen=True)
class Submission:
    """Result of ``JobStore.create``: the job id and whether this call created it."""

    job_id: str
    created: bool
    #: the job's state when the call returned ("queued" for a job just created)
    status: str = "queued"


#: A Redis stream entry id, "<milliseconds>-<sequence>": the events' ids.
EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


def event_id_key(event_id: str) -> tuple[int, int]:
    """A stream id as a tuple that sorts as Redis orders them.

    Raises:
        ValueError: not "<milliseconds>-<sequence>".
    """
    if not EVENT_ID.match(event_id):
        raise ValueError(f"not a stream id: {event_id!r}")
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event stream.

    ``type`` is "job" (the job's status changed), "stem" (a stem's status changed) or "progress"
    (a running stem's progress moved); ``data`` is the event's JSON text, as stored.
    """

    job_id: str
    id: str
    type: str
    data: str
    #: the id as a sortable tuple (see ``event_id_key``)
    key: tuple[int, int] = dataclasses.field(compare=False, repr=False)

    @classmethod
    def from_entry(cls, job_id: str, entry_id: str, fields: dict) -> "JobEvent":
        return cls(job_id, entry_id, fields.get("type", "job"), fields.get("data", "{}"),
                   event_id_key(entry_id))

    @property
    def final(self) -> bool:
        """Whether this event reports the job's final state (the last event of a job)."""
        if self.type != "job":
            return False
        try:
            return json.loads(self.data).get("status") in FINAL_JOB_STATES
        except (ValueError, AttributeError):
            return False



def canonical_json(request: dict) -> str:
    """The request as canonical JSON: sorted keys, no spaces, ASCII."""
    return json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def request_fingerprint(request: dict, canonical: str | None = None) -> str:
    """SHA-256 of the canonical JSON of a request (key order and spacing do not matter)."""
    return hashlib.sha256((canonical or canonical_json(request)).encode()).hexdigest()



#: The stems a job may have (a summary reads their fields by name).
_STEMS = ("guitar", "bass", "drums")


def _stem_states(stems: list[str], fields: dict) -> list[dict]:
    """Each stem's stored state (``fields["stem:<name>"]``), or queued when none is stored yet."""
    return [json.loads(fields[f"stem:{s}"]) if fields.get(f"stem:{s}") else
            {"stem": s, "status": "queued", "progress": 0.0} for s in stems]



def _event_data(**fields) -> str:
    """An event's JSON text (None values left out)."""
    return json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":"))
