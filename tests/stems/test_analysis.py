"""stems.analysis on synthetic chords written here (not stems.plan.render_chords): key estimation in
several keys and two timbres, key relations, chord fit, the per-stem and per-job blocks."""

import json

import numpy as np
import pytest

from stems.analysis import (
    AnalysisError,
    ChordFit,
    KeyEstimate,
    SilentAudioError,
    chord_fit,
    chromagram,
    coherence,
    estimate_key,
    key_agreement,
    key_from_chroma,
    stem_analysis,
)
from stems.plan import PITCH_CLASSES, Key, MusicalPlan, parse_chord, parse_key

SR = 32000
BPM = 120.0
BAR = 4 * 60.0 / BPM


def synth(chords: list[str], timbre: str, *, bars: int | None = None, seed: int = 0) -> np.ndarray:
    """float32 [1, samples]: one chord per bar at 120 BPM.

    "sine": pure sines, chord tones in octave 4 plus the root in octave 3, held for the bar.
    "saw": 12 harmonics at 1/n, chord tones in octave 3 plus the root in octave 2, struck on every
    beat with a 0.3 s decay (a rough plucked/strummed instrument).
    """
    rng = np.random.default_rng(seed)
    bars = bars or len(chords)
    n_bar = int(BAR * SR)
    t = np.arange(n_bar) / SR
    out = []
    for b in range(bars):
        chord = parse_chord(chords[b % len(chords)])
        octave = 4 if timbre == "sine" else 3
        midis = [12 * (octave + 1) + pc for pc in chord.pitch_classes] + [12 * octave + chord.root]
        bar = np.zeros(n_bar)
        for m in midis:
            f0 = 440.0 * 2 ** ((m - 69) / 12)
            if timbre == "sine":
                bar += np.sin(2 * np.pi * f0 * t)
            else:
                k = np.arange(1, 13)[:, None]
                bar += (np.sin(2 * np.pi * f0 * k * t) / k).sum(axis=0)
        if timbre == "saw":
            bar *= np.tile(np.exp(-np.arange(n_bar // 4) / SR / 0.3), 4)   # n_bar is a multiple of 4
        out.append(bar)
    x = np.concatenate(out)
    x += 1e-3 * rng.standard_normal(len(x))
    return (0.5 * x / np.max(np.abs(x))).astype(np.float32)[None, :]


def plan_of(key: str, chords: list[str], bars: int | None = None) -> MusicalPlan:
    bars = bars or len(chords)
    names = tuple(parse_chord(c).name for c in chords)
    return MusicalPlan(key=parse_key(key), progression=names,
                       chords=tuple(names[i % len(names)] for i in range(bars)), bpm=BPM, bars=bars)


# Tonic-first progressions written out by hand (I-IV-V-I, i-iv-v-i, i-VI-VII-i ...).
CASES = [
    ("C major", ["C", "F", "G", "C"]),
    ("A minor", ["Am", "Dm", "Em", "Am"]),
    ("F# major", ["F#", "B", "C#", "F#"]),
    ("D# minor", ["D#m", "B", "C#", "D#m"]),
    ("G major", ["G", "Em", "C", "D"]),
    ("B minor", ["Bm", "G", "A", "Bm"]),
    ("Ab major", ["Ab", "Db", "Eb", "Ab"]),
    ("F minor", ["Fm", "Bbm", "Cm", "Fm"]),
]


@pytest.mark.parametrize("timbre", ["sine", "saw"])
@pytest.mark.parametrize("key, chords", CASES)
def test_estimate_key(key, chords, timbre):
    est = estimate_key(synth(chords, timbre), SR)
    assert isinstance(est, KeyEstimate)
    assert est.key == parse_key(key), est
    assert 0.0 < est.confidence <= 1.0
    assert 0.5 < est.correlation <= 1.0


def test_key_estimate_to_dict():
    d = estimate_key(synth(["Am", "Dm", "Em", "Am"], "sine"), SR).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert (d["key"], d["tonic"], d["mode"]) == ("A minor", "A", "minor")
    assert 0 <= d["confidence"] <= 1 and -1 <= d["correlation"] <= 1


def test_mono_stereo_and_1d_agree():
    x = synth(["G", "C", "D", "G"], "saw")
    mono = estimate_key(x, SR)
    assert estimate_key(np.vstack([x, x]), SR).key == mono.key
    assert estimate_key(x[0], SR).key == mono.key
    assert estimate_key(np.vstack([x, 0.5 * x]), SR).key == mono.key


def test_opening_decides_between_rotations_of_one_loop():
    """Am F C G and C G Am F hold the same notes; the summed chroma alone cannot tell them apart."""
    minor_first = chromagram(synth(["Am", "F", "C", "G"], "saw"), SR)
    major_first = chromagram(synth(["C", "G", "Am", "F"], "saw"), SR)
    assert key_from_chroma(minor_first).key == parse_key("A minor")
    assert key_from_chroma(major_first).key == parse_key("C major")
    plain = {key_from_chroma(c, opening_share=0.0).key for c in (minor_first, major_first)}
    assert len(plain) == 1


def test_chromagram_shape_and_pitch():
    t = np.arange(3 * SR) / SR
    a4 = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[None, :]
    for method in ("stft", "cqt"):
        chroma = chromagram(a4, SR, method=method)
        assert chroma.shape[0] == 12 and abs(chroma.shape[1] - 3 * 11025 / 1024) <= 2
        assert int(np.argmax(chroma.sum(axis=1))) == PITCH_CLASSES.index("A")
    with pytest.raises(AnalysisError):
        chromagram(a4, SR, method="wavelet")


def test_short_audio_is_fine():
    est = estimate_key(synth(["C"], "sine")[:, : SR // 2], SR)
    assert est.key.tonic == PITCH_CLASSES.index("C")


@pytest.mark.parametrize("audio", [np.zeros((1, SR * 2), np.float32), np.full((2, SR), 1e-6, np.float32)])
def test_silence_raises_typed_error(audio):
    with pytest.raises(SilentAudioError):
        estimate_key(audio, SR)
    assert issubclass(SilentAudioError, AnalysisError)


@pytest.mark.parametrize("audio, sr", [
    (np.array([[np.nan] * 1000], np.float32), SR),
    (np.zeros((1, 2, 100), np.float32), SR),
    (np.zeros((1, 0), np.float32), SR),
    (np.ones((1, 1000), np.float32), 0),
    (np.ones((1, 1000), np.float32), 44100.5),
])
def test_bad_input(audio, sr):
    with pytest.raises(AnalysisError):
        estimate_key(audio, sr)


@pytest.mark.parametrize("a, b, relation", [
    ("C major", "C major", "same"),
    ("A minor", "C major", "relative"),
    ("C major", "A minor", "relative"),
    ("G major", "C major", "dominant"),
    ("F major", "C major", "subdominant"),
    ("E minor", "A minor", "dominant"),
    ("D minor", "A minor", "subdominant"),
    ("C minor", "C major", "parallel"),
    ("F# major", "C major", "different"),
    ("E minor", "C major", "different"),
    ("Db major", "C# major", "same"),
])
def test_key_agreement(a, b, relation):
    assert key_agreement(parse_key(a), parse_key(b)) == relation


# ------------------------------------------------------------------------------------ chord fit

PROG = ["Am", "F", "C", "G"]


@pytest.mark.parametrize("timbre", ["sine", "saw"])
def test_chord_fit_prefers_the_played_chords(timbre):
    audio = synth(PROG, timbre, bars=4)
    right = chord_fit(audio, SR, plan_of("A minor", PROG))
    tritone = chord_fit(audio, SR, plan_of("D# minor", ["D#m", "B", "F#", "C#"]))
    rotated = chord_fit(audio, SR, plan_of("A minor", PROG[1:] + PROG[:1]))   # one bar late
    assert isinstance(right, ChordFit) and len(right.per_bar) == 4
    assert right.mean > 0.5
    assert all(r > w for r, w in zip(right.per_bar, tritone.per_bar))
    assert all(r > w for r, w in zip(right.per_bar, rotated.per_bar))
    assert right.mean == pytest.approx(np.mean(right.per_bar))


def test_chord_fit_bars_past_the_audio_and_silent_bars():
    audio = synth(PROG, "sine", bars=4)
    short = audio[:, : int(2.5 * BAR * SR)]
    fit = chord_fit(short, SR, plan_of("A minor", PROG, bars=4))
    assert len(fit.per_bar) == 2
    gap = audio.copy()
    gap[:, int(BAR * SR): int(2 * BAR * SR)] = 0.0
    fit = chord_fit(gap, SR, plan_of("A minor", PROG, bars=4))
    assert fit.per_bar[1] == 0.0 and fit.per_bar[0] > 0.5 and fit.per_bar[2] > 0.5
    silent = chord_fit(np.zeros((1, 4 * int(BAR * SR)), np.float32), SR, plan_of("A minor", PROG))
    assert silent.per_bar == (0.0, 0.0, 0.0, 0.0) and silent.mean == 0.0
    d = fit.to_dict()
    assert json.loads(json.dumps(d)) == d and d["bars"] == 4


def test_chord_fit_offset():
    audio = synth(PROG, "saw", bars=4)
    lead = np.concatenate([np.zeros((1, SR), np.float32), audio], axis=1)
    plan = plan_of("A minor", PROG)
    aligned = chord_fit(lead, SR, plan, offset_seconds=1.0)
    misaligned = chord_fit(lead, SR, plan)
    assert aligned.mean > misaligned.mean
    assert aligned.mean == pytest.approx(chord_fit(audio, SR, plan).mean, abs=0.05)
    with pytest.raises(AnalysisError):
        chord_fit(audio, SR, plan, offset_seconds=-1.0)


# --------------------------------------------------------------------------- stem and job blocks

def test_stem_analysis_and_coherence():
    plan = plan_of("A minor", PROG, bars=4)
    guitar = stem_analysis(synth(PROG, "saw", bars=4), SR, plan, harmonic=True)
    relative_bass = stem_analysis(synth(["C", "G", "Am", "F"], "sine"), SR, plan, harmonic=True)
    silent = stem_analysis(np.zeros((1, 4 * int(BAR * SR)), np.float32), SR, plan, harmonic=True)
    drums = stem_analysis(np.random.default_rng(0).standard_normal((1, SR)).astype(np.float32), SR, plan,
                          harmonic=False)
    for block in (guitar, relative_bass, silent, drums):
        assert json.loads(json.dumps(block)) == block
    assert guitar["key"]["key"] == "A minor" and guitar["key_vs_plan"] == "same"
    assert guitar["chord_fit"]["mean"] > 0.5 and guitar["silent"] is False
    assert relative_bass["key_vs_plan"] == "relative"
    assert silent["key"] is None and silent["silent"] is True and silent["key_vs_plan"] is None
    assert drums == {"harmonic": False}
    assert "key_vs_plan" not in stem_analysis(synth(PROG, "saw"), SR, None, harmonic=True)

    block = coherence({"guitar": guitar, "bass": relative_bass, "drums": drums}, plan,
                      source_key=parse_key("C major"))
    assert json.loads(json.dumps(block)) == block
    assert block["plan_key"] == "A minor" and block["source_key"] == "C major"
    assert block["harmonic_stems"] == 2 and block["harmonic_stems_in_plan_key"] == 1
    assert block["stems"]["guitar"]["agreement"] == "same"
    assert block["stems"]["bass"]["agreement"] == "relative"
    assert block["stems"]["guitar"]["agreement_vs_source"] == "relative"
    assert block["stems"]["bass"]["agreement_vs_source"] == "same"
    assert block["stems"]["drums"] == {"harmonic": False}
    assert block["mean_chord_fit"] == pytest.approx(
        (guitar["chord_fit"]["mean"] + relative_bass["chord_fit"]["mean"]) / 2, abs=1e-3)

    with_silent = coherence({"guitar": guitar, "bass": silent}, plan)
    assert with_silent["harmonic_stems"] == 2 and with_silent["harmonic_stems_in_plan_key"] == 1
    assert with_silent["stems"]["bass"]["key"] is None and "source_key" not in with_silent
    assert coherence({}, plan)["mean_chord_fit"] is None


def test_key_object_round_trip_through_stem_block():
    """coherence rebuilds keys from the stem dicts' tonic/mode; every tonic must survive."""
    for tonic in range(12):
        key = Key(tonic, "major")
        est = KeyEstimate(key=key, confidence=0.5, correlation=0.8).to_dict()
        block = coherence({"guitar": {"harmonic": True, "key": est, "chord_fit": None}},
                          MusicalPlan(key=key, progression=("C",), chords=("C",), bpm=100, bars=1))
        assert block["stems"]["guitar"]["agreement"] == "same"
