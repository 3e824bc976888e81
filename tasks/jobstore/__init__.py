"""Job records in Redis: what was asked, per-stem state and progress, callback delivery state.

One hash per job (``stemgen:job:{job_id}``) plus one key per ``generation_request_id`` that makes
submission idempotent (``SET NX``). Both live in the Redis of the Celery result backend and expire
after ``job_ttl_seconds``. New jobs also enter the outbox (``stemgen:outbox``, a sorted set of job
ids scored by when they are next due), from which tasks.dispatcher sends their Celery chords: the
transactional-outbox pattern, so a job is recorded and due for dispatch in one atomic step and the
gateway's request path never talks to the broker.

Every step that must happen once is a Redis state transition, because every Celery task here may run
twice (``acks_late``: a task whose worker died is delivered again):

- ``create``: the job record, its idempotency claim and its outbox entry are written in one script,
  so no claim ever points at a missing record (a claim whose record is gone is replaced) and no
  recorded job misses the outbox;
- ``claim_due``: an outbox entry is leased to one dispatcher at a time (its score moves past the
  lease); a dispatcher that dies leaves it to be claimed again when the lease ends;
- ``mark_dispatched``: the chord was sent; the entry leaves the outbox (checked before sending);
- ``finish``: the first final state and callback body win;
- ``mark_delivery_enqueued``: finalize hands the callback to delivery once;
- ``claim_overdue_deliveries``: a pending delivery whose next attempt is overdue by a grace period
  (its Celery message was lost: celery/celery#4354, a message published while a worker is in warm
  shutdown can vanish with the Redis broker) is leased to one dispatcher, which sends it again;
- ``acquire_delivery_lock``: one delivery attempt at a time, so two copies of the delivery task
  cannot both POST; the delivered state is checked under the lock.

Live progress: every write that changes the state of the job or of a stem (``create``,
``update_stem``, ``finish``) also appends an event to the job's Redis stream
(``stemgen:events:{job_id}``) in the same script, so no state change is recorded without its event
and no event is seen before its state. The stream is capped (``XADD MAXLEN ~ EVENTS_MAXLEN``) and
expires with the job record, or EVENTS_KEEP_AFTER_FINISH_SECONDS after the job's final state when
that is sooner; its entry ids are the events' ids (``Last-Event-ID`` of
``GET /jobs/<id>/events``). ``EventFeed`` reads many streams with one blocking ``XREAD``, so a
gateway process needs one Redis connection for all of its event streams (api.events).

Tenancy: a job belongs to the API key that submitted it (``owner``, the key's identifier, never the
key). ``get`` and ``request_cancel`` find only the owner's jobs when asked for one owner (another
key's job is JobNotFound, as an unknown id); the idempotency claim of a ``generation_request_id``
is per owner (``stemgen:request-of:{owner}:{id}``; without keys the one global claim
``stemgen:request:{id}`` of before). ``create`` also enforces the owner's limits (active jobs, from
the set ``stemgen:live-jobs:{owner}``, and submissions a minute) in the same script.

Job list: ``create`` also puts the job in a sorted set scored by creation time, one per API key
(``stemgen:job-index:{owner}``, the key's identifier, never the key), trimmed to the job TTL and
expiring with it; ``list_jobs`` pages through it newest first and drops entries whose record expired.

The modules, one concern each: ``scripts`` (the Lua scripts), ``records`` (states, key names,
errors, events), ``store`` (JobStore: records' writes and reads), ``outbox``, ``delivery_locks``,
``owner_index`` (the job list), ``staging`` (rendered stems kept while their upload fails) and
``protocol`` (EventFeed's packed XREAD).
"""

from tasks.jobstore.owner_index import LIST_SCAN_MAX, InvalidCursor, JobPage
from tasks.jobstore.protocol import EventFeed
from tasks.jobstore.records import (DELIVERY_STATES, EVENT_ID, EVENTS_KEEP_AFTER_FINISH_SECONDS,
                                    EVENTS_MAXLEN, FINAL_JOB_STATES, JOB_STATES, STEM_STATES,
                                    IdempotencyConflict, JobEvent, JobFinished, JobNotFound,
                                    LimitExceeded, Submission, canonical_json, event_id_key, request_fingerprint)
from tasks.jobstore.store import JobStore

__all__ = ["DELIVERY_STATES", "EVENT_ID", "EVENTS_KEEP_AFTER_FINISH_SECONDS", "EVENTS_MAXLEN",
           "FINAL_JOB_STATES", "JOB_STATES", "LIST_SCAN_MAX", "STEM_STATES", "EventFeed",
           "IdempotencyConflict", "InvalidCursor", "JobEvent", "JobFinished", "JobNotFound",
           "JobPage", "JobStore", "LimitExceeded", "Submission", "canonical_json", "event_id_key",
           "request_fingerprint"]
