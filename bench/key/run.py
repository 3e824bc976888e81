"""Key bench runner: ``python -m bench.key [--repeats N] [--styles S,..] [--timbres T,..] [--strict]``.

Renders every one of the 24 keys in every timbre of ``bench.key.synth`` (organ, pluck, bass),
``--repeats`` times, each clip a progression from ``stems.plan.STYLE_PROGRESSIONS`` for the key's
mode (style drawn per clip), one chord per bar at 90-140 BPM, 4 bars (12-bar blues: 12, 8-bar: 8),
32 kHz, detuned by up to 15 cents, with a -45 dB noise floor. Then:

- ``stems.analysis.estimate_key`` on every clip: exact accuracy, and the errors split into relative
  / dominant or subdominant / parallel / other; confidence of right and wrong answers;
- the same with the chroma method (STFT, CQT) and the opening emphasis (on, off = plain
  Krumhansl-Schmuckler) varied, from one chromagram per clip and method: the measurement behind
  ``CHROMA_METHOD`` and ``OPENING_SHARE``;
- ``stems.analysis.chord_fit`` against the progression played and against it transposed by a
  tritone (a wrong progression);
- time per clip of estimate_key and chord_fit, and of ``stem_analysis`` on a 30 s stem.

The headline accuracy counts the chordal timbres (organ, pluck); the bass line alone (few notes at a
time, the root dominating) is reported apart. ``--strict`` exits 1 when the headline exact accuracy
is below 95 %.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

HEADLINE_TIMBRES = ("organ", "pluck")
STRICT_ACCURACY = 0.95
ERROR_CLASSES = ("relative", "dominant/subdominant", "parallel", "other")


@dataclass
class ClipResult:
    name: str
    timbre: str
    style: str
    agreement: str                        # estimate_key vs truth (key_agreement(estimate, truth))
    confidence: float
    variants: dict[str, str]              # "stft plain" -> agreement
    fit_right: float
    fit_wrong: float
    key_ms: float
    fit_ms: float
    seconds: float                        # clip length


def _klass(agreement: str) -> str:
    if agreement in ("dominant", "subdominant"):
        return "dominant/subdominant"
    if agreement == "different":
        return "other"
    return agreement


def _run_clip(index: int, key, timbre: str, styles: tuple[str, ...], seed: int) -> ClipResult:
    from bench.key.synth import SAMPLE_RATE, build_clip, transposed
    from stems.analysis import (OPENING_SHARE, chord_fit, chromagram, estimate_key, key_agreement,
                                key_from_chroma)

    clip = build_clip(index, key, timbre, styles, seed)
    t0 = time.perf_counter()
    estimate = estimate_key(clip.audio, SAMPLE_RATE)
    t1 = time.perf_counter()
    right = chord_fit(clip.audio, SAMPLE_RATE, clip.plan)
    t2 = time.perf_counter()
    wrong = chord_fit(clip.audio, SAMPLE_RATE, transposed(clip.plan, 6))
    variants = {}
    for method in ("stft", "cqt"):
        chroma = chromagram(clip.audio, SAMPLE_RATE, method=method)
        for label, share in (("plain KS", 0.0), ("KS + opening", OPENING_SHARE)):
            estimate = key_from_chroma(chroma, opening_share=share)
            variants[f"{method} {label}"] = key_agreement(estimate.key, key)
    return ClipResult(name=clip.name, timbre=timbre, style=clip.style,
                      agreement=key_agreement(estimate.key, key), confidence=estimate.confidence,
                      variants=variants, fit_right=right.mean, fit_wrong=wrong.mean,
                      key_ms=1e3 * (t1 - t0), fit_ms=1e3 * (t2 - t1),
                      seconds=clip.audio.shape[1] / SAMPLE_RATE)


def _stem_speed(repeats: int = 3) -> tuple[float, float]:
    """stem_analysis on a 30 s mono 32 kHz two-timbre stem: (first call s, best later call s)."""
    from bench.key.synth import render
    from stems.analysis import stem_analysis
    from stems.plan import make_plan

    plan = make_plan(bpm=120.0, bars=15, key="E minor", style="rock", seed=1)
    audio = render(plan, "pluck") + render(plan, "bass")
    t0 = time.perf_counter()
    stem_analysis(audio, 32000, plan, harmonic=True)
    cold = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        stem_analysis(audio, 32000, plan, harmonic=True)
        best = min(best, time.perf_counter() - t0)
    return cold, best


def _accuracy_line(label: str, agreements: list[str]) -> str:
    n = len(agreements)
    counts = Counter(_klass(a) for a in agreements)
    exact = counts.get("same", 0) / n if n else float("nan")
    parts = " ".join(f"{c} {100 * counts.get(c, 0) / n:4.1f}" for c in ERROR_CLASSES)
    return f"{label:<28} n={n:<4} exact {100 * exact:5.1f} %   errors %: {parts}"


def main(argv: list[str] | None = None) -> int:
    from stems.analysis import CHROMA_METHOD, OPENING_SECONDS, OPENING_SHARE
    from stems.plan import STYLE_PROGRESSIONS, Key

    from bench.key.synth import TIMBRES

    parser = argparse.ArgumentParser(prog="python -m bench.key", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--repeats", type=int, default=2, help="clips per key and timbre (default 2)")
    parser.add_argument("--timbres", default=",".join(TIMBRES),
                        help=f"comma-separated subset of {','.join(TIMBRES)} (default all)")
    parser.add_argument("--styles", default="all",
                        help="comma-separated progression tables of stems.plan.STYLE_PROGRESSIONS, or 'all'")
    parser.add_argument("--seed", type=int, default=0, help="synthesis seed (default 0)")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit 1 when exact key accuracy (organ, pluck) is below "
                             f"{100 * STRICT_ACCURACY:.0f} %%")
    args = parser.parse_args(argv)

    timbres = tuple(t.strip() for t in args.timbres.split(",") if t.strip())
    styles = tuple(STYLE_PROGRESSIONS) if args.styles == "all" else \
        tuple(s.strip() for s in args.styles.split(",") if s.strip())
    unknown = [t for t in timbres if t not in TIMBRES] + [s for s in styles if s not in STYLE_PROGRESSIONS]
    if unknown or not timbres or not styles or args.repeats < 1:
        parser.error(f"unknown or empty timbres/styles {unknown}, or --repeats < 1")

    started = time.perf_counter()
    cold_s, stem_s = _stem_speed()   # also warms librosa up, so per-clip times exclude its start-up
    keys = [Key(tonic, mode) for mode in ("major", "minor") for tonic in range(12)]
    results: list[ClipResult] = []
    index = 0
    for rep in range(args.repeats):
        for key in keys:
            for timbre in timbres:
                results.append(_run_clip(index, key, timbre, styles, args.seed))
                index += 1

    head = [r for r in results if r.timbre in HEADLINE_TIMBRES]
    print(f"key bench: {len(results)} clips = 24 keys x {len(timbres)} timbres x {args.repeats}; "
          f"styles {','.join(styles)}; seed {args.seed}; 32 kHz, 90-140 BPM, +-15 cents, -45 dB noise")
    print(f"estimate_key (chroma {CHROMA_METHOD}, opening share {OPENING_SHARE:g} "
          f"over {OPENING_SECONDS:g} s):")
    if head:
        print("  " + _accuracy_line("headline (organ+pluck)", [r.agreement for r in head]))
    for timbre in timbres:
        print("  " + _accuracy_line(f"{timbre}", [r.agreement for r in results if r.timbre == timbre]))
    ok = [r.confidence for r in head if r.agreement == "same"]
    bad = [r.confidence for r in head if r.agreement != "same"]
    conf = [r.confidence for r in head]
    if conf:
        print(f"  confidence (organ+pluck): mean {np.mean(conf):.2f}, median {np.median(conf):.2f}; "
              f"right answers median {np.median(ok) if ok else float('nan'):.2f}, "
              f"wrong answers median {np.median(bad) if bad else float('nan'):.2f}")
    by_style = defaultdict(list)
    for r in head:
        by_style[r.style].append(r.agreement == "same")
    print("  exact by style (organ+pluck): " +
          ", ".join(f"{s} {100 * np.mean(v):.0f}% ({len(v)})" for s, v in sorted(by_style.items())))

    print("variants (organ+pluck; same chromagram per clip and method):")
    for variant in head[0].variants if head else ():
        print("  " + _accuracy_line(variant, [r.variants[variant] for r in head]))

    right = np.array([r.fit_right for r in results])
    wrong = np.array([r.fit_wrong for r in results])
    print(f"chord_fit mean r: played progression {right.mean():.3f} (median {np.median(right):.3f}), "
          f"transposed by a tritone {wrong.mean():.3f} (median {np.median(wrong):.3f}); "
          f"played > tritone in {int(np.sum(right > wrong))}/{len(results)} clips")
    for timbre in timbres:
        sel = [r for r in results if r.timbre == timbre]
        print(f"  {timbre:<6} played {np.mean([r.fit_right for r in sel]):.3f}  "
              f"tritone {np.mean([r.fit_wrong for r in sel]):.3f}")
    key_ms = np.array([r.key_ms for r in results])
    fit_ms = np.array([r.fit_ms for r in results])
    seconds = np.array([r.seconds for r in results])
    print(f"time per clip ({seconds.min():.1f}-{seconds.max():.1f} s, mean {seconds.mean():.1f} s): "
          f"estimate_key mean {key_ms.mean():.1f} ms "
          f"(p90 {np.percentile(key_ms, 90):.1f}), chord_fit mean {fit_ms.mean():.1f} ms")
    print(f"stem_analysis on a 30 s mono 32 kHz stem: {1e3 * stem_s:.0f} ms "
          f"(first call in the process {cold_s:.1f} s: librosa start-up)")
    print(f"bench wall time {time.perf_counter() - started:.0f} s")

    exact = float(np.mean([r.agreement == "same" for r in head])) if head else 0.0
    passed = exact >= STRICT_ACCURACY
    print(f"target exact key accuracy (organ+pluck) >= {100 * STRICT_ACCURACY:.0f} %: "
          f"{'PASS' if passed else 'MISS'} ({100 * exact:.1f} %)")
    return 1 if args.strict and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
