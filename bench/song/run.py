"""Song analysis bench: ``python -m bench.song [--songs N] [--seed S] [--jobs J] [--strict]``.

Generates ``--songs`` synthetic songs (``bench.song.synth``: ground truth per beat, bar and half
bar), runs ``stems.song.analyse_song`` on each and scores it, with a baseline beside every figure
from the same songs in the same run:

- key: exact accuracy, overall and on the songs whose tonic is marked only by cadences
  (categories ``cadence`` and ``relative``); baseline ``stems.analysis.estimate_key``
  (Krumhansl-Schmuckler with the opening emphasis);
- chords: MIREX-style major/minor accuracy weighted by duration (``mir_eval.chord.evaluate``,
  "majmin"); baseline: librosa's beats, bar 1 on the first beat, each bar's mean CQT chroma
  (``stems.analysis.chromagram``) matched to the 24 major/minor triad templates;
- beats and downbeats: F-measure (``mir_eval.beat.f_measure``, +-70 ms); baseline
  ``librosa.beat.beat_track`` alone, every 4th beat from its first as the downbeats;
- tempo map: per song the median over true beats of |estimated local beat period / true - 1|
  (%), mean and 90th percentile over songs; the same baseline;
- play-along: a synthetic stem with known beats (woodblock clicks, accented downbeats, its own
  steady tempo 1-3 % off the song's) conformed with ``stems.warping.conform_to_beats`` onto
  bars 3-10 of the analysed beat map and laid at the region's ``start_seconds``; each of its
  clicks (threshold onset detector) against the nearest TRUE beat of the song: median and worst
  over all songs (ms), and how many stems start on a true downbeat.

The default seed (2) is the one CI runs; the analysis was tuned on seeds 0 and 1. ``--strict`` exits 1
when a target (TARGETS) is missed.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

TARGETS = {
    "key": 0.97,            # exact key accuracy, all songs
    "key_cadence": 0.90,    # exact key accuracy, tonic marked only by cadences
    "chords": 0.85,         # majmin, duration-weighted
    "downbeat_f": 0.90,
    "beat_f": 0.95,
    "conform_median_ms": 10.0,
    "conform_worst_ms": 25.0,
}
CADENCE_CATEGORIES = ("cadence", "relative")
REGION = (3, 8)   # start bar, bars of the play-along check


@dataclass
class SongResult:
    name: str
    category: str
    drums: bool
    key_ok: bool
    key_base_ok: bool
    key_found: str
    key_true: str
    key_confidence: float
    chords: float
    chords_base: float
    beat_f: float
    beat_f_base: float
    downbeat_f: float
    downbeat_f_base: float
    tempo_err: float
    tempo_err_base: float
    conform_err_ms: np.ndarray
    conform_on_downbeat: bool
    seconds: float
    analyse_s: float


def _mireval_label(name: str) -> str:
    if name == "N":
        return "N"
    from stems.plan import PITCH_CLASSES, parse_chord
    chord = parse_chord(name)
    quality = {"maj": "maj", "min": "min", "7": "7", "maj7": "maj7", "min7": "min7", "dim": "dim",
               "aug": "aug", "sus2": "sus2", "sus4": "sus4", "5": "5"}[chord.quality]
    return f"{PITCH_CLASSES[chord.root]}:{quality}"


def _tempo_map_error(ref: np.ndarray, est: np.ndarray) -> float:
    """Median over true beats of |estimated local period / true period - 1|, in %."""
    if len(est) < 2:
        return 100.0
    true_mid = 0.5 * (ref[1:] + ref[:-1])
    true_period = np.diff(ref)
    est_mid = 0.5 * (est[1:] + est[:-1])
    est_period = np.interp(true_mid, est_mid, np.diff(est))
    return float(100.0 * np.median(np.abs(est_period / true_period - 1.0)))


def _baseline_chords(audio: np.ndarray, sr: int, beats: np.ndarray, end: float) -> tuple[np.ndarray, list[str]]:
    from stems.analysis import chromagram
    from stems.plan import PITCH_CLASSES

    chroma = chromagram(audio, sr)
    frame_t = np.arange(chroma.shape[1]) * 1024 / 11025
    bounds = list(beats[::4]) + [end]
    templates, labels = [], []
    for q, steps in (("maj", (0, 4, 7)), ("min", (0, 3, 7))):
        for r in range(12):
            t = np.zeros(12)
            t[[(r + s) % 12 for s in steps]] = 1
            templates.append(t - t.mean())
            labels.append(f"{PITCH_CLASSES[r]}:{q}")
    templates = np.asarray(templates)
    intervals, out = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        sel = (frame_t >= a) & (frame_t < b)
        if b <= a or not sel.any():
            continue
        v = chroma[:, sel].mean(axis=1)
        v = v - v.mean()
        intervals.append((a, b))
        out.append(labels[int(np.argmax(templates @ v))])
    return np.asarray(intervals), out


def _click_stem(rng: np.random.Generator, bpm: float, bars: int, sr: int) -> np.ndarray:
    """Woodblock clicks on every beat from 0.15 s at a steady ``bpm``, downbeats accented and
    lower, with one extra bar and a half second after."""
    beat = 60.0 / bpm
    n = int((0.15 + (bars + 1) * 4 * beat + 0.5) * sr)
    out = np.zeros(n)
    t = np.arange(int(0.04 * sr)) / sr
    for k in range((bars + 1) * 4):
        down = k % 4 == 0
        f = 600.0 if down else 1000.0
        hit = (1.0 if down else 0.6) * np.sin(2 * np.pi * f * t) * np.exp(-t / 0.008)
        i = int(round((0.15 + k * beat) * sr))
        out[i:i + len(hit)] += hit[: n - i]
    # a quiet low drone so the stem is not silence between clicks
    out += 0.02 * np.sin(2 * np.pi * 110.0 * np.arange(n) / sr) * rng.uniform(0.5, 1.0)
    return out.astype(np.float32)[None, :]


def _onsets(y: np.ndarray, sr: int, threshold: float = 0.25) -> np.ndarray:
    """First sample above ``threshold`` x peak after >= 80 ms below it (s)."""
    env = np.abs(np.asarray(y)).max(axis=0)
    above = np.flatnonzero(env > threshold * env.max())
    if len(above) == 0:
        return np.array([])
    starts = [above[0]]
    for i in above[1:]:
        if i - starts[-1] > 0.08 * sr:
            starts.append(i)
    return np.asarray(starts) / sr


def run_song(args: tuple[int, int]) -> SongResult:
    index, seed = args
    import librosa
    import mir_eval

    from bench.song.synth import SAMPLE_RATE, build_song
    from stems.analysis import estimate_key
    from stems.song import RegionError, analyse_song
    from stems.warping import conform_to_beats

    song = build_song(index, seed)
    sr = SAMPLE_RATE
    t0 = time.perf_counter()
    found = analyse_song(song.audio, sr)
    analyse_s = time.perf_counter() - t0
    # key
    base_key = estimate_key(song.audio, sr).key
    # chords
    ref_int, ref_names = song.chord_intervals()
    ref_lab = [_mireval_label(c) for c in ref_names]
    est_int = np.asarray([(c.start_seconds, c.end_seconds) for c in found.chords])
    est_lab = [_mireval_label(c.chord) for c in found.chords]

    def majmin(intervals, labels) -> float:
        if len(labels) == 0:
            return 0.0
        est_i, est_l = mir_eval.util.adjust_intervals(intervals, labels, ref_int.min(), ref_int.max(),
                                                      mir_eval.chord.NO_CHORD, mir_eval.chord.NO_CHORD)
        merged, ref_l, est_l = mir_eval.util.merge_labeled_intervals(ref_int, ref_lab, est_i, est_l)
        durations = mir_eval.util.intervals_to_durations(merged)
        return float(mir_eval.chord.weighted_accuracy(mir_eval.chord.majmin(ref_l, est_l), durations))

    # librosa alone
    mono = song.audio[0]
    _, frames = librosa.beat.beat_track(y=mono, sr=sr, hop_length=512)
    base_beats = librosa.frames_to_time(frames, sr=sr, hop_length=512)
    base_int, base_lab = _baseline_chords(song.audio, sr, base_beats, float(song.beats[-1]))
    est_beats = np.asarray(found.beats)
    est_down = np.asarray(found.downbeats)
    # play-along check
    rng = np.random.default_rng([seed, index, 7])
    start_bar, bars = REGION
    try:
        region = found.region(start_bar, bars)
    except RegionError:   # the analysis found too few bars: a miss, scored as such
        nearest, on_downbeat = np.array([np.inf]), False
    else:
        stem_bpm = region.bpm * (1.0 + rng.choice([-1, 1]) * rng.uniform(0.01, 0.03))
        stem = _click_stem(rng, stem_bpm, bars, sr)
        target = np.asarray(region.beats) - region.start_seconds
        conformed = conform_to_beats(stem, sr, target, bars=bars)
        hits = _onsets(conformed.audio, sr) + region.start_seconds
        nearest = np.abs(hits[:, None] - song.beats[None, :]).min(axis=1) if len(hits) else np.array([np.inf])
        on_downbeat = bool(len(hits) and np.min(np.abs(song.downbeats - hits[0])) < 0.03)
    return SongResult(
        name=song.name, category=song.category, drums=song.drums,
        key_ok=found.key == song.key.name, key_base_ok=base_key == song.key,
        key_found=found.key, key_true=song.key.name, key_confidence=found.key_confidence,
        chords=majmin(est_int, est_lab), chords_base=majmin(base_int, base_lab) if len(base_lab) else 0.0,
        beat_f=float(mir_eval.beat.f_measure(song.beats, est_beats)),
        beat_f_base=float(mir_eval.beat.f_measure(song.beats, base_beats)),
        downbeat_f=float(mir_eval.beat.f_measure(song.downbeats, est_down)),
        downbeat_f_base=float(mir_eval.beat.f_measure(song.downbeats, base_beats[::4])),
        tempo_err=_tempo_map_error(song.beats, est_beats),
        tempo_err_base=_tempo_map_error(song.beats, base_beats),
        conform_err_ms=1e3 * nearest, conform_on_downbeat=on_downbeat,
        seconds=song.audio.shape[1] / sr, analyse_s=analyse_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.song", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--songs", type=int, default=40, help="number of songs (default 40)")
    parser.add_argument("--seed", type=int, default=2,
                        help="synthesis seed (default 2, the one CI runs; tuned on 0 and 1)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--verbose", action="store_true", help="one line per song")
    args = parser.parse_args(argv)
    if args.songs < 1 or args.jobs < 1:
        parser.error("--songs and --jobs must be >= 1")

    started = time.perf_counter()
    work = [(i, args.seed) for i in range(args.songs)]
    if args.jobs == 1:
        results = [run_song(w) for w in work]
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run_song, work, chunksize=1)

    if args.verbose:
        for r in results:
            print(f"  {r.name:<44} key {r.key_found:<9}{'ok ' if r.key_ok else 'BAD'} ({r.key_confidence:.2f}) "
                  f"chords {100 * r.chords:5.1f}  beatF {r.beat_f:.2f} downF {r.downbeat_f:.2f} "
                  f"tempo {r.tempo_err:.2f}%  conform max {r.conform_err_ms.max():5.1f} ms")
    cadence = [r for r in results if r.category in CADENCE_CATEGORIES]
    drums = [r for r in results if r.drums]
    drumless = [r for r in results if not r.drums]

    def pct(v) -> float:
        return 100.0 * float(np.mean(v)) if len(v) else float("nan")

    figures = {
        "key": np.mean([r.key_ok for r in results]),
        "key_cadence": np.mean([r.key_ok for r in cadence]) if cadence else 1.0,
        "chords": np.mean([r.chords for r in results]),
        "downbeat_f": np.mean([r.downbeat_f for r in results]),
        "beat_f": np.mean([r.beat_f for r in results]),
    }
    errs = np.concatenate([r.conform_err_ms for r in results])
    figures["conform_median_ms"] = float(np.median(errs))
    figures["conform_worst_ms"] = float(np.max(errs))
    print(f"song bench: {len(results)} songs, seed {args.seed}; {len(drums)} with drums, {len(drumless)} without; "
          f"{len(cadence)} with the tonic marked only by cadences; 32 kHz, 80-140 BPM, drift up to 3 %")
    print(f"{'':<34}{'stems.song':>12}{'baseline':>12}   baseline is")
    print(f"{'key exact, all %':<34}{pct([r.key_ok for r in results]):12.1f}"
          f"{pct([r.key_base_ok for r in results]):12.1f}   stems.analysis.estimate_key")
    print(f"{'key exact, cadence-only tonic %':<34}{pct([r.key_ok for r in cadence]):12.1f}"
          f"{pct([r.key_base_ok for r in cadence]):12.1f}")
    for label, sel in (("with drums", drums), ("without drums", drumless)):
        print(f"{'key exact, ' + label + ' %':<34}{pct([r.key_ok for r in sel]):12.1f}"
              f"{pct([r.key_base_ok for r in sel]):12.1f}")
    print(f"{'chords majmin (mir_eval) %':<34}{pct([r.chords for r in results]):12.1f}"
          f"{pct([r.chords_base for r in results]):12.1f}   librosa beats + bar template")
    print(f"{'beat F (mir_eval)':<34}{np.mean([r.beat_f for r in results]):12.3f}"
          f"{np.mean([r.beat_f_base for r in results]):12.3f}   librosa.beat.beat_track")
    print(f"{'downbeat F (mir_eval)':<34}{np.mean([r.downbeat_f for r in results]):12.3f}"
          f"{np.mean([r.downbeat_f_base for r in results]):12.3f}   every 4th librosa beat")
    te = np.array([r.tempo_err for r in results])
    tb = np.array([r.tempo_err_base for r in results])
    print(f"{'tempo-map error % mean / p90':<34}{te.mean():6.2f}/{np.percentile(te, 90):5.2f}"
          f"{tb.mean():6.2f}/{np.percentile(tb, 90):5.2f}")
    print(f"play-along (conform_to_beats onto bars {REGION[0]}-{REGION[0] + REGION[1] - 1}): "
          f"{len(errs)} stem beats vs the true song beats: median {figures['conform_median_ms']:.1f} ms, "
          f"p95 {np.percentile(errs, 95):.1f} ms, worst {figures['conform_worst_ms']:.1f} ms; "
          f"{sum(r.conform_on_downbeat for r in results)}/{len(results)} stems start on a true downbeat")
    by_cat: dict[str, list[bool]] = {}
    for r in results:
        by_cat.setdefault(r.category, []).append(r.key_ok)
    print("key exact by category: " + ", ".join(f"{c} {pct(v):.0f}% ({len(v)})" for c, v in sorted(by_cat.items())))
    wrong = [f"{r.name}: {r.key_found}" for r in results if not r.key_ok]
    if wrong:
        print("wrong keys: " + "; ".join(wrong))
    secs = np.array([r.seconds for r in results])
    an = np.array([r.analyse_s for r in results])
    print(f"analyse_song: {an.mean():.2f} s mean per song ({secs.mean():.0f} s of audio, "
          f"{secs.mean() / an.mean():.0f}x real time on one core); bench wall time "
          f"{time.perf_counter() - started:.0f} s")
    failed = []
    for name, target in TARGETS.items():
        value = figures[name]
        ok = value <= target if name.startswith("conform") else value >= target
        if not ok:
            failed.append(name)
        shown = f"{value:.1f} ms" if name.startswith("conform") else (
            f"{100 * value:.1f} %" if name in ("key", "key_cadence", "chords") else f"{value:.3f}")
        bound = f"{target:g} ms" if name.startswith("conform") else (
            f"{100 * target:.0f} %" if name in ("key", "key_cadence", "chords") else f"{target:g}")
        print(f"target {name} {'<=' if name.startswith('conform') else '>='} {bound}: "
              f"{'PASS' if ok else 'MISS'} ({shown})")
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
