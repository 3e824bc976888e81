"""The outbox dispatcher: sends the Celery chords of recorded jobs, off the gateway's request path.

``POST /generate`` records a job and its outbox entry in one Redis script (tasks.jobstore) and
answers; it never talks to the broker. Each worker runs an ``OutboxDispatcher`` thread (a Celery
worker bootstep, tasks.worker) that claims due outbox entries, sends each job's chord (one
``generate_stem`` per stem, then ``finalize_request``; tasks.stem_tasks.send_job_chord) and takes
the entry out. This is the transactional-outbox pattern (Richardson, *Microservices Patterns*,
"Transactional outbox"; here a Redis sorted set rather than a database table):

- nothing is lost: a job is in the outbox from the moment it is recorded; an entry is leased to
  one dispatcher at a time and is claimed again when the lease ends, so a dispatcher that dies
  (worker SIGKILL) leaves its entries to another; a chord that cannot be sent (broker down) is
  tried again after ``retry_seconds``;
- the broker being down no longer fails submissions: jobs wait in the outbox;
- at least once: a dispatcher that dies after sending a chord and before taking the entry out
  sends it again after the lease; the job's stems are then generated twice and its first final
  state and single callback still hold (finalize_request, deliver_callback).

The dispatcher also sends ``deliver_callback`` again for a delivery still pending a grace period
after its attempt was due: with the Redis broker, a message published while a worker is in warm
shutdown can vanish (celery/celery#4354; seen in the fault suite: a delivery retry published by a
worker stopping with SIGTERM never arrived). A copy of a delivery that was not lost is harmless:
deliveries run one at a time under a lock and check the delivered state (tasks.callback_delivery).

Building and publishing a chord costs milliseconds of CPU (canvas, one message per stem carrying the
request, result subscriptions); measured in the gateway it was most of a request's CPU.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import redis

import stemgen_logging
from tasks.jobstore import JobNotFound, JobStore

log = logging.getLogger(__name__)


class OutboxDispatcher:
    """Claims due outbox entries and sends their jobs' chords.

    Args:
        jobs: the job store holding the outbox.
        send: sends one job's chord; called with the job record (JobStore.get); raises when the
            broker cannot take it.
        resend_delivery: sends a job's ``deliver_callback`` again (called with the job id); None:
            no delivery sweep.
        delivery_grace_seconds: how long past its due time a pending delivery is presumed lost.
        batch_size: most entries claimed per look.
        lease_seconds: how long a claimed entry belongs to this dispatcher.
        retry_seconds: wait before trying a job whose chord could not be sent again.
        poll_seconds: wait between looks while the outbox has nothing due.
    """

    def __init__(self, jobs: JobStore, send: Callable[[dict], None], *, batch_size: int = 100,
                 lease_seconds: float = 30.0, retry_seconds: float = 5.0, poll_seconds: float = 0.1,
                 resend_delivery: Callable[[str], None] | None = None,
                 delivery_grace_seconds: float = 300.0):
        self.jobs, self.send, self.resend_delivery = jobs, send, resend_delivery
        self.delivery_grace_seconds = delivery_grace_seconds
        self.batch_size, self.lease_seconds = batch_size, lease_seconds
        self.retry_seconds, self.poll_seconds = retry_seconds, poll_seconds

    @classmethod
    def from_settings(cls, settings, jobs: JobStore, send: Callable[[dict], None],
                      resend_delivery: Callable[[str], None] | None = None) -> "OutboxDispatcher":
        return cls(jobs, send, batch_size=settings.dispatcher_batch_size,
                   lease_seconds=settings.dispatcher_lease_seconds,
                   retry_seconds=settings.dispatcher_retry_seconds,
                   poll_seconds=settings.dispatcher_poll_seconds,
                   resend_delivery=resend_delivery,
                   delivery_grace_seconds=settings.delivery_sweep_grace_seconds)

    def dispatch_due(self) -> int:
        """Claim the due entries (up to ``batch_size``) and dispatch them; returns how many were
        claimed.

        Raises:
            redis.RedisError: the job store is unreachable (claimed entries come back after the
                lease).
        """
        claimed = self.jobs.claim_due(self.batch_size, self.lease_seconds)
        for i, job_id in enumerate(claimed):
            with stemgen_logging.log_context(job_id=job_id):  # on the lines of this job's dispatch
                sent = self._dispatch(job_id)
            if not sent:
                # The broker is down: the rest of the batch waits too, rather than each paying for
                # Celery's publish retries while its lease runs out.
                for rest in claimed[i + 1:]:
                    self.jobs.defer_dispatch(rest, self.retry_seconds)
                break
        return len(claimed)

    def resend_overdue_deliveries(self) -> int:
        """Send ``deliver_callback`` again for pending deliveries overdue by the grace period (each
        then waits a grace period before it can be re-sent again); returns how many.

        Raises:
            redis.RedisError: the job store is unreachable. The broker's errors: the entries come
                back after the grace period.
        """
        if self.resend_delivery is None:
            return 0
        # A re-sent delivery counts as due now: it is overdue again one grace period later.
        overdue = self.jobs.claim_overdue_deliveries(
            self.delivery_grace_seconds, self.batch_size, lease_seconds=0)
        for job_id in overdue:
            log.warning("outbox: delivery of job %s is %.0fs overdue; sending it again", job_id,
                        self.delivery_grace_seconds)
            self.resend_delivery(job_id)
        return len(overdue)

    def _dispatch(self, job_id: str) -> bool:
        """Send one claimed job; False when the broker did not take it (the job is deferred)."""
        try:
            job = self.jobs.get(job_id)
        except JobNotFound:
            log.warning("outbox: job %s has no record (expired); dropped", job_id)
            self.jobs.drop_from_outbox(job_id)
            return True
        stemgen_logging.bind(generation_request_id=job.get("generation_request_id"))
        if not job["dispatched"]:
            try:
                self.send(job)
            except redis.RedisError:
                raise
            except Exception as exc:  # the broker refused or is unreachable: try again later
                log.warning("outbox: job %s not sent, next try in %.0fs: %s: %s", job_id,
                            self.retry_seconds, exc.__class__.__name__, exc)
                self.jobs.defer_dispatch(job_id, self.retry_seconds)
                return False
        self.jobs.mark_dispatched(job_id)
        log.info("outbox: job %s dispatched", job_id)
        return True

    def run(self, stop: threading.Event) -> None:
        """Dispatch until ``stop`` is set: at once while entries are due, else every
        ``poll_seconds``; a lost job-store connection is waited out (up to 5 s between tries)."""
        failures = 0
        while not stop.is_set():
            try:
                claimed = self.dispatch_due()
                self.resend_overdue_deliveries()
                failures = 0
            except redis.RedisError as exc:
                failures += 1
                wait = min(5.0, self.poll_seconds * 2 ** failures)
                log.warning("outbox: job store unreachable, next look in %.1fs: %s", wait, exc)
                stop.wait(wait)
                continue
            except Exception:  # never let the thread die: a dead dispatcher dispatches nothing
                log.exception("outbox: dispatch failed")
                stop.wait(self.retry_seconds)
                continue
            if claimed < self.batch_size:
                stop.wait(self.poll_seconds)


class DispatcherThread:
    """An OutboxDispatcher on a daemon thread, started and stopped with the worker."""

    def __init__(self, dispatcher: OutboxDispatcher, name: str = "stemgen-outbox"):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=dispatcher.run, args=(self._stop,), name=name,
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
