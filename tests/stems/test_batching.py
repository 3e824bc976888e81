"""Dynamic batching on the real tiny MusicGen."""

import threading

import numpy as np
import pytest

from stems.batching import StemBatcher
from stems.checkpoint import write_checkpoint
from stems.engine import SamplingParams, StemEngine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return StemEngine(str(write_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny")), device="cpu")


def call_concurrently(batcher, requests):
    results, errors = [None] * len(requests), [None] * len(requests)

    def run(i, kwargs):
        try:
            results[i] = batcher.generate(**kwargs)
        except Exception as exc:
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i, kw)) for i, kw in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_concurrent_stems_share_one_call(engine):
    batcher = StemBatcher(engine, max_batch=4, window_seconds=0.5)
    seen = {i: [] for i in range(3)}
    results, errors = call_concurrently(batcher, [
        {"prompt": f"stem {i}", "duration_seconds": 1.0, "progress": seen[i].append} for i in range(3)])
    assert errors == [None] * 3
    assert [r.shape for r in results] == [(1, 32000)] * 3
    assert batcher.stats().calls == 1 and batcher.stats().clips == 3
    assert all(s and s[-1] == pytest.approx(1.0) for s in seen.values())


def test_clips_cut_to_their_own_duration_in_a_bucket(engine):
    batcher = StemBatcher(engine, max_batch=4, window_seconds=0.5, bucket_seconds=1.0)
    results, _ = call_concurrently(batcher, [{"prompt": "a", "duration_seconds": 0.55},
                                             {"prompt": "b", "duration_seconds": 0.9}])
    assert [r.shape[-1] for r in results] == [17600, 28800]
    assert batcher.stats().calls == 1


def test_incompatible_requests_are_not_mixed(engine):
    batcher = StemBatcher(engine, max_batch=4, window_seconds=0.5)
    results, _ = call_concurrently(batcher, [
        {"prompt": "a", "duration_seconds": 0.5, "seed": 1},
        {"prompt": "b", "duration_seconds": 0.5, "seed": 2},
        {"prompt": "c", "duration_seconds": 0.5, "sampling": SamplingParams(temperature=0.5)},
        {"prompt": "d", "duration_seconds": 2.5}])
    assert all(r is not None for r in results)
    assert batcher.stats().calls == 4 and batcher.stats().largest_batch == 1


def test_max_batch_bounds_a_call(engine):
    batcher = StemBatcher(engine, max_batch=2, window_seconds=0.5)
    call_concurrently(batcher, [{"prompt": str(i), "duration_seconds": 0.5} for i in range(5)])
    stats = batcher.stats()
    assert stats.clips == 5 and stats.largest_batch == 2 and stats.calls >= 3


def test_seeded_batch_repeats(engine):
    batcher = StemBatcher(engine, max_batch=4, window_seconds=0.3)
    reqs = [{"prompt": p, "duration_seconds": 0.5, "seed": 11} for p in ("x", "y")]
    first, _ = call_concurrently(batcher, reqs)
    second, _ = call_concurrently(batcher, reqs)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_failure_reaches_every_caller(engine):
    batcher = StemBatcher(engine, max_batch=4, window_seconds=0.3)
    # top_k beyond the tiny model's codebook size makes audiocraft fail inside generate.
    bad = SamplingParams(top_k=100000)
    results, errors = call_concurrently(batcher, [
        {"prompt": p, "duration_seconds": 0.5, "sampling": bad} for p in ("x", "y")])
    assert results == [None, None]
    assert all(isinstance(e, RuntimeError) for e in errors)
    # The batcher keeps working afterwards.
    assert batcher.generate("ok", 0.5).shape == (1, 16000)


def test_rejects_bad_arguments(engine):
    with pytest.raises(ValueError):
        StemBatcher(engine, max_batch=0)
    with pytest.raises(ValueError):
        StemBatcher(engine).generate("x", 0)


def test_only_equal_conditioning_shares_a_call(engine):
    from stems.engine import AudioConditioning

    batcher = StemBatcher(engine, max_batch=8, window_seconds=0.5)
    tail = np.zeros((1, 16000), np.float32)
    tail[0, ::400] = 0.5
    song_a = AudioConditioning("continuation", tail, 32000, "song-a")
    song_b = AudioConditioning("continuation", tail * 0.5, 32000, "song-b")
    results, errors = call_concurrently(batcher, [
        {"prompt": "bass", "duration_seconds": 1.0, "conditioning": song_a},
        {"prompt": "guitar", "duration_seconds": 1.0, "conditioning": song_a},
        {"prompt": "drums", "duration_seconds": 1.0, "conditioning": song_b},
        {"prompt": "plain", "duration_seconds": 1.0},
    ])
    assert errors == [None] * 4
    assert all(r.shape == (1, 32000) for r in results)
    assert sorted(batcher.stats().recent_sizes) == [1, 1, 2]


def test_a_round_runs_short_calls_first_and_cuts_groups_to_max_batch(engine):
    from stems.batching import _Pending

    batcher = StemBatcher(engine, max_batch=2, window_seconds=0.0)
    items = [_Pending(f"long {i}", 20.0, SamplingParams(), None, None) for i in range(3)]
    items += [_Pending(f"short {i}", 2.0, SamplingParams(), None, None) for i in range(2)]
    calls = batcher.plan_round(items)
    assert [[item.prompt for item in call] for call in calls] == [
        ["short 0", "short 1"], ["long 0", "long 1"], ["long 2"]]
    fifo = StemBatcher(engine, max_batch=2, window_seconds=0.0, order="arrival").plan_round(items)
    assert [call[0].prompt for call in fifo] == ["long 0", "long 2", "short 0"]


def test_short_stems_are_not_held_behind_long_ones(engine):
    batcher = StemBatcher(engine, max_batch=4, window_seconds=0.5)
    done = {}

    def finished(name):
        def record(fraction):
            if fraction >= 1.0:
                done.setdefault(name, len(done))
        return record

    call_concurrently(batcher, [{"prompt": "long", "duration_seconds": 4.0, "progress": finished("long")},
                                {"prompt": "short", "duration_seconds": 0.5, "progress": finished("short")}])
    assert done == {"short": 0, "long": 1}
    assert batcher.stats().calls == 2


def test_a_full_batch_does_not_wait_out_the_window(engine):
    import time

    batcher = StemBatcher(engine, max_batch=2, window_seconds=30.0)
    started = time.monotonic()
    results, errors = call_concurrently(batcher, [{"prompt": p, "duration_seconds": 0.2} for p in "ab"])
    assert errors == [None, None] and time.monotonic() - started < 20
    assert batcher.stats().largest_batch == 2


def test_cancelling_a_row_leaves_its_batch_mates_bit_identical(engine):
    from stems.batching import GenerationCancelled

    batcher = StemBatcher(engine, max_batch=4, window_seconds=0.5)
    requests = [{"prompt": p, "duration_seconds": 2.0, "seed": 21} for p in ("keep", "drop")]
    reference, errors = call_concurrently(batcher, requests)
    assert errors == [None, None]

    cancel = threading.Event()

    def cancel_at_a_third(fraction):
        if fraction >= 0.3:
            cancel.set()

    requests[1] = dict(requests[1], cancel=cancel, progress=cancel_at_a_third)
    results, errors = call_concurrently(batcher, requests)
    assert errors[0] is None and isinstance(errors[1], GenerationCancelled)
    assert np.array_equal(results[0], reference[0])
    assert batcher.stats().calls == 2  # one batch each time: the cancelled row stayed in it


def test_a_batch_whose_rows_are_all_cancelled_stops(engine):
    from stems.batching import GenerationCancelled

    batcher = StemBatcher(engine, max_batch=4, window_seconds=0.0)
    cancel = threading.Event()
    seen = []

    def progress(fraction):
        seen.append(fraction)
        if fraction >= 0.1:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        batcher.generate("x", 20.0, cancel=cancel, progress=progress)
    assert max(seen) < 0.5  # stopped long before the end
    queued = threading.Event()
    queued.set()
    with pytest.raises(GenerationCancelled):  # cancelled while queued: never starts
        batcher.generate("y", 1.0, cancel=queued)
    assert batcher.stats().calls == 0
    assert batcher.generate("z", 0.2).shape == (1, 6400)  # the batcher goes on


def test_rows_of_a_call_do_not_depend_on_arrival_order(engine):
    from stems.batching import _Pending

    batcher = StemBatcher(engine, max_batch=4, window_seconds=0.0)
    items = [_Pending(p, 2.0, SamplingParams(), 5, None) for p in ("guitar", "bass", "drums")]
    forward = [[i.prompt for i in call] for call in batcher.plan_round(items)]
    backward = [[i.prompt for i in call] for call in batcher.plan_round(items[::-1])]
    assert forward == backward == [["bass", "drums", "guitar"]]


class _HangingEngine:
    """The real engine, whose next call can be made to hang (an injected stuck device call)."""

    def __init__(self, engine):
        self._engine = engine
        self.hang = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        if self.hang.is_set():
            self.release.wait(120)
        return self._engine.generate(*args, **kwargs)


def test_a_hung_generation_ends_within_its_deadline(engine):
    import time

    from stems.batching import GenerationDeadline, GenerationTimeout

    hanging = _HangingEngine(engine)
    hung = []
    deadline = GenerationDeadline(max_seconds=60.0, min_seconds=0.5, slack=4.0)
    batcher = StemBatcher(hanging, max_batch=1, window_seconds=0.0, deadline=deadline,
                          on_hung=hung.append)
    try:
        assert batcher.generate("warm", 1.0).shape == (1, 32000)  # measured: the deadline follows it
        allowed = deadline.seconds(1.0, batcher.speed())
        assert 0.5 < allowed < 60.0
        hanging.hang.set()
        started = time.monotonic()
        results, errors = call_concurrently(batcher, [{"prompt": "stuck", "duration_seconds": 1.0},
                                                      {"prompt": "queued", "duration_seconds": 1.0}])
        elapsed = time.monotonic() - started
        assert results == [None, None]
        assert all(isinstance(error, GenerationTimeout) for error in errors), errors
        assert "ran past its deadline" in str(errors[0])
        assert elapsed <= allowed + 1.0 + 0.5  # the deadline, one look of the watchdog, scheduling
        assert hung == [batcher.hung] and batcher.hung is not None
        with pytest.raises(GenerationTimeout):  # refused at once from now on
            batcher.generate("later", 1.0)
    finally:
        hanging.release.set()
        deadline_at = time.monotonic() + 60
        while batcher._current is not None and time.monotonic() < deadline_at:
            time.sleep(0.05)  # the released call ends before the interpreter does


def test_the_deadline_is_the_maximum_until_a_call_was_measured():
    from stems.batching import GenerationDeadline

    deadline = GenerationDeadline(max_seconds=600.0, min_seconds=30.0, slack=4.0)
    assert deadline.seconds(30.0, None) == 600.0
    assert deadline.seconds(30.0, 0.5) == 30.0 + 4.0 * 0.5 * 30.0
    assert deadline.seconds(120.0, 10.0) == 600.0
