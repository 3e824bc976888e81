"""Synthetic songs with ground truth per beat and bar, for ``make bench-song``.

A song is a progression (8 bars, played twice; a bar may hold two half-bar chords) in a random
key, played on a drifting tempo map by a chord instrument and a bass line, with or without drums,
after a silence and a pickup. Built on the tones of ``bench.key.synth``:

- chord instruments: ``pad`` (organ-like, held for the whole chord), ``strum`` (plucked chord on
  every beat), ``arp`` (plucked chord tones on eighth notes, up and down);
- bass lines: ``roots`` (root on 1 and 3, fifth on 2 and 4), ``syncopated`` (root on 1, the "and"
  of 2 and of 3, fifth on 4: notes tied across the beat), ``walking`` (quarter notes walking to
  the next root);
- drums: kick on 1 and 3 (and the "and" of 3), snare on 2 and 4, closed hi-hat on eighths,
  synthesised (sine sweep, filtered noise);
- tempo: 80-140 BPM ramping linearly by up to +-3 % over the song, with a slow wobble;
- start: 0.2-2 s of silence, then 0-2 pickup beats of bass notes walking up to bar 1's root.

Progressions are written in C major / A minor and transposed. Categories: ``plain`` (tonic first),
``cadence`` (the tonic chord heard only where a cadence resolves to it), ``relative`` (the chords
of the relative key, told apart only by cadences), ``borrowed`` (bVII, bVI, iv in major; IV in
minor), ``secondary`` (secondary dominants such as E7 -> Am in C major).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.key.synth import _envelope, _tone, _voice
from stems.plan import PITCH_CLASSES, Key, parse_chord

SAMPLE_RATE = 32000
BEATS_PER_BAR = 4
CHORD_INSTRUMENTS = ("pad", "strum", "arp")
BASS_LINES = ("roots", "syncopated", "walking")

# (category, mode, 8 bars in C major / A minor; "F|G" is two half-bar chords)
PROGRESSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("plain", "major", ("C", "Am", "F", "G", "C", "Am", "F|G", "C")),
    ("plain", "major", ("C", "F", "G", "C", "F", "C", "G7", "C")),
    ("plain", "major", ("C", "G", "Am", "F", "C", "G", "F", "C")),
    ("cadence", "major", ("Dm", "G", "Em", "Am", "F", "G", "C", "C")),
    ("cadence", "major", ("F", "G", "Em", "Am", "Dm", "G7", "C", "C")),
    ("relative", "major", ("Am", "F", "Dm", "G", "Am", "F", "G", "C")),
    ("relative", "major", ("Am", "Em", "F", "G", "Am", "Dm", "G7", "C")),
    ("borrowed", "major", ("C", "Bb", "F", "C", "C", "Ab", "Bb", "C")),
    ("borrowed", "major", ("C", "F", "Fm", "C", "Am", "Dm", "G7", "C")),
    ("secondary", "major", ("C", "E7", "Am", "F", "D7", "G", "G7", "C")),
    ("secondary", "major", ("C", "A7", "Dm", "G", "C", "C7", "F", "G|C")),
    ("plain", "minor", ("Am", "F", "C", "G", "Am", "F", "C", "G")),
    ("plain", "minor", ("Am", "Dm", "E", "Am", "Am", "Dm", "E7", "Am")),
    ("plain", "minor", ("Am", "G", "F", "E", "Am", "G", "F", "E")),
    ("cadence", "minor", ("F", "Dm", "E", "Am", "F", "G", "E7", "Am")),
    ("cadence", "minor", ("Dm", "G", "C", "F", "Dm", "E", "Am", "Am")),
    ("relative", "minor", ("C", "F", "Dm", "E", "C", "G", "E7", "Am")),
    ("relative", "minor", ("C", "G", "F", "E", "Dm", "F", "E", "Am")),
    ("borrowed", "minor", ("Am", "D", "F", "E", "Am", "D", "E", "Am")),
    ("secondary", "minor", ("Am", "A7", "Dm", "G", "C", "F", "E7", "Am")),
)


@dataclass(frozen=True)
class Song:
    name: str
    key: Key
    category: str
    drums: bool
    instrument: str
    bass_line: str
    audio: np.ndarray              # float32 [1, samples] at SAMPLE_RATE
    beats: np.ndarray              # true beat times (s), pickup beats included
    downbeats: np.ndarray          # true bar starts (s); bar n at downbeats[n - 1]
    half_bar_chords: tuple[tuple[str, str], ...]   # per bar, stems.plan chord names
    bpm: float                     # mean tempo
    drift: float                   # tempo change over the song, fraction
    lead_seconds: float            # silence before the first sound

    def chord_intervals(self) -> tuple[np.ndarray, list[str]]:
        """[n, 2] half-bar intervals (s) and their chord names, for mir_eval."""
        ext = np.concatenate((self.downbeats, [self.beats[-1]]))
        intervals, labels = [], []
        for b, (first, second) in enumerate(self.half_bar_chords):
            start, end = ext[b], ext[b + 1]
            mid = self.beats[np.searchsorted(self.beats, start) + BEATS_PER_BAR // 2]
            intervals += [(start, mid), (mid, end)]
            labels += [first, second]
        return np.asarray(intervals), labels


def _transpose(name: str, semitones: int) -> str:
    chord = parse_chord(name)
    suffix = chord.name[len(PITCH_CLASSES[chord.root]):]
    return parse_chord(PITCH_CLASSES[(chord.root + semitones) % 12] + suffix).name


def _tempo_map(rng: np.random.Generator, bpm: float, drift: float, n_beats: int, start: float) -> np.ndarray:
    """Beat times from ``start``: a linear ramp by ``drift`` plus a slow +-0.5 % wobble."""
    u = np.arange(n_beats) / max(1, n_beats - 1)
    wobble = 0.005 * np.sin(2 * np.pi * (u * rng.uniform(0.5, 1.5) + rng.uniform()))
    periods = 60.0 / (bpm * (1.0 + drift * u + wobble))
    return start + np.concatenate(([0.0], np.cumsum(periods[:-1])))


def _kick(sr: int) -> np.ndarray:
    t = np.arange(int(0.25 * sr)) / sr
    f = 50.0 + 70.0 * np.exp(-t / 0.03)
    return np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t / 0.09)


def _noise_hit(sr: int, rng: np.random.Generator, seconds: float, decay: float, highpass: bool) -> np.ndarray:
    n = int(seconds * sr)
    x = rng.standard_normal(n)
    if highpass:
        x = np.diff(np.diff(x, prepend=0.0), prepend=0.0)
    t = np.arange(n) / sr
    return x / np.max(np.abs(x)) * np.exp(-t / decay)


def _add(out: np.ndarray, x: np.ndarray, at: int) -> None:
    if at >= len(out):
        return
    m = min(len(x), len(out) - at)
    out[at:at + m] += x[:m]


def build_song(index: int, seed: int) -> Song:
    """One reproducible song; ``index`` picks the progression (cycling) and varies the rest."""
    rng = np.random.default_rng([seed, index, 21])
    category, mode, bars_c = PROGRESSIONS[index % len(PROGRESSIONS)]
    tonic = int(rng.integers(12))
    shift = tonic if mode == "major" else (tonic - 9) % 12
    key = Key(tonic, mode)
    bars = [tuple(_transpose(c, shift) for c in bar.split("|")) for bar in bars_c] * 2
    half = tuple((b[0], b[-1]) for b in bars)
    drums = bool(index % 2 == 0) if rng.uniform() < 0.8 else bool(rng.integers(2))
    instrument = CHORD_INSTRUMENTS[int(rng.integers(len(CHORD_INSTRUMENTS)))]
    bass_line = BASS_LINES[int(rng.integers(len(BASS_LINES)))]
    bpm = float(rng.uniform(80.0, 140.0))
    drift = float(rng.uniform(-0.03, 0.03))
    lead = float(rng.uniform(0.2, 2.0))
    pickup = int(rng.integers(0, 3))
    detune = float(rng.uniform(-15.0, 15.0))
    sr = SAMPLE_RATE
    n_beats = pickup + len(bars) * BEATS_PER_BAR + 1          # the last is the end of the last bar
    times = _tempo_map(rng, bpm, drift, n_beats, lead)
    beats = times[:-1]
    downbeats = times[pickup:-1:BEATS_PER_BAR]
    total = int((times[-1] + 1.0) * sr)
    chords_out = np.zeros(total)
    bass_out = np.zeros(total)
    drum_out = np.zeros(total)

    def span(a: float, b: float) -> tuple[int, int]:
        return int(round(a * sr)), int(round(b * sr))

    # chord instrument, per half bar
    previous = None
    scale = key.pitch_classes()
    for b in range(len(bars)):
        for h, name in enumerate(half[b]):
            chord = parse_chord(name)
            i0 = pickup + b * BEATS_PER_BAR + h * 2
            t0, t1 = times[i0], times[i0 + 2]
            if instrument == "pad":
                if h == 1 and half[b][0] == half[b][1]:
                    continue
                end = times[i0 + 4] if h == 0 and half[b][0] == half[b][1] else t1
                voicing = _voice(chord.pitch_classes[:4], previous, 55, 74)
                previous = voicing
                s0, s1 = span(t0, end)
                chords_out[s0:s1] += 0.8 * _tone(voicing, s1 - s0, sr, detune, partials=6, tilt=0.8,
                                                 decay=None) * _envelope(s1 - s0, sr, 0.02, 0.03)
            elif instrument == "strum":
                low = 40 + (chord.root - 40) % 12
                upper = _voice(chord.pitch_classes, previous, low + 7, low + 24)
                previous = upper
                notes = [low] + upper
                for k in range(2):
                    s0, s1 = span(times[i0 + k], times[i0 + k + 1])
                    for j, note in enumerate(notes if k == 0 else notes[::-1]):
                        d = int(0.010 * sr * j)
                        m = s1 - s0 - d
                        if m > 0:
                            _add(chords_out, (1.0 if k == 0 else 0.7) * _tone(
                                [note], m, sr, detune, partials=20, tilt=1.0, decay=0.6, harmonic_decay=0.6)
                                * _envelope(m, sr, 0.002, 0.01), s0 + d)
            else:  # arp: eighth notes up and down the chord
                tones = _voice(chord.pitch_classes[:3], previous, 57, 76)
                previous = tones
                seq = tones + [tones[0] + 12] + tones[::-1][:-1] + [tones[0]]
                for e in range(4):
                    beat = i0 + e // 2
                    a = times[beat] + (e % 2) * 0.5 * (times[beat + 1] - times[beat])
                    bnd = times[beat] + ((e % 2) + 1) * 0.5 * (times[beat + 1] - times[beat])
                    s0, s1 = span(a, bnd + 0.15)
                    _add(chords_out, 0.8 * _tone([seq[(h * 4 + e) % len(seq)]], s1 - s0, sr, detune, partials=16,
                                                 tilt=1.2, decay=0.35, harmonic_decay=1.0)
                         * _envelope(s1 - s0, sr, 0.002, 0.02), s0)

    # bass line: (beat offset within the bar, scale-step choice) per note
    def bass_note(pc: int) -> int:
        return 28 + (pc - 28) % 12

    def play_bass(midi: int, a: float, b: float, gain: float = 1.0) -> None:
        s0, s1 = span(a, b)
        if s1 > s0:
            _add(bass_out, gain * _tone([midi], s1 - s0, sr, detune, partials=4, tilt=1.5, decay=0.9,
                                        harmonic_decay=2.0) * _envelope(s1 - s0, sr, 0.004, 0.02), s0)

    def at(beat_pos: float) -> float:
        """Time (s) of a fractional beat position counted from the first beat."""
        i = min(int(np.floor(beat_pos)), len(times) - 2)
        return float(times[i] + (beat_pos - i) * (times[i + 1] - times[i]))

    for b in range(len(bars)):
        base = pickup + b * BEATS_PER_BAR
        roots = [parse_chord(half[b][0]).root, parse_chord(half[b][1]).root]
        nxt = parse_chord(half[(b + 1) % len(bars)][0]).root
        if bass_line == "roots":
            pattern = [(0, 0, 0), (1, 0, 7), (2, 1, 0), (3, 1, 7)]
            for k, h, interval in pattern:
                play_bass(bass_note(roots[h]) + interval, at(base + k), at(base + k + 1))
        elif bass_line == "syncopated":
            pattern = [(0.0, 1.5, 0, 0), (1.5, 2.5, 1, 0), (2.5, 3.0, 1, 0), (3.0, 4.0, 1, 7)]
            for a, e, h, interval in pattern:
                play_bass(bass_note(roots[h]) + interval, at(base + a), at(base + e))
        else:  # walking
            r = bass_note(roots[1])
            target = bass_note(nxt)
            step = 1 if target >= r else -1
            walk = [m for m in range(target - step, r, -step) if m % 12 in scale] or [r + 7]
            line = [bass_note(roots[0]), bass_note(roots[0]) + 7, r, walk[0]]
            for k, note in enumerate(line):
                play_bass(note, at(base + k), at(base + k + 1), 1.0 if k % 2 == 0 else 0.8)
    # pickup: bass notes walking up to bar 1's root
    first_root = bass_note(parse_chord(half[0][0]).root)
    for k in range(pickup):
        play_bass(first_root - 2 * (pickup - k), times[k], times[k + 1], 0.8)

    if drums:
        kick, snare = _kick(sr), _noise_hit(sr, rng, 0.2, 0.06, False) * 0.6
        hat = _noise_hit(sr, rng, 0.05, 0.012, True) * 0.25
        for b in range(len(bars)):
            base = pickup + b * BEATS_PER_BAR
            for k in (0, 2):
                _add(drum_out, kick, int(round(at(base + k) * sr)))
            if b % 2 == 1:
                _add(drum_out, 0.7 * kick, int(round(at(base + 2.5) * sr)))
            for k in (1, 3):
                _add(drum_out, snare, int(round(at(base + k) * sr)))
            for e in range(8):
                _add(drum_out, hat * (1.0 if e % 2 == 0 else 0.6), int(round(at(base + e / 2) * sr)))

    def level(x: np.ndarray) -> np.ndarray:
        rms = float(np.sqrt(np.mean(x ** 2)))
        return x / rms if rms > 0 else x

    mix = level(chords_out) + 0.9 * level(bass_out) + (0.8 * level(drum_out) if drums else 0.0)
    rms = float(np.sqrt(np.mean(mix ** 2)))
    mix += rng.standard_normal(total) * rms * 10 ** (-50 / 20)
    mix *= 0.5 / float(np.max(np.abs(mix)))
    name = f"{index:02d}-{key.name.replace(' ', '')}-{category}-{instrument}-{bass_line}{'-drums' if drums else ''}"
    return Song(name=name, key=key, category=category, drums=drums, instrument=instrument,
                bass_line=bass_line, audio=mix.astype(np.float32)[None, :], beats=beats,
                downbeats=downbeats, half_bar_chords=half, bpm=float(60.0 * (n_beats - 1) / (times[-1] - times[0])),
                drift=drift, lead_seconds=lead)
