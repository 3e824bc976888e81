"""Synthetic clips for the key bench: a progression from stems.plan's tables played by one timbre.

Timbres (independent of ``stems.plan.render_chords``, which the unit tests already cover):

- ``organ``: additive drawbar-like tone (partials 1-6, amplitude 1/n^0.8), chord held for the
  whole bar in close position with voice leading (each chord the inversion nearest the last),
  root doubled an octave or two below;
- ``pluck``: band-limited sawtooth (all harmonics, 1/n, higher ones dying faster: a crude plucked
  string) strummed on every beat, guitar-like open voicing from the bass string up, 12 ms between
  strings;
- ``bass``: a bass line alone in E1-E3: root on beat 1, fifth on beat 3, scale tones walking to the
  next root on beats 2 and 4; sine + 2nd/3rd harmonics with a plucked decay. Key from a bass line
  is harder (few notes at a time, roots dominate), so it is reported apart.

Each clip gets a random global detune of up to +-15 cents (MusicGen is rarely at A440) and white
noise 45 dB below the signal's RMS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stems.plan import PITCH_CLASSES, STYLE_PROGRESSIONS, Key, MusicalPlan, parse_chord, progression_in_key

TIMBRES = ("organ", "pluck", "bass")
SAMPLE_RATE = 32000


@dataclass(frozen=True)
class Clip:
    name: str
    key: Key
    timbre: str
    style: str
    numerals: str
    plan: MusicalPlan            # the progression that was played, one chord per bar
    audio: np.ndarray            # float32 [1, samples] at SAMPLE_RATE
    detune_cents: float


def _hz(midi: np.ndarray | float, detune_cents: float) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0 + detune_cents / 100.0) / 12.0)


_CACHE: dict[tuple, np.ndarray] = {}


def _tone(midis: list[float], n: int, sr: int, detune: float, *, partials: int, tilt: float,
          decay: float | None, harmonic_decay: float = 0.0) -> np.ndarray:
    """Sum of notes, each a harmonic series below Nyquist; ``decay`` (s) None = sustained.
    Decaying notes restart at every strum, so their waveforms are cached (synthesis dominated
    the bench's run time)."""
    if decay is not None:
        key = (tuple(midis), n, sr, detune, partials, tilt, decay, harmonic_decay)
        if key not in _CACHE:
            if len(_CACHE) > 512:
                _CACHE.clear()
            _CACHE[key] = _tone_uncached(midis, n, sr, detune, partials=partials, tilt=tilt,
                                         decay=decay, harmonic_decay=harmonic_decay)
        return _CACHE[key]
    return _tone_uncached(midis, n, sr, detune, partials=partials, tilt=tilt, decay=None)


def _tone_uncached(midis: list[float], n: int, sr: int, detune: float, *, partials: int, tilt: float,
                   decay: float | None, harmonic_decay: float = 0.0) -> np.ndarray:
    t = np.arange(n) / sr
    out = np.zeros(n)
    for f0 in _hz(np.asarray(midis), detune):
        k = np.arange(1, partials + 1)
        k = k[k * f0 < 0.45 * sr]
        amps = 1.0 / k ** tilt
        phase = 2 * np.pi * f0 * np.outer(k, t)
        if decay is None:
            out += (amps[:, None] * np.sin(phase)).sum(axis=0)
        else:
            env = np.exp(-np.outer(1.0 / decay + harmonic_decay * (k - 1), t))
            out += (amps[:, None] * env * np.sin(phase)).sum(axis=0)
    return out


def _voice(pcs: tuple[int, ...], previous: list[int] | None, low: int, high: int) -> list[int]:
    """Close-position voicing of pitch classes in [low, high), nearest to ``previous``."""
    candidates = []
    for inversion in range(len(pcs)):
        order = pcs[inversion:] + pcs[:inversion]
        for base in range(low, high):
            if base % 12 != order[0]:
                continue
            notes, last = [base], base
            for pc in order[1:]:
                nxt = last + ((pc - last) % 12 or 12)
                notes.append(nxt)
                last = nxt
            if notes[-1] < high:
                candidates.append(notes)
    if previous is None:
        mid = (low + high) / 2
        return min(candidates, key=lambda v: (abs(np.mean(v) - mid), v))
    return min(candidates, key=lambda v: (sum(min(abs(a - b) for b in previous) for a in v), v))


def _envelope(n: int, sr: int, attack: float = 0.01, release: float = 0.02) -> np.ndarray:
    i = np.arange(n)
    return np.minimum(1.0, np.minimum(i / (attack * sr), (n - i) / (release * sr)))


def render(plan: MusicalPlan, timbre: str, *, sr: int = SAMPLE_RATE, detune: float = 0.0,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """float32 [1, samples]: ``plan.chords`` played by ``timbre``, one chord per bar."""
    rng = rng or np.random.default_rng(0)
    bar = plan.bar_seconds()
    beat = bar / plan.beats_per_bar
    total = int(round(plan.bars * bar * sr))
    out = np.zeros(total)
    chords = plan.chord_objects()
    scale = plan.key.pitch_classes()
    previous = None
    for b, chord in enumerate(chords):
        s0, s1 = int(round(b * bar * sr)), int(round((b + 1) * bar * sr))
        n = s1 - s0
        if timbre == "organ":
            voicing = _voice(chord.pitch_classes[:4], previous, 55, 74)   # G3..C#5
            previous = voicing
            bass = 36 + (chord.root - 36) % 12                            # C2..B2
            seg = _tone(voicing + [bass + 12], n, sr, detune, partials=6, tilt=0.8, decay=None)
            out[s0:s1] += seg * _envelope(n, sr)
        elif timbre == "pluck":
            bass = 40 + (chord.root - 40) % 12                            # E2..D#3
            upper = _voice(chord.pitch_classes, previous, bass + 7, bass + 24)
            previous = upper
            notes = [bass] + upper
            for k in range(plan.beats_per_bar):
                b0 = s0 + int(round(k * beat * sr))
                b1 = s0 + int(round((k + 1) * beat * sr)) if k + 1 < plan.beats_per_bar else s1
                gain = 1.0 if k % 2 == 0 else 0.7
                for j, note in enumerate(notes if k % 2 == 0 else notes[::-1]):
                    d = int(0.012 * sr * j)
                    m = b1 - b0 - d
                    if m <= 0:
                        continue
                    seg = _tone([note], m, sr, detune, partials=24, tilt=1.0, decay=0.6, harmonic_decay=0.6)
                    out[b0 + d:b1] += gain * seg * _envelope(m, sr, 0.002, 0.01)
        elif timbre == "bass":
            root = 28 + (chord.root - 28) % 12                            # E1..D#2
            nxt = chords[(b + 1) % len(chords)].root
            nxt_midi = root + ((nxt - root) % 12)
            if nxt_midi - root > 6:
                nxt_midi -= 12
            step = 1 if nxt_midi >= root else -1
            walk = [m for m in range(nxt_midi - step, root, -step) if m % 12 in scale] or [root + 7]
            line = [root, walk[-1] if len(walk) > 1 else root + 12, root + 7, walk[0]]
            for k, note in enumerate(line[: plan.beats_per_bar]):
                b0 = s0 + int(round(k * beat * sr))
                b1 = s0 + int(round((k + 1) * beat * sr)) if k + 1 < plan.beats_per_bar else s1
                seg = _tone([note], b1 - b0, sr, detune, partials=3, tilt=1.5, decay=0.8, harmonic_decay=2.0)
                out[b0:b1] += seg * _envelope(b1 - b0, sr, 0.004, 0.02)
        else:
            raise ValueError(f"unknown timbre {timbre!r}; expected one of {TIMBRES}")
    rms = float(np.sqrt(np.mean(out ** 2))) or 1.0
    out += rng.standard_normal(total) * rms * 10 ** (-45 / 20)
    out *= 0.5 / max(1e-9, float(np.max(np.abs(out))))
    return out.astype(np.float32)[None, :]


def build_clip(index: int, key: Key, timbre: str, styles: tuple[str, ...], seed: int) -> Clip:
    """One reproducible clip: a progression of one of ``styles`` for the key's mode, 90-140 BPM."""
    rng = np.random.default_rng([seed, index])
    style = styles[int(rng.integers(len(styles)))]
    table = STYLE_PROGRESSIONS[style][key.mode]
    numerals = table[int(rng.integers(len(table)))]
    progression = progression_in_key(numerals, key)
    bars = max(4, len(progression)) if len(progression) <= 4 else len(progression)
    bpm = float(rng.uniform(90.0, 140.0))
    plan = MusicalPlan(key=key, progression=progression,
                       chords=tuple(progression[i % len(progression)] for i in range(bars)),
                       bpm=bpm, bars=bars, source="bench")
    detune = float(rng.uniform(-15.0, 15.0))
    audio = render(plan, timbre, detune=detune, rng=rng)
    return Clip(name=f"{key.name.replace(' ', '-')}/{timbre}/{style}", key=key, timbre=timbre,
                style=style, numerals=numerals, plan=plan, audio=audio, detune_cents=detune)


def transposed(plan: MusicalPlan, semitones: int) -> MusicalPlan:
    """The same plan with every chord (and the key) moved by ``semitones`` (the "wrong progression")."""
    def move(name: str) -> str:
        chord = parse_chord(name)   # tables hold no slash chords: name = root + quality suffix
        suffix = chord.name[len(PITCH_CLASSES[chord.root]):]
        return parse_chord(PITCH_CLASSES[(chord.root + semitones) % 12] + suffix).name

    return MusicalPlan(key=Key((plan.key.tonic + semitones) % 12, plan.key.mode),
                       progression=tuple(move(c) for c in plan.progression),
                       chords=tuple(move(c) for c in plan.chords), bpm=plan.bpm, bars=plan.bars,
                       beats_per_bar=plan.beats_per_bar, source="bench-transposed")
