"""Song analysis: a user's song's beat map, bars, chords per bar and key, once per job.

``analyse_song`` reads a mixed recording (chords, bass, maybe drums) and returns a
``SongAnalysis``:

- **beats**: the tempo octave from ``librosa.feature.tempo`` (autocorrelation of the onset
  strength with a log-normal prior around 120 BPM), then ``stems.beats``' steps over the whole
  song (dynamic-programming beat tracking, Ellis 2007, via ``librosa.beat.beat_track``, each beat
  refined to its attack, robust local regression over +-8 beats), extended at both ends over the
  part of the song that sounds. The beat
  times follow the song's drift: they are the song's tempo map.
- **downbeats** (bar phase) and the beat grid: harmony changes on bar lines, so of the tracked beats
  and the grid half a beat later (a tracker on arpeggios or syncopated bass without drums may lock
  onto the off-beat eighths), and of the 4 bar phases of each, the one whose bars chord templates fit
  best wins, low-band onsets on beat 1 breaking ties; where the chords then change only every other
  "bar" (tracked at 150 BPM or more), the beats were eighth notes and every other one is kept;
  where they change in the middle of most bars (tracked below 75 BPM), the beats were half notes and
  the beats between them are added.
- **chords**: beat-synchronous chroma from a constant-Q transform (``librosa.cqt``, tuning
  estimated by ``librosa.estimate_tuning``), split into a bass chroma (below ~220 Hz) and a
  treble chroma, matched per bar and per half bar against templates of major, minor, dominant
  seventh, major seventh and minor seventh chords (template matching, Fujishima 1999, "Realtime
  chord recognition of musical sound", ICMC), the bass note adding evidence for the root; silence
  is "N". A bar is split into two half-bar chords only where the halves differ clearly.
- **key**: from the chords (whose roots the bass decides), as harmonic analysis does it: the share
  of the song's chord tones diatonic to each key (for a minor key its raised leading tone too, so
  its major V fits), and the tonic from where the music resolves: authentic cadences (a major V or
  V7 to I, the leading tone rising to the tonic), the chords that start and end the 4-bar phrases,
  the last chord, the tonic chord's share of the song; a Krumhansl-Kessler profile correlation of
  the chroma weighs little (``KEY_WEIGHTS``). This tells relative major and minor apart, which
  share every note. The confidence is the lead over the runner-up key, 0.3 for full confidence.

Libraries: librosa (ISC licence) for the onset envelope, beat tracking, CQT and tuning; no
model is loaded and nothing downloads (madmom's downbeat models are CC BY-NC-SA, so not used).
The figures are in docs/benchmarks.md (``make bench-song``, scored with mir_eval, MIT).

Pure compute: numpy, librosa, soxr. Times are seconds in the song; audio is float
``[channels, samples]`` (or ``[samples]``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import librosa
import numpy as np

from stems.analysis import KRUMHANSL_KESSLER_MAJOR, KRUMHANSL_KESSLER_MINOR, mono_at
import stems.beats as _beats
from stems.plan import CHORD_INTERVALS, PITCH_CLASSES, Key, parse_chord

__all__ = [
    "SongAnalysisError",
    "RegionError",
    "ChordSpan",
    "SongRegion",
    "SongAnalysis",
    "analyse_song",
    "REGION_FIELD",
]

REGION_FIELD = "parameters.source_region"
BEATS_PER_BAR = 4

_SR = 22050
_HOP = 512                 # ~23 ms CQT frames
_BINS_PER_OCTAVE = 36
_N_OCTAVES = 7             # C1 .. B7
_FMIN = librosa.note_to_hz("C1")
_BASS_MAX_HZ = 220.0
_TREBLE_MIN_HZ = 110.0
_TREBLE_MAX_HZ = 2000.0
_MIN_SECONDS = 2.0
_DOUBLE_MIN_BPM = 150.0   # a tracked tempo this fast may be eighth notes (see _changes_in_pairs)
_HALF_MAX_BPM = 75.0      # a tracked tempo this slow may be half notes (see _changes_mid_bar)
_GRID_SKIP = 0.25         # share of each beat left out when choosing the beat grid and bar phase
_SMOOTH_BEATS = 8          # beats on each side in the beat map's robust local regression
_SILENCE_RMS = 1e-4        # -80 dBFS
_QUALITIES = ("maj", "min", "7", "maj7", "min7")
# weight of the bass note on the chord's root against the treble template match
_BASS_WEIGHT = 0.35
# a seventh must fit this much better than its triad to be reported
_SEVENTH_MARGIN = 0.06
# two halves of a bar are reported apart only when splitting gains this much (mean score)
_SPLIT_GAIN = 0.06


class SongAnalysisError(ValueError):
    """The song cannot be analysed: bad audio (shape, non-finite, sample rate), silent, or too
    short (under 2 s, or no beat found)."""


class RegionError(ValueError):
    """A region outside the song: past its end, before bar 1, or of zero bars. ``field`` names
    the request field ("parameters.source_region") for the 422 answer or the job error."""

    def __init__(self, message: str, *, field: str = REGION_FIELD):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ChordSpan:
    """One chord of the song: a bar, or a half bar where the bar's chord changes mid-bar."""

    start_seconds: float
    end_seconds: float
    chord: str            # stems.plan chord symbol ("Am", "F", "G7"), or "N" for no chord
    confidence: float     # 0..1

    def to_dict(self) -> dict:
        return {"start_seconds": round(float(self.start_seconds), 4),
                "end_seconds": round(float(self.end_seconds), 4),
                "chord": self.chord, "confidence": round(float(self.confidence), 3)}


@dataclass(frozen=True)
class SongRegion:
    """Bars ``start_bar .. start_bar + bars - 1`` of a song (1-based: bar 1 starts on the first
    downbeat), in song time."""

    start_bar: int
    bars: int
    start_seconds: float           # the region's first downbeat
    end_seconds: float             # the downbeat after its last bar (extrapolated past the song)
    beats: tuple[float, ...]       # beat times from start_seconds up to and including end_seconds
    bpm: float                     # mean tempo over the region
    chords: tuple[str, ...]        # one per bar (the first half's chord where a bar changes)
    half_bar_chords: tuple[tuple[str, str], ...]   # per bar: (first half, second half)

    def to_dict(self) -> dict:
        return {"start_bar": self.start_bar, "bars": self.bars,
                "start_seconds": round(self.start_seconds, 4), "end_seconds": round(self.end_seconds, 4),
                "beats": [round(t, 4) for t in self.beats], "bpm": round(self.bpm, 3),
                "chords": list(self.chords), "half_bar_chords": [list(h) for h in self.half_bar_chords]}


@dataclass(frozen=True)
class SongAnalysis:
    """What ``analyse_song`` found. Times in seconds from the song's first sample."""

    duration_seconds: float
    sample_rate: int
    beats: tuple[float, ...]       # the song's beat map (a played song drifts)
    downbeats: tuple[float, ...]   # bar n starts at downbeats[n - 1]
    beats_per_bar: int
    bpm: float                     # median tempo
    chords: tuple[ChordSpan, ...]  # one per bar, or per half bar where it changes mid-bar
    key: str                       # stems.plan key name: "A minor"
    key_confidence: float          # 0..1

    @property
    def bar_count(self) -> int:
        return len(self.downbeats)

    def _beat_index(self, seconds: float) -> int:
        beats = np.asarray(self.beats)
        return int(np.argmin(np.abs(beats - seconds)))

    def _extended_beats(self, until: float) -> np.ndarray:
        """The beat map continued at its last period until it passes ``until``."""
        beats = list(self.beats)
        period = (beats[-1] - beats[-2]) if len(beats) > 1 else 60.0 / self.bpm
        while beats[-1] < until - 1e-6:
            beats.append(beats[-1] + period)
        return np.asarray(beats)

    def bar_at(self, seconds: float) -> int:
        """The 1-based bar whose downbeat is nearest ``seconds`` (song time)."""
        if not self.downbeats:
            raise RegionError("the song has no bars")
        return int(np.argmin(np.abs(np.asarray(self.downbeats) - float(seconds)))) + 1

    def region(self, start_bar: int = 1, bars: int | None = None) -> SongRegion:
        """Bars ``start_bar .. start_bar + bars - 1``; ``bars=None`` runs to the song's last bar.

        Raises:
            RegionError: start_bar < 1 or past the song's last bar, bars < 1, or the region ends
                past the song's last bar.
        """
        n = self.bar_count
        if isinstance(start_bar, bool) or not isinstance(start_bar, (int, np.integer)) or start_bar < 1:
            raise RegionError(f"start_bar must be an integer >= 1, got {start_bar!r}")
        if start_bar > n:
            raise RegionError(f"start_bar {start_bar} is past the song's end: it has {n} bars")
        if bars is None:
            bars = n - start_bar + 1
        if isinstance(bars, bool) or not isinstance(bars, (int, np.integer)) or bars < 1:
            raise RegionError(f"bars must be an integer >= 1, got {bars!r}")
        if start_bar + bars - 1 > n:
            raise RegionError(f"bars {start_bar}..{start_bar + bars - 1} run past the song's end: "
                              f"it has {n} bars")
        start_bar, bars = int(start_bar), int(bars)
        start = self.downbeats[start_bar - 1]
        if start_bar + bars - 1 < n:
            end = self.downbeats[start_bar + bars - 1]
        else:
            end = None
        first = self._beat_index(start)
        beats = self._extended_beats(self.beats[first] + (bars * self.beats_per_bar + 1) * 60.0 / self.bpm)
        region_beats = beats[first: first + bars * self.beats_per_bar + 1]
        if end is None:
            end = float(region_beats[-1])
        region_beats = region_beats.copy()
        region_beats[0], region_beats[-1] = start, end
        bpm = 60.0 * bars * self.beats_per_bar / (end - start)
        half = []
        for b in range(start_bar - 1, start_bar - 1 + bars):
            half.append(self._half_bar(b))
        return SongRegion(start_bar=start_bar, bars=bars, start_seconds=float(start), end_seconds=float(end),
                          beats=tuple(float(t) for t in region_beats), bpm=float(bpm),
                          chords=tuple(h[0] for h in half), half_bar_chords=tuple(half))

    def _half_bar(self, bar_index: int) -> tuple[str, str]:
        """(first half's chord, second half's chord) of bar ``bar_index`` (0-based)."""
        start = self.downbeats[bar_index]
        end = self.downbeats[bar_index + 1] if bar_index + 1 < len(self.downbeats) else math.inf
        spans = [c for c in self.chords if start - 1e-3 <= c.start_seconds < end - 1e-3]
        if not spans:
            return ("N", "N")
        return (spans[0].chord, spans[-1].chord)

    def to_dict(self) -> dict:
        """JSON-safe dict (plain floats, ints, strings, lists); ``from_dict`` reads it back."""
        return {"duration_seconds": round(float(self.duration_seconds), 4), "sample_rate": int(self.sample_rate),
                "beats": [round(float(t), 4) for t in self.beats],
                "downbeats": [round(float(t), 4) for t in self.downbeats],
                "beats_per_bar": int(self.beats_per_bar), "bpm": round(float(self.bpm), 3),
                "chords": [c.to_dict() for c in self.chords], "key": self.key,
                "key_confidence": round(float(self.key_confidence), 3), "bar_count": self.bar_count}

    @classmethod
    def from_dict(cls, d: dict) -> SongAnalysis:
        """The inverse of ``to_dict``. Raises SongAnalysisError on a malformed dict."""
        try:
            return cls(duration_seconds=float(d["duration_seconds"]), sample_rate=int(d["sample_rate"]),
                       beats=tuple(float(t) for t in d["beats"]),
                       downbeats=tuple(float(t) for t in d["downbeats"]),
                       beats_per_bar=int(d["beats_per_bar"]), bpm=float(d["bpm"]),
                       chords=tuple(ChordSpan(start_seconds=float(c["start_seconds"]),
                                              end_seconds=float(c["end_seconds"]), chord=str(c["chord"]),
                                              confidence=float(c["confidence"])) for c in d["chords"]),
                       key=str(d["key"]), key_confidence=float(d["key_confidence"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SongAnalysisError(f"not a song analysis: {exc}") from exc


# ------------------------------------------------------------------------------ input


def _mono(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    return mono_at(audio, sample_rate, _SR, error=SongAnalysisError)


# ------------------------------------------------------------------------------ beats


def _sounding_span(mono: np.ndarray) -> tuple[float, float]:
    """First and last time (s) where the 20 ms RMS is within 40 dB of the loudest."""
    win = int(0.02 * _SR)
    n = len(mono) // win
    rms = np.sqrt(np.mean(mono[: n * win].reshape(n, win).astype(np.float64) ** 2, axis=1))
    on = np.nonzero(rms > rms.max() * 10 ** (-40 / 20))[0]
    return float(on[0] * win / _SR), float((on[-1] + 1) * win / _SR)


def _track_beats(mono: np.ndarray) -> np.ndarray:
    """The song's beat times (s), covering the sounding part of the song.

    ``stems.beats``' steps on the whole song: its log-mel onset envelope, the tempo octave from
    ``librosa.feature.tempo`` (log-normal prior around 120 BPM) refined by the envelope's
    autocorrelation, dynamic-programming beats over the whole song (``librosa.beat.beat_track``),
    each moved to its attack, slips repaired, then robust local regression over +-8 beats (a
    played song's tempo changes slowly). Unlike a stem's conform, the beat list is not cut where
    it stops being regular: a song's beat map must cover the song."""
    feats = _beats._onset_features(mono)
    env = feats.env
    rough = float(librosa.feature.tempo(onset_envelope=env, sr=_SR, hop_length=_beats._HOP)[0])
    if not math.isfinite(rough) or rough <= 0:
        rough = 120.0
    tempo, _ = _beats._tempo_from_autocorrelation(env, rough, BEATS_PER_BAR)
    _, frames = librosa.beat.beat_track(onset_envelope=env, sr=_SR, hop_length=_beats._HOP, bpm=tempo,
                                        tightness=100, trim=False)
    first, last = _sounding_span(mono)
    coarse = np.asarray(frames, dtype=float) * _beats._HOP / _SR
    period = 60.0 / tempo
    coarse = coarse[(coarse >= first - 0.25 * period) & (coarse <= last)]
    if len(coarse) < 4:
        raise SongAnalysisError("no beat found in the song")
    times = _beats._regularise_beats(np.sort(_beats._refine_beats(coarse, _beats._fine_rise(mono))))
    if len(times) >= 2 * _SMOOTH_BEATS + 1:
        times = _beats._smooth_beats(times, half_width=_SMOOTH_BEATS)[0]
    times = np.sort(times[(times >= 0.0) & (times < len(mono) / _SR)])
    if len(times) < 4:
        raise SongAnalysisError("no beat found in the song")
    # extend at the local period over the part of the song that sounds
    head = float(np.median(np.diff(times[:5])))
    pre = []
    t = times[0] - head
    while t >= first - 0.25 * head:
        pre.append(max(t, 0.0))
        t -= head
    tail = float(np.median(np.diff(times[-5:])))
    post = []
    t = times[-1] + tail
    while t <= last - 0.25 * tail:
        post.append(t)
        t += tail
    return np.concatenate((pre[::-1], times, post))


# ------------------------------------------------------------------------------ chroma


@dataclass(frozen=True)
class _Frames:
    treble: np.ndarray   # [12, frames] CQT chroma, _TREBLE_MIN_HZ.._TREBLE_MAX_HZ
    bass: np.ndarray     # [12, frames] below _BASS_MAX_HZ
    rms: np.ndarray      # [frames]


@dataclass(frozen=True)
class _Chroma:
    treble: np.ndarray   # [12, beats]: mean per inter-beat span
    bass: np.ndarray     # [12, beats]
    energy: np.ndarray   # [beats] RMS of the span


def _frame_chroma(mono: np.ndarray) -> _Frames:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to estimate tuning from empty frequency set")
        tuning = float(librosa.estimate_tuning(y=mono, sr=_SR, bins_per_octave=_BINS_PER_OCTAVE))
    C = np.abs(librosa.cqt(mono, sr=_SR, hop_length=_HOP, fmin=_FMIN, n_bins=_N_OCTAVES * _BINS_PER_OCTAVE,
                           bins_per_octave=_BINS_PER_OCTAVE, tuning=tuning))
    freqs = librosa.cqt_frequencies(n_bins=C.shape[0], fmin=_FMIN, bins_per_octave=_BINS_PER_OCTAVE)
    pc = (np.round(np.arange(C.shape[0]) / (_BINS_PER_OCTAVE / 12)).astype(int)) % 12
    fold = np.zeros((12, C.shape[0]))
    fold[pc, np.arange(C.shape[0])] = 1.0
    bass = (fold * (freqs < _BASS_MAX_HZ)) @ C
    treble = (fold * ((freqs >= _TREBLE_MIN_HZ) & (freqs < _TREBLE_MAX_HZ))) @ C
    rms = librosa.feature.rms(y=mono, frame_length=2 * _HOP, hop_length=_HOP)[0]
    n = min(C.shape[1], len(rms))
    return _Frames(treble=treble[:, :n], bass=bass[:, :n], rms=rms[:n])


def _beat_chroma(frames: _Frames, beats: np.ndarray, duration: float, skip: float = 0.1) -> _Chroma:
    """Mean chroma per inter-beat span (the last span one period long), leaving out the first
    ``skip`` of each span, where the previous chord's tail rings."""
    n = frames.treble.shape[1]
    period = beats[-1] - beats[-2] if len(beats) > 1 else 0.5
    bounds = np.concatenate((beats, [min(duration, beats[-1] + period)]))
    idx = np.clip(np.round(bounds * _SR / _HOP).astype(int), 0, n)
    tb, bb, en = [], [], []
    for a, b in zip(idx[:-1], idx[1:]):
        a2 = min(a + int(skip * (b - a)), n - 1)
        b = min(max(b, a2 + 1), n)
        tb.append(frames.treble[:, a2:b].mean(axis=1))
        bb.append(frames.bass[:, a2:b].mean(axis=1))
        en.append(float(frames.rms[a2:b].mean()))
    return _Chroma(treble=np.stack(tb, axis=1), bass=np.stack(bb, axis=1), energy=np.asarray(en))


# ------------------------------------------------------------------------------ chords


def _templates() -> tuple[np.ndarray, list[tuple[int, str]]]:
    rows, labels = [], []
    for quality in _QUALITIES:
        for root in range(12):
            t = np.zeros(12)
            for i, step in enumerate(CHORD_INTERVALS[quality]):
                t[(root + step) % 12] = 1.0 if i < 3 else 0.7
            rows.append(t / np.linalg.norm(t))
            labels.append((root, quality))
    return np.asarray(rows), labels


_TEMPLATES, _LABELS = _templates()
_TRIADS = np.array([q in ("maj", "min") for _, q in _LABELS])
_TRIAD_OF = {"maj": "maj", "min": "min", "7": "maj", "maj7": "maj", "min7": "min"}


def _chord_name(root: int, quality: str) -> str:
    return parse_chord(PITCH_CLASSES[root] + {"maj": "", "min": "m", "7": "7", "maj7": "maj7",
                                              "min7": "m7"}[quality]).name


def _chord_scores(treble: np.ndarray, bass: np.ndarray) -> np.ndarray:
    """[len(_LABELS)] score of each chord template for one span's summed chroma."""
    t = np.log1p(100.0 * treble / max(float(treble.max()), 1e-12))
    t = t - 0.5 * t.mean()
    t = np.maximum(t, 0.0)
    norm = np.linalg.norm(t)
    if norm <= 1e-12:
        return np.zeros(len(_LABELS))
    fit = _TEMPLATES @ (t / norm)
    b = bass / max(float(bass.sum()), 1e-12)
    roots = np.array([r for r, _ in _LABELS])
    score = fit + _BASS_WEIGHT * b[roots] * 2.0
    # a seventh must earn its extra tone
    penalty = np.array([_SEVENTH_MARGIN if q not in ("maj", "min") else 0.0 for _, q in _LABELS])
    return score - penalty


def _best(scores: np.ndarray) -> tuple[int, float]:
    """Index of the best template and a 0..1 confidence (its lead over the best template of
    another root or triad quality)."""
    order = np.argsort(-scores)
    best = int(order[0])
    root, quality = _LABELS[best]
    rival = next((int(i) for i in order[1:] if (_LABELS[i][0], _TRIAD_OF[_LABELS[i][1]])
                  != (root, _TRIAD_OF[quality])), best)
    margin = float(scores[best] - scores[rival])
    return best, float(np.clip(margin / 0.15, 0.0, 1.0))


def _bar_chords(chroma: _Chroma, downbeat_index: int, n_bars: int, beats: np.ndarray,
                silence: float) -> list[ChordSpan]:
    spans: list[ChordSpan] = []
    half = BEATS_PER_BAR // 2
    n_beats = chroma.treble.shape[1]
    ext = np.concatenate((beats, beats[-1] + (np.arange(1, BEATS_PER_BAR + 2)) * (beats[-1] - beats[-2])))
    for bar in range(n_bars):
        b0 = downbeat_index + bar * BEATS_PER_BAR
        idx = [i for i in range(b0, b0 + BEATS_PER_BAR) if i < n_beats]
        start, end = float(ext[b0]), float(ext[b0 + BEATS_PER_BAR])
        mid = float(ext[b0 + half])
        if not idx or chroma.energy[idx].mean() < silence:
            spans.append(ChordSpan(start, end, "N", 1.0))
            continue
        first = [i for i in idx if i < b0 + half]
        second = [i for i in idx if i >= b0 + half]
        whole = _chord_scores(chroma.treble[:, idx].sum(axis=1), chroma.bass[:, idx].sum(axis=1))
        bw, cw = _best(whole)
        if first and second:
            s1 = _chord_scores(chroma.treble[:, first].sum(axis=1), chroma.bass[:, first].sum(axis=1))
            s2 = _chord_scores(chroma.treble[:, second].sum(axis=1), chroma.bass[:, second].sum(axis=1))
            b1, c1 = _best(s1)
            b2, c2 = _best(s2)
            gain = 0.5 * (s1[b1] + s2[b2]) - 0.5 * (s1[bw] + s2[bw])
            if b1 != b2 and gain > _SPLIT_GAIN and _LABELS[b1][0] != _LABELS[b2][0] or \
                    b1 != b2 and gain > _SPLIT_GAIN and _TRIAD_OF[_LABELS[b1][1]] != _TRIAD_OF[_LABELS[b2][1]]:
                spans.append(ChordSpan(start, mid, _chord_name(*_LABELS[b1]), c1))
                spans.append(ChordSpan(mid, end, _chord_name(*_LABELS[b2]), c2))
                continue
        spans.append(ChordSpan(start, end, _chord_name(*_LABELS[bw]), cw))
    return spans


# ------------------------------------------------------------------------------ downbeats


def _bar_fit(chroma: _Chroma, phase: int) -> float:
    """Mean over the bars that start at ``phase`` of the best triad template's score for the
    bar's summed chroma: highest when the bars line up with the chord changes. Triads only: two
    half bars of neighbouring chords often make a seventh chord (Am + F = Fmaj7)."""
    n = chroma.treble.shape[1]
    scores = [_chord_scores(chroma.treble[:, b:b + BEATS_PER_BAR].sum(axis=1),
                            chroma.bass[:, b:b + BEATS_PER_BAR].sum(axis=1))[_TRIADS].max()
              for b in range(phase, n - BEATS_PER_BAR + 1, BEATS_PER_BAR)
              if chroma.energy[b:b + BEATS_PER_BAR].min() > 0]
    return float(np.mean(scores)) if scores else 0.0


def _onset_contrast(beats: np.ndarray, onset: np.ndarray, phase: int) -> float:
    """Low-band onset strength on beats ``phase::4`` against the other beats (relative)."""
    f = np.clip(np.round(beats * _SR / _HOP).astype(int), 0, len(onset) - 1)
    strength = np.array([onset[max(0, i - 1): i + 2].max() for i in f])
    sel = np.zeros(len(beats), dtype=bool)
    sel[phase::BEATS_PER_BAR] = True
    if sel.all() or not sel.any() or strength.mean() <= 0:
        return 0.0
    return float((strength[sel].mean() - strength[~sel].mean()) / strength.mean())


def _bar_grid(frames: _Frames, beats: np.ndarray, duration: float, onset: np.ndarray
              ) -> tuple[np.ndarray, _Chroma, int]:
    """Choose the beat grid and the bar phase: (beats, their chroma, index of the first downbeat).

    A beat tracker may lock onto the off-beat eighths (arpeggios, syncopated bass lines without
    drums), so the tracked beats and the grid half a beat later both compete; for each, every bar
    phase is scored by how well chord templates fit its bars (harmony changes on bar lines), with
    low-band onsets on beat 1 as a small tie-breaker."""
    _, grid, phase = max(_bar_grid_candidates(frames, beats, duration, onset), key=lambda c: c[0])
    return grid, _beat_chroma(frames, grid, duration), phase


def _bar_grid_candidates(frames: _Frames, beats: np.ndarray, duration: float, onset: np.ndarray
                         ) -> list[tuple[float, np.ndarray, int]]:
    """Every (score, beat grid, bar phase) that ``_bar_grid`` chooses from: the tracked beats and
    the grid half a beat later (the off-beat 8ths of the tracked beats, one extrapolated before
    the first where the audio reaches it), each with its 4 bar phases, scored by the bars'
    chord-template fit (``_bar_fit``) plus a small low-band onset tie-breaker. Shared with
    ``stems.beats``, which makes the same beat/off-beat and bar-phase choice for a stem."""
    half = 0.5 * (beats[1:] + beats[:-1])
    if len(beats) > 1 and beats[0] - 0.5 * (beats[1] - beats[0]) >= 0:
        half = np.concatenate(([beats[0] - 0.5 * (beats[1] - beats[0])], half))
    out = []
    for grid in (beats, half):
        if len(grid) < 2:
            continue
        # the fit leaves out the first quarter of every beat: a plucked chord rings on past the
        # change, which would otherwise favour grids that start late
        chroma = _beat_chroma(frames, grid, duration, skip=_GRID_SKIP)
        for phase in range(min(BEATS_PER_BAR, len(grid))):
            out.append((_bar_fit(chroma, phase) + 0.005 * _onset_contrast(grid, onset, phase), grid, phase))
    return out


def harmonic_bar_grid(mono: np.ndarray, beats: np.ndarray, min_spread: float
                      ) -> tuple[np.ndarray, int] | None:
    """The beat grid and bar phase that harmony puts on ``beats`` (s) of ``mono`` (at 22050 Hz),
    as ``analyse_song`` chooses them (``_bar_grid_candidates``): (beats, index of the first
    downbeat), or None when the harmony does not single out a bar position, i.e. when the best
    candidate's score is less than ``min_spread`` above the median candidate's (drums alone fit
    every chord template about equally at every position: spread ~0.01; chords, arpeggios and bass
    lines that change harmony on the bar line: 0.04-0.13 on make bench-tempo's seed 0)."""
    if len(beats) < 2 * BEATS_PER_BAR:
        return None
    frames = _frame_chroma(mono)
    onset = librosa.onset.onset_strength(y=mono, sr=_SR, hop_length=_HOP, n_mels=16, fmax=300.0)
    candidates = _bar_grid_candidates(frames, beats, len(mono) / _SR, onset)
    scores = np.array([c[0] for c in candidates])
    best = int(np.argmax(scores))
    if scores[best] - float(np.median(scores)) < min_spread:
        return None
    return candidates[best][1], candidates[best][2]


def _changes_mid_bar(chroma: _Chroma, phase: int) -> bool:
    """Whether the chords change in the middle of most bars: the beats are half notes (a tracker
    on syncopated material may halve the tempo)."""
    n = chroma.treble.shape[1]
    half = BEATS_PER_BAR // 2
    changes = []
    for b in range(phase, n - BEATS_PER_BAR + 1, BEATS_PER_BAR):
        first = _chord_scores(chroma.treble[:, b:b + half].sum(axis=1), chroma.bass[:, b:b + half].sum(axis=1))
        second = _chord_scores(chroma.treble[:, b + half:b + BEATS_PER_BAR].sum(axis=1),
                               chroma.bass[:, b + half:b + BEATS_PER_BAR].sum(axis=1))
        changes.append(int(np.argmax(np.where(_TRIADS, first, -np.inf)))
                       != int(np.argmax(np.where(_TRIADS, second, -np.inf))))
    return len(changes) >= 3 and float(np.mean(changes)) >= 0.6


def _changes_in_pairs(chroma: _Chroma, phase: int) -> bool:
    """Whether the bars' chords change only every other bar: the beats are eighth notes (a
    tracker on arpeggiated or syncopated material without drums doubles the tempo)."""
    n = chroma.treble.shape[1]
    labels = [int(np.argmax(_chord_scores(chroma.treble[:, b:b + BEATS_PER_BAR].sum(axis=1),
                                          chroma.bass[:, b:b + BEATS_PER_BAR].sum(axis=1))))
              for b in range(phase, n - BEATS_PER_BAR + 1, BEATS_PER_BAR)]
    changes = np.array([labels[k] != labels[k - 1] for k in range(1, len(labels))], dtype=float)
    if len(changes) < 6:
        return False
    rates = sorted((changes[0::2].mean(), changes[1::2].mean()))
    return rates[1] >= 0.4 and rates[0] <= 0.25 * rates[1]


# ------------------------------------------------------------------------------ key

_KEYS = tuple(Key(tonic, mode) for mode in ("major", "minor") for tonic in range(12))


#: weights of the key evidence (see _key_scores); tuned on make bench-song's seed 0
KEY_WEIGHTS = {"fit": 3.0, "share": 0.5, "cadence": 1.5, "phrase_end": 0.4, "phrase_start": 1.0,
               "last": 0.4, "profile": 0.3}
_PHRASE_BARS = 4


def _bars_of(spans: list[ChordSpan], downbeats: tuple[float, ...]) -> list[list]:
    """Per bar, its chords (one, or two where it changes mid-bar), parsed; None for "N"."""
    bars: list[list] = [[] for _ in downbeats]
    starts = np.asarray(downbeats)
    for span in spans:
        b = int(np.searchsorted(starts, span.start_seconds + 1e-3)) - 1
        if 0 <= b < len(bars):
            bars[b].append(None if span.chord == "N" else parse_chord(span.chord))
    return bars


def _key_scores(spans: list[ChordSpan], downbeats: tuple[float, ...], profile: np.ndarray,
                weights: dict[str, float] | None = None) -> np.ndarray:
    """Score of each key in _KEYS: a weighted sum of

    - ``fit``: the duration-weighted share of the chords' triad tones in the key (for a minor key
      its natural scale plus the leading tone: harmonic minor's major V);
    - ``share``: the tonic chord's share of the song (tonic triad of the key's mode);
    - ``cadence``: authentic cadences, V (or V7, a major chord: in minor it carries the raised
      leading tone) followed by the tonic chord, up to 2 counted;
    - ``phrase_end`` / ``phrase_start``: the share of phrases (4 bars from bar 1) that end / start
      on the tonic chord;
    - ``last``: the song's last chord is the tonic;
    - ``profile``: Pearson r of the song's chroma with the Krumhansl-Kessler profile of the key.
    """
    w = KEY_WEIGHTS if weights is None else weights
    bars = _bars_of(spans, downbeats)
    chords = [(parse_chord(c.chord), c.end_seconds - c.start_seconds) for c in spans if c.chord != "N"]
    scores = np.zeros(len(_KEYS))
    if not chords:
        return scores
    total = sum(d for _, d in chords)
    ends = [b[-1] for i, b in enumerate(bars) if b and ((i + 1) % _PHRASE_BARS == 0 or i == len(bars) - 1)]
    starts = [b[0] for i, b in enumerate(bars) if b and i % _PHRASE_BARS == 0]
    kk_major = np.asarray(KRUMHANSL_KESSLER_MAJOR)
    kk_minor = np.asarray(KRUMHANSL_KESSLER_MINOR)
    for k, key in enumerate(_KEYS):
        allowed = set(key.pitch_classes())
        if key.mode == "minor":
            allowed.add((key.tonic + 11) % 12)   # leading tone (harmonic minor)
        tonic_quality = "maj" if key.mode == "major" else "min"

        def is_tonic(ch) -> bool:
            return ch is not None and ch.root == key.tonic and _TRIAD_OF.get(ch.quality) == tonic_quality

        def is_dominant(ch) -> bool:
            return ch is not None and ch.root == (key.tonic + 7) % 12 and _TRIAD_OF.get(ch.quality) == "maj"

        fit = sum(d * sum(pc in allowed for pc in ch.pitch_classes[:3]) / 3.0 for ch, d in chords) / total
        share = sum(d for ch, d in chords if is_tonic(ch)) / total
        cadences = sum(is_dominant(a) and is_tonic(b) for (a, _), (b, _) in zip(chords[:-1], chords[1:]))
        score = (w["fit"] * fit + w["share"] * share + w["cadence"] * min(cadences, 2) / 2
                 + w["phrase_end"] * (np.mean([is_tonic(c) for c in ends]) if ends else 0.0)
                 + w["phrase_start"] * (np.mean([is_tonic(c) for c in starts]) if starts else 0.0)
                 + w["last"] * is_tonic(chords[-1][0]))
        if profile.sum() > 0:
            prof = np.roll(kk_major if key.mode == "major" else kk_minor, key.tonic)
            score += w["profile"] * float(np.corrcoef(prof, profile)[0, 1])
        scores[k] = score
    return scores


# ------------------------------------------------------------------------------ entry point


def analyse_song(audio: np.ndarray, sample_rate: int) -> SongAnalysis:
    """Analyse a song once: beat map, downbeats, chords per bar, key (see the module doc).

    Args:
        audio: float ``[channels, samples]`` or ``[samples]``, any level.
        sample_rate: Hz, a positive integer.

    Returns:
        SongAnalysis; ``duration_seconds`` and ``sample_rate`` are the input's.

    Raises:
        SongAnalysisError: bad audio or rate, silence (RMS below -80 dBFS), under 2 s, no beat.
    """
    mono = _mono(audio, sample_rate)
    duration = np.asarray(audio).shape[-1] / float(sample_rate)
    if duration < _MIN_SECONDS:
        raise SongAnalysisError(f"the song is {duration:.2f} s long: at least {_MIN_SECONDS:g} s is needed")
    if float(np.sqrt(np.mean(np.square(mono, dtype=np.float64)))) < _SILENCE_RMS:
        raise SongAnalysisError("the song is silent (RMS below -80 dBFS)")
    beats = _track_beats(mono)
    frames = _frame_chroma(mono)
    onset = librosa.onset.onset_strength(y=mono, sr=_SR, hop_length=_HOP, n_mels=16, fmax=300.0)
    beats, chroma, phase = _bar_grid(frames, beats, duration, onset)
    tracked_bpm = 60.0 / float(np.median(np.diff(beats)))
    if tracked_bpm >= _DOUBLE_MIN_BPM and len(beats) >= 4 * BEATS_PER_BAR and _changes_in_pairs(chroma, phase):
        beats, chroma, phase = _bar_grid(frames, beats[phase % 2::2], duration, onset)
    elif tracked_bpm < _HALF_MAX_BPM and _changes_mid_bar(chroma, phase):
        doubled = np.sort(np.concatenate((beats, 0.5 * (beats[1:] + beats[:-1]))))
        beats, chroma, phase = _bar_grid(frames, doubled, duration, onset)
    downbeat_beats = np.arange(phase, len(beats), BEATS_PER_BAR)
    # a bar counts when its downbeat has at least 3 of its beats in the song
    downbeats = [float(beats[i]) for i in downbeat_beats if i + BEATS_PER_BAR - 1 < len(beats)]
    if not downbeats:
        raise SongAnalysisError("the song is shorter than one bar")
    silence = max(_SILENCE_RMS, float(chroma.energy.max()) * 10 ** (-40 / 20))
    spans = _bar_chords(chroma, phase, len(downbeats), beats, silence)
    profile = chroma.treble.sum(axis=1) + chroma.bass.sum(axis=1)
    scores = _key_scores(spans, tuple(downbeats), profile)
    order = np.argsort(-scores)
    key = _KEYS[int(order[0])]
    confidence = float(np.clip((scores[order[0]] - scores[order[1]]) / 0.3, 0.0, 1.0))
    bpm = float(60.0 / np.median(np.diff(beats)))
    return SongAnalysis(duration_seconds=float(duration), sample_rate=int(sample_rate),
                        beats=tuple(float(t) for t in beats), downbeats=tuple(downbeats),
                        beats_per_bar=BEATS_PER_BAR, bpm=bpm, chords=tuple(spans), key=key.name,
                        key_confidence=confidence)
