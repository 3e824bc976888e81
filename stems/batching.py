"""Dynamic batching of stem generations that arrive close together.

A GPU (or a many-core CPU) generating one clip at a time leaves most of its throughput unused:
MusicGen's decoding is one transformer step per token frame, and a batch of B clips costs little more
per step than one. Callers on different threads (one Celery task per stem, run by a threads pool)
call ``StemBatcher.generate``; a single generation thread collects the requests that arrive within
``window_seconds`` (up to ``max_batch``), groups those that can share one ``MusicGen.generate``
call, and hands each caller its own clip. This is the dynamic batching of inference servers (as in
NVIDIA Triton's dynamic batcher or TorchServe's batch_size/max_batch_delay).

Requests share a call when they have the same sampling parameters, the same seed, the same audio
conditioning (if any) and the same duration bucket (durations rounded up to ``bucket_seconds``;
the batch generates the longest and each clip is cut to its own length).

Policy of a round (measured by ``python -m bench.batching``):

1. the first request opens a round and waits at most ``window_seconds`` for company; the wait
   ends early once one compatible group fills ``max_batch`` (the largest batch bucket of the
   engine's static decoder, so a full bucket never waits);
2. everything queued by then joins the round (up to ``round_limit`` requests), without more waiting;
3. groups of compatible requests are put in a canonical row order (by prompt, then duration)
   and cut into calls of at most ``max_batch`` clips;
4. calls run shortest duration first (``order="shortest"``; ``"arrival"`` runs them in arrival
   order): a 5 s stem queued beside 30 s stems is not held behind them. A long call still runs
   within the round it was collected in, so a stream of short requests cannot starve it; requests
   arriving during a round wait for the next one.

Watchdog: every model call has a deadline (``GenerationDeadline``): a floor plus a slack times
the measured wall seconds per second of audio of recent calls, times its duration, capped at a
maximum (the maximum alone until a call was measured). A call past its deadline is presumed hung
in a device call, which no thread can interrupt: its callers, and every request queued behind it,
get ``GenerationTimeout``, later calls are refused at once, and ``on_hung`` is called once (the
worker then reports not-ready and exits, tasks.device_watchdog).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from stems.engine import AudioConditioning, ProgressCallback, SamplingParams, StemEngine

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    prompt: str
    duration_seconds: float
    sampling: SamplingParams
    seed: int | None
    progress: ProgressCallback | None
    conditioning: AudioConditioning | None = None
    cancel: threading.Event | None = None
    future: Future = field(default_factory=Future)

    def cancelled(self) -> bool:
        """True once the caller asked to stop; its future then fails with GenerationCancelled."""
        if self.cancel is None or not self.cancel.is_set():
            return False
        if not self.future.done():
            self.future.set_exception(GenerationCancelled("the stem was cancelled"))
        return True


class GenerationCancelled(Exception):
    """The caller's ``cancel`` event was set before its clip was done."""


class GenerationTimeout(RuntimeError):
    """A model call ran past its deadline (its device call is presumed hung); also raised for
    every later call of that batcher."""


@dataclass(frozen=True)
class GenerationDeadline:
    """How long one model call may take, seconds: ``min_seconds + slack × speed × duration``,
    where ``speed`` is the slowest measured wall seconds per second of audio among the recent
    calls, capped at ``max_seconds``; ``max_seconds`` until a call was measured.

    ``max_seconds`` is the bound the deployment's visibility timeout and SIGTERM grace period are
    set against (stemgen_settings: deadline < visibility timeout, deadline ≤ grace period).
    """

    max_seconds: float
    min_seconds: float = 60.0
    slack: float = 4.0

    def seconds(self, duration_seconds: float, speed: float | None) -> float:
        if speed is None:
            return self.max_seconds
        return min(self.max_seconds, self.min_seconds + self.slack * speed * duration_seconds)


@dataclass(frozen=True)
class BatchStats:
    """Counters since start: calls to the model and clips generated (clips/calls = mean batch)."""

    calls: int
    clips: int
    largest_batch: int
    #: sizes of the latest calls (up to 64), oldest first
    recent_sizes: tuple[int, ...] = ()


class StemBatcher:
    """Groups concurrent ``generate`` calls into batched MusicGen calls on one thread.

    Args:
        engine: the loaded model.
        max_batch: most clips per model call.
        window_seconds: how long the first request of a batch waits for company.
        bucket_seconds: duration granularity of a batch (see module doc).
        order: "shortest" (shortest calls of a round first) or "arrival" (see module doc).
        round_limit: most requests one round takes (default 4 × max_batch).
        deadline: the watchdog's deadline of a model call (see module doc); None: no watchdog.
        on_hung: called once, on the watchdog's thread, with the GenerationTimeout of the first
            call past its deadline.
    """

    def __init__(self, engine: StemEngine, *, max_batch: int = 4, window_seconds: float = 0.05,
                 bucket_seconds: float = 1.0, order: str = "shortest", round_limit: int | None = None,
                 deadline: GenerationDeadline | None = None,
                 on_hung: Callable[[GenerationTimeout], None] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if order not in ("shortest", "arrival"):
            raise ValueError("order must be 'shortest' or 'arrival'")
        self.engine = engine
        self.max_batch = max_batch
        self.window_seconds = window_seconds
        self.bucket_seconds = bucket_seconds
        self.order = order
        self.round_limit = round_limit or 4 * max_batch
        self._queue: "queue.Queue[_Pending]" = queue.Queue()
        self._calls = self._clips = self._largest = 0
        self._sizes: "collections.deque[int]" = collections.deque(maxlen=64)
        self._progress = _ProgressRelay()
        self.deadline = deadline
        self._on_hung = on_hung
        self._speeds: "collections.deque[float]" = collections.deque(maxlen=16)
        self._watch_lock = threading.Lock()
        self._current: tuple[list[_Pending], float, float, float] | None = None  # group, start, deadline, duration
        self._round: list[_Pending] = []
        #: Set once a call outlived its deadline: the batcher takes no more work.
        self.hung: GenerationTimeout | None = None
        self._thread = threading.Thread(target=self._loop, name="stem-batcher", daemon=True)
        self._thread.start()
        if deadline is not None:
            threading.Thread(target=self._watch, name="stem-batcher-watchdog", daemon=True).start()

    def generate(self, prompt: str, duration_seconds: float, *,
                 sampling: SamplingParams = SamplingParams(), seed: int | None = None,
                 progress: ProgressCallback | None = None, timeout: float | None = None,
                 conditioning: AudioConditioning | None = None,
                 cancel: threading.Event | None = None) -> np.ndarray:
        """Generate one clip, batched with whatever compatible requests arrive meanwhile.

        ``conditioning`` (see stems.engine.AudioConditioning) is batched only with requests that
        carry the same conditioning (same kind and fingerprint).

        ``cancel``: once set, the call returns (raises GenerationCancelled) at the batch's next
        decoding step; a queued request never starts. The other rows of its batch go on
        unchanged (the cancelled row's arithmetic is still done, so theirs is bit-identical),
        and a batch whose rows are all cancelled stops.

        Returns:
            float32 ``[channels, samples]``, ``round(duration_seconds * sample_rate)`` samples.

        Raises:
            stems.engine.GenerationError (or ValueError) as StemEngine.generate would, for every
            clip of the failed batch; concurrent.futures.TimeoutError after ``timeout`` seconds;
            GenerationCancelled once ``cancel`` is set; GenerationTimeout when its call (or one
            before it) ran past the watchdog's deadline.
        """
        if duration_seconds <= 0:
            raise ValueError("duration_seconds must be > 0")
        if self.hung is not None:
            raise self.hung
        if not self._thread.is_alive():
            raise RuntimeError("the stem batcher's generation thread has stopped")
        pending = _Pending(prompt, float(duration_seconds), sampling, seed, progress, conditioning,
                           cancel)
        self._queue.put(pending)
        if self.hung is not None:  # the watchdog fired meanwhile: nobody will take it
            self._fail_queued(self.hung)
        return pending.future.result(timeout)

    def speed(self) -> float | None:
        """The slowest wall seconds per second of audio among the recent model calls (None before
        the first one)."""
        with self._watch_lock:
            return max(self._speeds) if self._speeds else None

    def _watch(self) -> None:
        """The watchdog (see module doc): looks at the running call every ``interval`` seconds."""
        interval = min(1.0, max(0.05, self.deadline.max_seconds / 20, self.deadline.min_seconds / 20))
        while True:
            time.sleep(interval)
            with self._watch_lock:
                current = self._current
            if current is None or time.monotonic() <= current[2]:
                continue
            group, started, deadline_at, duration = current
            self.hung = GenerationTimeout(
                f"generation of {len(group)} clip(s) of {duration:g} s ran past its deadline of "
                f"{deadline_at - started:.0f} s (the device call is presumed hung)")
            log.error("%s; failing its requests and every queued one", self.hung)
            with self._watch_lock:
                waiting = list(group) + list(self._round)  # the call, and the round's later calls
            for item in waiting:
                if not item.future.done():
                    with contextlib.suppress(InvalidStateError):  # done meanwhile
                        item.future.set_exception(self.hung)
            self._fail_queued(self.hung)
            if self._on_hung is not None:
                self._on_hung(self.hung)
            return

    def stats(self) -> BatchStats:
        return BatchStats(self._calls, self._clips, self._largest, tuple(self._sizes))

    # --- generation thread ------------------------------------------------------------------------------
    def _key(self, item: _Pending) -> tuple:
        bucket = math.ceil(item.duration_seconds / self.bucket_seconds - 1e-9)
        cond = item.conditioning
        return bucket, item.sampling, item.seed, (cond.kind, cond.fingerprint) if cond else None

    def _collect(self) -> list[_Pending]:
        first = self._queue.get()
        items = [first]
        sizes = collections.Counter([self._key(first)])
        deadline = time.monotonic() + self.window_seconds
        while len(items) < self.round_limit:
            if max(sizes.values()) >= self.max_batch:  # a full batch: stop waiting, take what is queued
                remaining = 0.0
            else:
                remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            sizes[self._key(item)] += 1
        return items

    def plan_round(self, items: list[_Pending]) -> list[list[_Pending]]:
        """The calls of a round: compatible requests grouped, cut to ``max_batch``, ordered by
        ``order`` (see module doc)."""
        groups: dict[tuple, list[_Pending]] = {}
        for item in items:
            groups.setdefault(self._key(item), []).append(item)
        for group in groups.values():
            # Rows in a canonical order, not arrival order: a row's random draws depend on its
            # place in the batch, so the same requests make the same clips however their task
            # threads happened to race.
            group.sort(key=lambda item: (item.prompt, item.duration_seconds))
        calls = [group[i:i + self.max_batch] for group in groups.values()
                 for i in range(0, len(group), self.max_batch)]
        if self.order == "shortest":
            calls.sort(key=lambda call: max(item.duration_seconds for item in call))  # stable
        return calls

    def _loop(self) -> None:
        try:
            while True:
                items = self._collect()
                with self._watch_lock:
                    self._round = items  # the watchdog fails the calls still waiting in it too
                for call in self.plan_round(items):
                    self._run(call)
        finally:  # only a BaseException (interpreter exit) ends the loop: nobody waits forever
            self._fail_queued(RuntimeError("the stem batcher's generation thread has stopped"))

    def _fail_queued(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(exc)

    def _run(self, group: list[_Pending]) -> None:
        group = [item for item in group if not item.cancelled() and not item.future.done()
                 and item.future.set_running_or_notify_cancel()]
        if not group:
            return
        duration = max(item.duration_seconds for item in group)
        cancellable = any(item.cancel is not None for item in group)
        reports = any(item.progress is not None for item in group)

        def fan_out(fraction: float) -> None:
            # Runs inside the decoding loop: hand over, never wait on the callers' sinks (the
            # worker's writes to Redis) here.
            live = [item for item in group if not item.cancelled()]
            if not live:
                raise GenerationCancelled("every row of the batch was cancelled")
            for item in live:
                if item.progress is not None:
                    self._progress.post(item.progress, fraction)

        started = time.monotonic()
        if self.deadline is not None:
            allowed = self.deadline.seconds(duration, self.speed())
            with self._watch_lock:
                self._current = (group, started, started + allowed, duration)
        try:
            try:
                audio = self.engine.generate([item.prompt for item in group], duration,
                                             sampling=group[0].sampling, seed=group[0].seed,
                                             progress=fan_out if reports or cancellable else None,
                                             conditioning=group[0].conditioning)
            finally:
                self._progress.flush()  # a caller's last progress precedes its result
                with self._watch_lock:
                    self._current = None
        except BaseException as exc:  # every waiting caller gets the failure
            for item in group:
                if not item.future.done():
                    with contextlib.suppress(InvalidStateError):
                        item.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        with self._watch_lock:
            self._speeds.append((time.monotonic() - started) / duration)
        self._calls += 1
        self._clips += len(group)
        self._largest = max(self._largest, len(group))
        self._sizes.append(len(group))
        rate = self.engine.sample_rate
        for item, clip in zip(group, audio):
            if not item.future.done():  # not cancelled (or timed out) meanwhile
                with contextlib.suppress(InvalidStateError):
                    item.future.set_result(clip[:, : int(round(item.duration_seconds * rate))])


class _ProgressRelay:
    """Calls progress callbacks on a thread of its own, newest fraction first-come.

    The generation thread posts a fraction per token and moves on; a slow sink (a Redis write
    that retries) delays only later progress reports of that stem, never the batch. Posts that
    arrive while a callback runs are coalesced: each callback gets its newest fraction.
    """

    def __init__(self):
        self._latest: dict[int, tuple[ProgressCallback, float]] = {}
        self._busy = False
        self._cond = threading.Condition()
        threading.Thread(target=self._loop, name="stem-progress", daemon=True).start()

    def post(self, callback: ProgressCallback, fraction: float) -> None:
        with self._cond:
            self._latest[id(callback)] = (callback, fraction)
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every posted fraction was delivered (False after ``timeout`` seconds)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._latest and not self._busy, timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._latest))
                batch, self._latest, self._busy = list(self._latest.values()), {}, True
            for callback, fraction in batch:
                try:
                    callback(fraction)
                except Exception:  # a caller's progress sink must not break the batch
                    log.exception("progress callback failed")
            with self._cond:
                self._busy = False
                self._cond.notify_all()
