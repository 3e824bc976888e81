"""Evaluation set with known beat times for the tempo conform bench.

Each clip is a 4/4 groove whose tempo drifts by 1-3 % across the clip (a linear ramp, a slow
wander or a smooth step, like MusicGen's wandering tempo), with a few ms of human timing jitter on
every note. Parts:

- drums: real multi-sampled kits (Debian ``hydrogen-drumkits``, see ``kits.py``) sequenced into
  grooves on an 8th-note grid (rock, four-on-the-floor, half-time, funk, ride);
- bass: additive sawtooth-like synth with a plucked envelope;
- strummed chords: Karplus-Strong strings (Karplus & Strong 1983), 6 strings staggered like a
  real down/up strum.

Drumless clips (``build_drumless_item``) hold sparse and syncopated tonal material only: bass
lines off the beat (notes on 1, the "and" of 2, the "and" of 3 and 4, and other syncopations, each
note held until the next), sustained pads (additive, 30 ms attack, a chord per bar) and arpeggios
with ties (Karplus-Strong, eighth-note positions with some held over).

Every note starts on an 8th-note position, so an 8th-note grid is the right yardstick for the
output. Clips start somewhere inside the bar before the first downbeat (a pickup), as generated
audio does.

Window-join clips (``build_join_item``) model a long stem that MusicGen generated window by window
(audiocraft's extension: a 30 s window, then windows that continue the last 12 s and add 18 s
each, so new material starts at 30, 48, 66, 84 and 102 s): at every join the groove jumps in
phase by 10-35 ms (early or late) and steps in tempo by 0.5-2 %, on top of the clip's drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from bench.tempo.kits import ACOUSTIC_KITS, ELECTRONIC_KITS, load_kit

BEATS_PER_BAR = 4
SLOTS_PER_BAR = 8  # 8th notes
# audiocraft's extension as stems.engine runs it with a 30 s model: min(18, window / 2) stride
WINDOW_SECONDS = 30.0
STRIDE_SECONDS = 18.0
#: lengths of the window-join clips, cycled (120 s: MAX_DURATION_SECONDS, 5 joins)
JOIN_CLIP_SECONDS = (66.0, 120.0, 84.0)

# 8 slots per bar: 1 & 2 & 3 & 4 &
_GROOVES = {
    "rock": dict(kick=[0, 5, 4], snare=[2, 6], hat=list(range(8))),
    "four-floor": dict(kick=[0, 2, 4, 6], snare=[2, 6], hat=[1, 3, 5, 7], open=[7]),
    "half-time": dict(kick=[0, 3], snare=[4], hat=list(range(8))),
    "funk": dict(kick=[0, 3, 6], snare=[2, 6], hat=list(range(8))),
    "ride": dict(kick=[0, 4], snare=[2, 6], ride=list(range(8))),
}

_BASS_RHYTHMS = ([0, 2, 4, 6], [0, 1, 2, 3, 4, 5, 6, 7], [0, 3, 4, 6], [0, 2, 3, 4, 6, 7])
#: syncopated bass lines: notes tied over the beat ("1, and-of-2, and-of-3, 4" first)
_SYNC_BASS_RHYTHMS = ([0, 3, 5, 6], [0, 3, 6], [0, 2, 3, 5, 7], [0, 5, 6], [0, 1, 3, 6])
#: arpeggios with ties: the 8th-note slots where a chord tone starts
_ARP_RHYTHMS = ([0, 1, 3, 4, 5, 7], [0, 2, 3, 5, 6], [0, 1, 2, 3, 5, 6, 7])
_STRUM_RHYTHMS = ([0, 2, 4, 6], [0, 2, 3, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7], [0, 3, 6])

# guitar open-chord voicings (MIDI notes, low string first) and bass roots (MIDI)
_CHORDS = {
    "C": ([48, 52, 55, 60, 64], 36), "G": ([43, 47, 50, 55, 59, 67], 31), "Am": ([45, 52, 57, 60, 64], 33),
    "F": ([41, 48, 53, 57, 60, 65], 29), "D": ([50, 57, 62, 66], 38), "Em": ([40, 47, 52, 55, 59, 64], 28),
    "E": ([40, 47, 52, 56, 59, 64], 28), "A": ([45, 52, 57, 61, 64], 33),
}
_PROGRESSIONS = (("C", "G", "Am", "F"), ("G", "D", "Em", "C"), ("Am", "F", "C", "G"), ("E", "A", "D", "A"))


@dataclass(frozen=True)
class Clip:
    name: str
    kind: str                 # "drums", "drums+bass", "full", "bass+strum"; drumless: "bass-sync",
    #                           "pad+bass-sync", "arp+bass-sync", "arp"
    audio: np.ndarray         # float32 [channels, samples]
    sample_rate: int          # Hz
    beat_times: np.ndarray    # true quarter-note times in the clip, seconds (before jitter)
    downbeat_times: np.ndarray
    source_bpm: float         # least-squares constant tempo of beat_times (the "true" source tempo)
    target_bpm: float
    drift_percent: float      # peak-to-peak tempo change across the clip
    drift_shape: str
    #: window joins (seconds in the clip) where the groove jumps in phase and steps in tempo
    joins: tuple[float, ...] = ()
    join_phase_ms: tuple[float, ...] = ()       # the phase jump at each join (+: notes late)
    join_tempo_percent: tuple[float, ...] = ()  # the tempo step at each join

    @property
    def ratio(self) -> float:
        return self.target_bpm / self.source_bpm


def _midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12.0)


def _tempo_curve(rng: np.random.Generator, n: int, bpm0: float, drift: float) -> tuple[np.ndarray, str]:
    u = np.linspace(0.0, 1.0, n)
    shape = ("ramp", "wander", "step")[rng.integers(3)]
    sign = rng.choice([-1.0, 1.0])
    if shape == "ramp":
        f = u - 0.5
    elif shape == "wander":
        cycles = rng.uniform(0.6, 1.5)
        f = 0.5 * np.sin(2 * np.pi * (cycles * u + rng.uniform()))
        f = (f - f.min()) / max(1e-9, f.max() - f.min()) - 0.5
    else:
        f = 0.5 * np.tanh((u - rng.uniform(0.3, 0.7)) / 0.05)
    return bpm0 * (1.0 + sign * drift * f), shape


def _place(out: np.ndarray, sample: np.ndarray, t: float, sr: int, gain: float, pan: float | None) -> None:
    i = int(round(t * sr))
    if i >= out.shape[1] or i + len(sample) <= 0:
        return
    s = sample
    if i < 0:
        s, i = s[-i:], 0
    s = s[: out.shape[1] - i] * gain
    if out.shape[0] == 1 or pan is None:
        out[:, i:i + len(s)] += s
    else:
        out[0, i:i + len(s)] += s * np.cos(pan * np.pi / 2)
        out[1, i:i + len(s)] += s * np.sin(pan * np.pi / 2)


def _bass_note(freq: float, length: int, sr: int) -> np.ndarray:
    t = np.arange(length) / sr
    phase = 2 * np.pi * freq * t
    wave = np.zeros(length)
    for k in range(1, max(2, min(24, int(2500 / freq))) + 1):
        wave += np.sin(k * phase) / k * np.exp(-t * k * 1.5)  # brighter attack, darker sustain
    env = np.minimum(1.0, t / 0.004) * np.exp(-t / 0.45)
    release = min(length, int(0.02 * sr))
    env[length - release:] *= np.linspace(1.0, 0.0, release)
    return (wave * env).astype(np.float32)


def _pluck(freq: float, length: int, sr: int, rng: np.random.Generator, decay: float = 0.996) -> np.ndarray:
    """Karplus-Strong string, computed one delay-line period at a time (vectorised)."""
    period = max(2, int(round(sr / freq)))
    y = np.zeros(1 + length + period)  # y[0] is the sample before the excitation
    burst = np.convolve(rng.uniform(-1.0, 1.0, period), [0.5, 0.5], mode="same")  # softer pick
    y[1: 1 + period] = burst
    for start in range(1 + period, len(y), period):
        stop = min(start + period, len(y))
        y[start:stop] = decay * 0.5 * (y[start - period: stop - period] + y[start - period - 1: stop - period - 1])
    return y[1: 1 + length].astype(np.float32)


def window_joins(duration: float, window: float = WINDOW_SECONDS,
                 stride: float = STRIDE_SECONDS) -> tuple[float, ...]:
    """Where audiocraft's extension starts new material in a ``duration``-second clip generated
    with a ``window``-second model and ``extend_stride`` ``stride``: window, window + stride, ..."""
    joins, t = [], window
    while t < duration - 1e-9:
        joins.append(round(t, 6))
        t += stride
    return tuple(joins)


def _join_offsets(joins: tuple[float, ...], seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Phase jump (seconds) and tempo step (fraction) at each join: 10-35 ms early or late and
    0.5-2 % faster or slower; the cumulative tempo change stays within +-3 %. Their own random
    stream, so the clips without joins are the same as before joins existed."""
    jrng = np.random.default_rng([seed, index, 104729])
    phase = jrng.choice([-1.0, 1.0], len(joins)) * jrng.uniform(0.010, 0.035, len(joins))
    steps, total = [], 1.0
    for _ in joins:
        step = float(jrng.choice([-1.0, 1.0]) * jrng.uniform(0.005, 0.02))
        if abs(total * (1 + step) - 1.0) > 0.03:
            step = -step
        total *= 1 + step
        steps.append(step)
    return phase, np.array(steps)


def make_clip(index: int, *, duration: float = 30.0, sample_rate: int = 32000, channels: int = 1,
              kind: str = "full", seed: int = 0, joins: tuple[float, ...] = ()) -> Clip:
    """Synthesise evaluation clip ``index`` (deterministic for a given seed). ``joins``: clip
    times (s) of window joins, where the groove jumps in phase and steps in tempo
    (``_join_offsets``)."""
    rng = np.random.default_rng([seed, index])
    sr = sample_rate
    bpm0 = float(np.exp(rng.uniform(np.log(70.0), np.log(160.0))))
    drift = float(rng.uniform(0.01, 0.03))
    jitter_s = float(rng.uniform(0.002, 0.004))

    # musical position (beats) over a fine time grid; q=0 is the first downbeat
    dt = 0.0005
    grid_t = np.arange(0.0, duration + 2.0, dt)
    bpm_curve, shape = _tempo_curve(rng, len(grid_t), bpm0, drift)
    join_phase, join_step = _join_offsets(tuple(joins), seed, index)
    for join, step in zip(joins, join_step):
        bpm_curve = np.where(grid_t >= join, bpm_curve * (1.0 + step), bpm_curve)
    q0 = -float(rng.uniform(0.0, BEATS_PER_BAR))
    q = q0 + np.concatenate(([0.0], np.cumsum(bpm_curve[:-1] / 60.0 * dt)))
    join_at = np.asarray(joins, dtype=float)
    jump_after = np.concatenate(([0.0], np.cumsum(join_phase)))

    def shifted(t):
        """A time of the continuous groove, moved by the phase jumps of the joins before it."""
        return t + jump_after[np.searchsorted(join_at, t, side="right")]

    def time_of(position: float) -> float:
        return float(shifted(float(np.interp(position, q, grid_t))))

    first_bar = int(np.floor(q0 / BEATS_PER_BAR))
    last_bar = int(np.ceil(q[np.searchsorted(grid_t, duration)] / BEATS_PER_BAR))
    n = int(round(duration * sr))
    out = np.zeros((channels, n), dtype=np.float32)

    def jit() -> float:
        return float(np.clip(rng.normal(0.0, jitter_s), -3 * jitter_s, 3 * jitter_s))

    parts = {"drums": ("drums",), "drums+bass": ("drums", "bass"), "full": ("drums", "bass", "strum"),
             "bass+strum": ("bass", "strum"), "bass-sync": ("sync-bass",), "pad+bass-sync": ("pad", "sync-bass"),
             "arp+bass-sync": ("arp", "sync-bass"), "arp": ("arp",)}[kind]

    if "drums" in parts:
        kit_name = (ACOUSTIC_KITS + ELECTRONIC_KITS)[rng.integers(len(ACOUSTIC_KITS) + len(ELECTRONIC_KITS))]
        kit = load_kit(kit_name, sr)
        groove_name = list(_GROOVES)[rng.integers(len(_GROOVES))]
        groove = _GROOVES[groove_name]
        pans = {"kick": 0.5, "snare": 0.45, "hat": 0.65, "open": 0.65, "ride": 0.3, "crash": 0.35}
        levels = {"kick": 1.0, "snare": 0.8, "hat": 0.35, "open": 0.3, "ride": 0.35, "crash": 0.4}
        for bar in range(first_bar, last_bar + 1):
            for slot in range(SLOTS_PER_BAR):
                pos = bar * BEATS_PER_BAR + slot / 2
                if pos < q0 - 0.5:
                    continue
                for voice in ("kick", "snare", "hat", "open", "ride"):
                    if slot in groove.get(voice, ()):
                        vel = float(np.clip(rng.normal(0.8 if slot % 2 == 0 else 0.55, 0.1), 0.1, 1.0))
                        _place(out, kit.hit(voice, vel), time_of(pos) + jit(), sr, levels[voice], pans[voice])
                if slot == 0 and bar % 4 == 0 and rng.uniform() < 0.5:
                    _place(out, kit.hit("crash", 0.8), time_of(pos) + jit(), sr, levels["crash"], pans["crash"])
        kind_name = f"{kind}:{kit_name}:{groove_name}"
    else:
        kind_name = kind

    progression = _PROGRESSIONS[rng.integers(len(_PROGRESSIONS))]
    if "bass" in parts:
        rhythm = _BASS_RHYTHMS[rng.integers(len(_BASS_RHYTHMS))]
        events = [(bar, s) for bar in range(first_bar, last_bar + 1) for s in rhythm]
        for k, (bar, slot) in enumerate(events):
            pos = bar * BEATS_PER_BAR + slot / 2
            nxt = events[k + 1][0] * BEATS_PER_BAR + events[k + 1][1] / 2 if k + 1 < len(events) else pos + 1
            if pos < q0 - 1:
                continue
            root = _CHORDS[progression[bar % 4]][1] + (12 if slot in (3, 7) and rng.uniform() < 0.3 else 0)
            length = int((time_of(nxt) - time_of(pos)) * sr * 0.95)
            note = _bass_note(_midi_hz(root), max(length, 64), sr)
            _place(out, note, time_of(pos) + jit(), sr, 0.5 * float(rng.uniform(0.8, 1.0)), 0.5)
        kind_name += ":bass"

    if "sync-bass" in parts:
        rhythm = _SYNC_BASS_RHYTHMS[index % len(_SYNC_BASS_RHYTHMS)]
        events = [(bar, s) for bar in range(first_bar, last_bar + 1) for s in rhythm]
        for k, (bar, slot) in enumerate(events):
            pos = bar * BEATS_PER_BAR + slot / 2
            nxt = events[k + 1][0] * BEATS_PER_BAR + events[k + 1][1] / 2 if k + 1 < len(events) else pos + 1
            if pos < q0 - 1:
                continue
            root = _CHORDS[progression[bar % 4]][1] + (7 if k % len(rhythm) == len(rhythm) - 1 else 0)
            length = int((time_of(nxt) - time_of(pos)) * sr * 0.97)   # held until the next note
            _place(out, _bass_note(_midi_hz(root), max(length, 64), sr), time_of(pos) + jit(), sr,
                   0.5 * float(rng.uniform(0.8, 1.0)), 0.5)
        kind_name += ":" + "-".join(str(s) for s in rhythm)

    if "pad" in parts:
        for bar in range(first_bar, last_bar + 1):
            start = time_of(bar * BEATS_PER_BAR)
            end = time_of((bar + 1) * BEATS_PER_BAR)
            if end < 0:
                continue
            length = int((end - start) * sr)
            t = np.arange(length) / sr
            env = np.minimum(1.0, t / 0.03) * np.minimum(1.0, (length - np.arange(length)) / (0.03 * sr))
            tone = np.zeros(length)
            for note in _CHORDS[progression[bar % 4]][0][1:5]:
                for k in range(1, 5):
                    tone += np.sin(2 * np.pi * _midi_hz(note) * k * t) / k ** 1.2
            _place(out, (0.05 * tone * env).astype(np.float32), start, sr, 1.0, 0.5)

    if "arp" in parts:
        rhythm = _ARP_RHYTHMS[index % len(_ARP_RHYTHMS)]
        bank_arp: dict[int, np.ndarray] = {}
        for bar in range(first_bar, last_bar + 1):
            notes = _CHORDS[progression[bar % 4]][0][1:]
            for j, slot in enumerate(rhythm):
                pos = bar * BEATS_PER_BAR + slot / 2
                if pos < q0 - 1:
                    continue
                note = notes[j % len(notes)] + 12
                if note not in bank_arp:
                    bank_arp[note] = _pluck(_midi_hz(note), int(1.0 * sr), sr, rng, decay=0.994)
                _place(out, bank_arp[note], time_of(pos) + jit(), sr, 0.25 * float(rng.uniform(0.8, 1.0)), 0.5)
        kind_name += ":arp" + "-".join(str(s) for s in rhythm)

    if "strum" in parts:
        rhythm = _STRUM_RHYTHMS[rng.integers(len(_STRUM_RHYTHMS))]
        bank: dict[tuple[str, int], np.ndarray] = {}
        for bar in range(first_bar, last_bar + 1):
            chord = progression[bar % 4]
            notes = _CHORDS[chord][0]
            for slot in rhythm:
                pos = bar * BEATS_PER_BAR + slot / 2
                if pos < q0 - 1:
                    continue
                start = time_of(pos) + jit()
                down = slot % 2 == 0
                order = notes if down else notes[::-1][:4]
                spread = float(rng.uniform(0.006, 0.012))
                for s, note in enumerate(order):
                    key = (chord, note)
                    if key not in bank:
                        bank[key] = _pluck(_midi_hz(note), int(1.2 * sr), sr, rng)
                    gain = 0.18 * (1.0 if down else 0.7) * float(rng.uniform(0.8, 1.0))
                    _place(out, bank[key], start + s * spread, sr, gain, 0.35 + 0.05 * s)
        kind_name += ":strum"

    # the clip's true beats: every quarter note inside the clip
    beat_positions = np.arange(np.ceil(q0), q[np.searchsorted(grid_t, duration) - 1] + 1e-9)
    beat_times = shifted(np.interp(beat_positions, q, grid_t))
    keep = (beat_times >= 0) & (beat_times < duration)
    beat_positions, beat_times = beat_positions[keep], beat_times[keep]
    downbeats = beat_times[np.mod(beat_positions, BEATS_PER_BAR) == 0]
    slope = np.polyfit(np.arange(len(beat_times)), beat_times, 1)[0]

    peak = float(np.max(np.abs(out)))
    out *= np.float32(0.8 / max(peak, 1e-9))
    rng_target = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
    source_bpm = 60.0 / slope
    target = float(np.clip(round(source_bpm * rng_target), np.ceil(source_bpm * 0.75), np.floor(source_bpm * 1.33)))
    return Clip(name=f"{index:02d}", kind=kind_name, audio=out, sample_rate=sr, beat_times=beat_times,
                downbeat_times=downbeats, source_bpm=float(source_bpm), target_bpm=target,
                drift_percent=100 * drift, drift_shape=shape, joins=tuple(float(j) for j in joins),
                join_phase_ms=tuple(float(1000 * p) for p in join_phase),
                join_tempo_percent=tuple(float(100 * st) for st in join_step))


def build_set_item(index: int, *, n_clips: int = 40, duration: float = 30.0, seed: int = 0) -> Clip:
    """Clip ``index`` of the evaluation set: mostly 32 kHz mono (MusicGen's format), every 5th
    44.1 kHz stereo, every 7th 48 kHz; material cycles through full band, drums+bass, drums and
    bass+strum (no drums)."""
    del n_clips  # the i-th clip does not depend on the size of the set
    kinds = ("full", "drums+bass", "drums", "full", "bass+strum", "drums+bass", "full", "drums")
    if index % 5 == 4:
        sr, ch = 44100, 2
    elif index % 7 == 6:
        sr, ch = 48000, 1
    else:
        sr, ch = 32000, 1
    return make_clip(index, duration=duration, sample_rate=sr, channels=ch, kind=kinds[index % len(kinds)],
                     seed=seed)


def build_set(n_clips: int = 40, *, duration: float = 30.0, seed: int = 0) -> list[Clip]:
    """The whole evaluation set (see ``build_set_item``)."""
    return [build_set_item(i, n_clips=n_clips, duration=duration, seed=seed) for i in range(n_clips)]


def build_join_item(index: int, *, seed: int = 0) -> Clip:
    """Window-join clip ``index``: ``JOIN_CLIP_SECONDS`` cycled (66, 120, 84 s), with a phase jump
    and a tempo step at every join of a 30 s window extended by 18 s strides (``window_joins``);
    32 kHz mono (MusicGen's format) except every 4th, 44.1 kHz stereo; material cycles through
    full band, drums+bass, bass+strum and drums. Its random stream is apart from the 30 s set's."""
    duration = JOIN_CLIP_SECONDS[index % len(JOIN_CLIP_SECONDS)]
    kinds = ("full", "drums+bass", "bass+strum", "drums")
    sr, ch = (44100, 2) if index % 4 == 3 else (32000, 1)
    clip = make_clip(1000 + index, duration=duration, sample_rate=sr, channels=ch,
                     kind=kinds[index % len(kinds)], seed=seed, joins=window_joins(duration))
    return dataclasses.replace(clip, name=f"J{index}")


DRUMLESS_KINDS = ("bass-sync", "pad+bass-sync", "arp+bass-sync", "arp")


def build_drumless_item(index: int, *, duration: float = 30.0, seed: int = 0) -> Clip:
    """Drumless clip ``index``: sparse and syncopated tonal material (``DRUMLESS_KINDS``, cycled;
    syncopation patterns and arpeggio rhythms cycled too), 32 kHz mono, every 4th 44.1 kHz stereo.
    Its random stream is apart from the other sets'."""
    sr, ch = (44100, 2) if index % 4 == 3 else (32000, 1)
    clip = make_clip(2000 + index, duration=duration, sample_rate=sr, channels=ch,
                     kind=DRUMLESS_KINDS[index % len(DRUMLESS_KINDS)], seed=seed)
    return dataclasses.replace(clip, name=f"D{index}")
