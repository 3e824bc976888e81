"""Live job progress as Server-Sent Events (``GET /jobs/<id>/events``).

Every state or progress change of a job or a stem is an entry of the job's Redis stream, written
in the same script as the change itself (tasks.jobstore, through tasks.service). A client's stream is:

1. the stored events after its ``Last-Event-ID`` (all of them on a first connection), read once;
2. then the new ones, which ``EventHub`` hands it: one reader per gateway process follows every
   watched job with one blocking ``XREAD`` (tasks.jobstore.EventFeed) and fans each event out to
   the clients watching that job. Nothing polls the job record, and 500 open streams need one
   Redis connection per process, not 500;
3. a comment line every ``EVENTS_HEARTBEAT_SECONDS`` while nothing happens;
4. the end, right after the event of the job's final state (completed, partial, failed).

No event is lost or repeated between steps 1 and 2: a client registers with the hub before it reads
its backlog, the hub reads each job from the lowest position any of its clients has reached (so
it re-reads, never skips), and each client drops events at or before the last one it sent. Event
ids are the stream ids, which increase, so the comparison is exact.

The hub is a ``threading.Thread``; under gunicorn's gevent workers (deploy/gunicorn.conf.py)
threading is monkey-patched and it is a greenlet, and each open stream is a greenlet waiting on
its queue.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Iterator

from tasks.service import FINAL_JOB_STATES, JobEvent, event_id_key

log = logging.getLogger(__name__)

#: How long the hub's XREAD blocks when nothing happens, seconds (it is woken for new streams).
BLOCK_SECONDS = 5.0
#: Pause after the hub failed to read (Redis unreachable) before it tries again, seconds.
RETRY_SECONDS = 1.0
#: Reconnection delay a client is told (the SSE ``retry`` field), milliseconds.
CLIENT_RETRY_MS = 3000
#: Streams of one process that read their job and backlog from Redis at the same time. redis-py
#: gives a client at most 100 connections (then MaxConnectionsError: a 503), and a gevent worker
#: takes up to 1000 connections: 500 clients reconnecting at once (a gateway restart) made 225
#: of them fail in bench.events. The others wait their turn (a few milliseconds).
SETUP_CONCURRENCY = 32


class Subscription:
    """One client's view of one job: the events the hub hands it, in its own queue."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.queue: "queue.Queue[JobEvent]" = queue.Queue()
        #: The last event id this client holds (backlog or queue): the hub reads the job from the
        #: lowest such position. None until the client has read its backlog.
        self.position: tuple[int, int] | None = None

    def get(self, timeout: float) -> JobEvent | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


class EventHub:
    """Follows the watched jobs' event streams with one reader, and fans events out to clients.

    Args:
        feed_factory: makes the ``tasks.jobstore.EventFeed`` the reader uses (called on the first
            subscription; the feed has its own Redis connection).
        block_seconds: longest blocking read.
        retry_seconds: pause after a failed read.
    """

    def __init__(self, feed_factory, *, block_seconds: float = BLOCK_SECONDS,
                 retry_seconds: float = RETRY_SECONDS):
        self._feed_factory = feed_factory
        self._feed = None
        self._block_seconds = block_seconds
        self._retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._reader: threading.Thread | None = None
        #: Held while a new stream reads its job and backlog (SETUP_CONCURRENCY).
        self.setup_slots = threading.BoundedSemaphore(SETUP_CONCURRENCY)

    def subscribe(self, job_id: str) -> Subscription:
        """Register a client for ``job_id``; events reach its queue from now on (call ``ready``
        once its backlog is read, and ``unsubscribe`` when it is gone)."""
        subscription = Subscription(job_id)
        with self._lock:
            if self._feed is None:  # before any ready(): it wakes the reader through the feed
                self._feed = self._feed_factory()
            self._subscriptions.setdefault(job_id, []).append(subscription)
            if self._reader is None:  # it stops when nobody watches anything (see _run)
                self._reader = threading.Thread(target=self._run, name="stemgen-event-hub",
                                                daemon=True)
                self._reader.start()
        return subscription

    def ready(self, subscription: Subscription, position: str) -> None:
        """The client has every event up to the id ``position``: the reader follows its job from
        there (or from further back, for another client)."""
        key = event_id_key(position)
        with self._lock:
            if subscription.position is None or subscription.position < key:
                subscription.position = key
        try:
            self._wake()  # the reader's current XREAD does not have this stream (or position)
        except Exception as exc:  # the reader picks it up on its next read anyway
            log.warning("event hub: could not wake the reader: %s", exc)

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a client (idempotent)."""
        with self._lock:
            watchers = self._subscriptions.get(subscription.job_id, [])
            if subscription in watchers:
                watchers.remove(subscription)
            if not watchers:
                self._subscriptions.pop(subscription.job_id, None)

    def watching(self) -> int:
        """How many clients are registered (for tests and monitoring)."""
        with self._lock:
            return sum(len(subs) for subs in self._subscriptions.values())

    # --- the reader -------------------------------------------------------------------------------
    def _wake(self) -> None:
        feed = self._feed
        if feed is not None:
            feed.wake()

    def _positions(self) -> dict[str, tuple[int, int]] | None:
        """Each watched job's lowest client position (jobs no client is ready for are left out);
        None when nobody watches anything, and then the reader is marked stopped."""
        with self._lock:
            if not self._subscriptions:
                self._reader = None
                return None
            positions = {}
            for job_id, subscriptions in self._subscriptions.items():
                if len(subscriptions) == 1:  # the common case, kept cheap: this runs per event
                    if subscriptions[0].position is not None:
                        positions[job_id] = subscriptions[0].position
                    continue
                known = [s.position for s in subscriptions if s.position is not None]
                if known:
                    positions[job_id] = min(known)
            return positions

    def _dispatch(self, events: list[JobEvent]) -> None:
        with self._lock:
            for event in events:
                for subscription in self._subscriptions.get(event.job_id, ()):
                    if subscription.position is None:
                        subscription.queue.put(event)  # still reading its backlog: it de-duplicates
                    elif event.key > subscription.position:
                        subscription.queue.put(event)
                        subscription.position = event.key

    def _run(self) -> None:
        try:
            while True:
                positions = self._positions()
                if positions is None:
                    return
                try:
                    events = self._feed.wait(positions, self._block_seconds)
                except Exception as exc:  # Redis away: the streams send heartbeats meanwhile
                    log.warning("event hub: reading events failed (%s); retrying", exc)
                    time.sleep(self._retry_seconds)
                    continue
                if events:
                    self._dispatch(events)
        except BaseException:
            # Unexpected: let the next subscription start a reader again.
            log.exception("event hub: the reader stopped")
            with self._lock:
                self._reader = None
            raise


def format_event(event: JobEvent) -> str:
    """One event in the text/event-stream format (its data is one line of JSON)."""
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.data}\n\n"


def event_stream(hub: EventHub, subscription: Subscription, backlog: list[JobEvent], *,
                 after: str | None, job_status: str, heartbeat_seconds: float) -> Iterator[str]:
    """The text of one client's stream (see the module docstring); it unsubscribes when it ends
    (the server also closes it when the client goes: GeneratorExit at a yield).

    Args:
        backlog: the stored events after ``after``, read after ``subscription`` was registered.
        after: the client's Last-Event-ID, None on a first connection.
        job_status: the job's status read before the backlog: a job already finished whose
            final event the backlog lacks (trimmed, or from before events existed) gets a final
            event without id, unless the client resumes (it had that event).
    """
    try:
        yield from _events(subscription, backlog, after, job_status, heartbeat_seconds)
    finally:
        hub.unsubscribe(subscription)


def _events(subscription: Subscription, backlog: list[JobEvent], after: str | None,
            job_status: str, heartbeat_seconds: float) -> Iterator[str]:
    yield f"retry: {CLIENT_RETRY_MS}\n\n"  # also sends the headers at once
    last = event_id_key(after) if after else None
    for event in backlog:
        yield format_event(event)
        last = event.key
        if event.final:
            return
    if job_status in FINAL_JOB_STATES:
        if after is None:
            data = json.dumps({"job_id": subscription.job_id, "status": job_status},
                              separators=(",", ":"))
            yield f"event: job\ndata: {data}\n\n"
        return
    while True:
        event = subscription.get(timeout=heartbeat_seconds)
        if event is None:
            yield ": keep-alive\n\n"
            continue
        if last is not None and event.key <= last:
            continue  # also in the backlog, or a re-read of the hub's
        yield format_event(event)
        last = event.key
        if event.final:
            return
