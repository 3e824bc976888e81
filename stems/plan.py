"""The musical plan of one request: key, chord per bar, tempo, bar count.

Every stem of a request is generated against one plan so that guitar and bass agree: the plan's
wording goes into each text prompt (``MusicalPlan.prompt_text``) and, for a melody-conditioned
MusicGen, a synthetic rendition of its chords (``render_chords``) is the chroma condition
(audiocraft ``MusicGen.generate_with_chroma``).

Where the plan comes from (``make_plan``):

- key and chords in the request: taken as given (``source="request"``);
- chords only: the key is inferred from the chords (``infer_key``; ``source="request-chords"``);
- key only: a progression from ``STYLE_PROGRESSIONS`` for the style, transposed into the key
  (``source="style-table"``);
- neither: key and progression drawn from the seed (or the salt, e.g. the generation request id,
  when there is no seed) with SHA-256, so the same request gives the same plan in every process
  (``source="seed"``).

Progressions are written as Roman numerals over the key's scale (natural minor for minor keys):
upper case a major chord, lower case a minor chord, ``b``/``#`` alter the degree by a semitone,
suffixes ``7``, ``maj7``, ``°``/``dim``, ``+``/``aug``, ``sus2``, ``sus4``, ``5``. The tables hold the
common progressions of each genre (axis I-V-vi-IV, the 12-bar blues, I-vi-ii-V, Aeolian
i-VI-III-VII, Phrygian bII power chords, ...), each starting on the tonic chord.

Pitch classes are integers 0..11 with C = 0; names are spelled with sharps (``PITCH_CLASSES``).
Audio arrays are float32 ``[channels, samples]``; times are seconds, tempi BPM, rates Hz.
Dependencies: numpy.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PlanError",
    "InvalidKeyName",
    "InvalidChordName",
    "PITCH_CLASSES",
    "CHORD_INTERVALS",
    "STYLE_KEYWORDS",
    "STYLE_PROGRESSIONS",
    "Key",
    "Chord",
    "MusicalPlan",
    "parse_key",
    "parse_chord",
    "infer_key",
    "match_style",
    "progression_in_key",
    "make_plan",
    "render_chords",
]

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

#: Semitones above the root, root first, for each chord quality.
CHORD_INTERVALS: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "dim": (0, 3, 6),
    "aug": (0, 4, 8),
    "sus2": (0, 2, 7),
    "sus4": (0, 5, 7),
    "5": (0, 7),
}
# Canonical suffix of each quality in a chord name ("A" + "m7").
_QUALITY_SUFFIX = {"maj": "", "min": "m", "7": "7", "maj7": "maj7", "min7": "m7", "dim": "dim",
                   "aug": "aug", "sus2": "sus2", "sus4": "sus4", "5": "5"}
_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}  # minor: natural (Aeolian)
_LETTERS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_ACCIDENTALS = {"": 0, "#": 1, "♯": 1, "b": -1, "♭": -1}

_MAX_NAME_CHARS = 32
_MAX_CHORDS = 64

# Chord suffixes as written by people, matched after the root (and before "/bass"). Case
# matters only for "M" (major) against "m" (minor), as in lead sheets.
_CHORD_SUFFIXES: dict[str, str] = {
    "": "maj", "M": "maj", "maj": "maj", "major": "maj",
    "m": "min", "min": "min", "minor": "min", "-": "min",
    "7": "7", "dom7": "7",
    "maj7": "maj7", "M7": "maj7", "Δ": "maj7", "Δ7": "maj7", "major7": "maj7",
    "m7": "min7", "min7": "min7", "-7": "min7", "minor7": "min7",
    "dim": "dim", "°": "dim", "o": "dim",
    "aug": "aug", "+": "aug",
    "sus2": "sus2",
    "sus4": "sus4", "sus": "sus4",
    "5": "5",
}
_CHORD_SUFFIXES_LOWER = {k.lower(): v for k, v in _CHORD_SUFFIXES.items() if k not in ("M", "M7")}

_KEY_MODES = {"": "major", "maj": "major", "major": "major", "ionian": "major",
              "m": "minor", "min": "minor", "minor": "minor", "aeolian": "minor"}
_NOTE = re.compile(r"^([A-Ga-g])([#♯b♭]?)(.*)$")
_SPACES = re.compile(r"[\s_]+")


class PlanError(ValueError):
    """A request's key or chords cannot be used. ``field`` names the request field
    ("parameters.key" or "parameters.chords") for the 422 answer."""

    field = "parameters"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        if field is not None:
            self.field = field


class InvalidKeyName(PlanError):
    """The key is not a tonic (A-G, optional #/b) followed by an optional major/minor mode."""

    field = "parameters.key"


class InvalidChordName(PlanError):
    """A chord is not root + known quality (+ optional "/bass"); the message names the chord and
    its index in the request's list."""

    field = "parameters.chords"


def _note(text: str) -> tuple[int, str] | None:
    """Pitch class of a leading note name and the rest of the text, or None."""
    m = _NOTE.match(text)
    if not m:
        return None
    letter, accidental, rest = m.groups()
    return (_LETTERS[letter.upper()] + _ACCIDENTALS[accidental]) % 12, rest


# --------------------------------------------------------------------------------------- keys

@dataclass(frozen=True)
class Key:
    """A major or natural-minor key."""

    tonic: int          # pitch class 0..11, C = 0
    mode: str           # "major" | "minor"

    def __post_init__(self):
        if (self.mode not in _SCALES or isinstance(self.tonic, bool)
                or not isinstance(self.tonic, (int, np.integer)) or not 0 <= self.tonic < 12):
            raise InvalidKeyName(f"no key with tonic {self.tonic!r} and mode {self.mode!r}")
        object.__setattr__(self, "tonic", int(self.tonic))   # numpy ints compare but do not JSON-encode

    @property
    def name(self) -> str:
        """"A minor", "F# major" (sharps, as in PITCH_CLASSES)."""
        return f"{PITCH_CLASSES[self.tonic]} {self.mode}"

    def pitch_classes(self) -> tuple[int, ...]:
        """The 7 scale degrees from the tonic up (natural minor for minor keys)."""
        return tuple((self.tonic + step) % 12 for step in _SCALES[self.mode])

    def relative(self) -> Key:
        """The relative key: same notes, other mode (A minor <-> C major)."""
        if self.mode == "minor":
            return Key((self.tonic + 3) % 12, "major")
        return Key((self.tonic + 9) % 12, "minor")


def parse_key(text: str) -> Key:
    """Parse a key name.

    Accepts a tonic letter, an optional accidental (#, b, ♯, ♭) and an optional mode ("major",
    "maj", "minor", "min", "m"; none means major), case-insensitive and with any spacing:
    "A minor", "a min", "Am", "F# major", "Gb major", "Bb", "C#m". Enharmonic spellings give the
    same key (Db major == C# major). A lone capital "M" ("CM") means major, as in chord symbols.

    Raises:
        InvalidKeyName: anything else (field "parameters.key").
    """
    if not isinstance(text, str) or not text.strip() or len(text) > _MAX_NAME_CHARS:
        raise InvalidKeyName(f"invalid key {text!r}: expected e.g. 'A minor', 'F# major', 'Bbm'")
    compact = _SPACES.sub(" ", text.strip()).replace("-", " ")
    parsed = _note(compact)
    if parsed is not None:
        tonic, rest = parsed
        rest = rest.strip()
        mode = "major" if rest == "M" else _KEY_MODES.get(rest.lower().replace(" ", ""))
        if mode is not None:
            return Key(tonic, mode)
    raise InvalidKeyName(f"invalid key {text!r}: expected e.g. 'A minor', 'F# major', 'Bbm'")


# ------------------------------------------------------------------------------------- chords

@dataclass(frozen=True)
class Chord:
    """One chord symbol, parsed."""

    root: int                          # pitch class
    quality: str                       # a key of CHORD_INTERVALS
    pitch_classes: tuple[int, ...]     # chord tones, root first; a slash bass outside them last
    name: str                          # canonical spelling: "Am", "F#", "G7", "A#maj7", "C/E"
    bass: int | None = None            # pitch class of a slash chord's bass note


def _chord(root: int, quality: str, bass: int | None = None) -> Chord:
    tones = tuple((root + i) % 12 for i in CHORD_INTERVALS[quality])
    name = PITCH_CLASSES[root] + _QUALITY_SUFFIX[quality]
    if bass is not None and bass != root:
        if bass not in tones:
            tones = tones + (bass,)
        name += "/" + PITCH_CLASSES[bass]
    else:
        bass = None
    return Chord(root=root, quality=quality, pitch_classes=tones, name=name, bass=bass)


def parse_chord(text: str) -> Chord:
    """Parse a chord symbol: root (A-G, optional #/b), quality, optional "/bass".

    Qualities: major ("", "M", "maj"), minor ("m", "min", "-"), "7", "maj7" ("M7", "Δ"), "m7"
    ("min7", "-7"), "dim" ("°", "o"), "aug" ("+"), "sus2", "sus4" ("sus"), "5" (power chord).
    Words are case-insensitive; "M" (major) and "m" (minor) are told apart by case.
    Examples: "Am", "F", "C#m7", "Gmaj7", "Bdim", "Esus4", "D5", "A7", "Ebm", "C/E".

    Raises:
        InvalidChordName: anything else (field "parameters.chords").
    """
    if not isinstance(text, str) or not text.strip() or len(text) > _MAX_NAME_CHARS:
        raise InvalidChordName(f"invalid chord {text!r}")
    compact = _SPACES.sub("", text.strip())
    symbol, _, bass_text = compact.partition("/")
    parsed = _note(symbol)
    bass_parsed = _note(bass_text) if "/" in compact else (None, "")
    if parsed is not None and bass_parsed is not None and not bass_parsed[1]:
        root, suffix = parsed
        quality = _CHORD_SUFFIXES.get(suffix) or _CHORD_SUFFIXES_LOWER.get(suffix.lower())
        if quality is not None:
            return _chord(root, quality, bass_parsed[0])
    raise InvalidChordName(f"invalid chord {text!r}: expected e.g. 'Am', 'F#', 'G7', 'Cmaj7', 'C/E'")


def _parse_chords(chords: list[str]) -> tuple[Chord, ...]:
    if isinstance(chords, (str, bytes)):
        # list("Am F") would be parsed letter by letter; say what is expected instead.
        raise InvalidChordName(f"chords must be a list of chord names, got the string {chords!r}")
    chords = list(chords)
    if len(chords) > _MAX_CHORDS:
        raise InvalidChordName(f"{len(chords)} chords: at most {_MAX_CHORDS}")
    parsed = []
    for i, text in enumerate(chords):
        try:
            parsed.append(parse_chord(text))
        except InvalidChordName:
            raise InvalidChordName(f"invalid chord {text!r} at index {i}: expected e.g. 'Am', "
                                   f"'F#', 'G7', 'Cmaj7', 'C/E'") from None
    return tuple(parsed)


_MAJOR_LIKE = frozenset({"maj", "7", "maj7", "aug", "sus2", "sus4", "5"})
_MINOR_LIKE = frozenset({"min", "min7", "dim", "sus2", "sus4", "5"})


def infer_key(chords: list[Chord] | tuple[Chord, ...]) -> Key:
    """The key that best explains a chord progression.

    Each of the 24 keys scores the mean over chords of the fraction of chord tones in the key's
    scale (0..1; a 4-note chord weighs no more than a triad), plus tonic evidence: +0.2 when the
    first chord's root is the key's tonic with a quality that fits the mode (major-like chord for
    a major key, minor-like for a minor key; power and sus chords fit both), +0.1 for the last
    chord, +0.05 when such a tonic chord occurs anywhere. This is the "diatonic fit + tonic at the
    ends" heuristic of rule-based harmonic analysis; it tells C major (C F G C) from A minor
    (Am F C G), which share every note, and keeps a 12-bar blues in C (C7 F7 G7) in C although
    C7's Bb belongs to F major. Ties go to major, then to the lower tonic (C first), so the answer
    is the same everywhere.

    Raises:
        ValueError: for an empty progression.
    """
    if not chords:
        raise ValueError("cannot infer a key from no chords")

    def fits(chord: Chord, key: Key) -> bool:
        return chord.root == key.tonic and chord.quality in (
            _MAJOR_LIKE if key.mode == "major" else _MINOR_LIKE)

    best: tuple[float, int, int] | None = None
    best_key = None
    for mode_rank, mode in enumerate(("major", "minor")):
        for tonic in range(12):
            key = Key(tonic, mode)
            scale = set(key.pitch_classes())
            score = sum(sum(pc in scale for pc in c.pitch_classes) / len(c.pitch_classes)
                        for c in chords) / len(chords)
            score += 0.2 * fits(chords[0], key) + 0.1 * fits(chords[-1], key)
            score += 0.05 * any(fits(c, key) for c in chords)
            rank = (-round(score, 9), mode_rank, tonic)
            if best is None or rank < best:
                best, best_key = rank, key
    assert best_key is not None
    return best_key


# ------------------------------------------------------------------------- style progressions

#: Words in a free-text style that select a progression table (matched at word starts).
STYLE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "rock": ("rock", "grunge", "punk", "garage", "indie", "alternative", "alt-rock", "stoner",
             "shoegaze", "britpop", "surf"),
    "pop": ("pop", "k-pop", "j-pop", "dance-pop", "synthpop", "top 40"),
    "blues": ("blues", "delta", "shuffle", "boogie"),
    "funk": ("funk", "disco", "slap"),
    "jazz": ("jazz", "bebop", "swing", "bossa", "fusion", "big band", "lounge"),
    "metal": ("metal", "djent", "thrash", "doom", "sludge", "hardcore", "metalcore", "deathcore",
              "nu-metal", "black metal", "death metal"),
    "folk": ("folk", "country", "bluegrass", "americana", "acoustic", "singer-songwriter",
             "celtic", "rockabilly", "western"),
    "electronic": ("electronic", "electro", "edm", "house", "techno", "trance", "synthwave",
                   "dubstep", "drum and bass", "dnb", "ambient", "lo-fi", "lofi", "chillwave",
                   "idm", "garage house", "dance", "trap"),
    "reggae": ("reggae", "ska", "dub", "dancehall", "rocksteady"),
    "soul": ("soul", "neo-soul", "r&b", "rnb", "r and b", "motown", "gospel", "rhythm and blues",
             "hip hop", "hip-hop", "boom bap"),
}

#: Common progressions per style and mode, in Roman numerals over the key's scale (see module doc).
STYLE_PROGRESSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    # Every progression starts on the tonic chord and is diatonic enough that infer_key() of its
    # chords gives back the key (tests/stems/test_plan.py checks both): a loop like vi-IV-I-V is
    # the same cycle as I-V-vi-IV but sounds like the relative minor from bar 1, and a plan whose
    # key the music contradicts prompts MusicGen with two keys at once.
    "default": {
        "major": ("I V vi IV", "I IV V IV", "I vi IV V", "I IV vi V"),
        "minor": ("i VI III VII", "i iv v i", "i VII VI VII", "i iv VI V"),
    },
    "rock": {
        "major": ("I IV V IV", "I bVII IV I", "I V vi IV", "I IV I V"),
        "minor": ("i VII VI VII", "i VI VII i", "i iv VII i", "i VI III VII"),
    },
    "pop": {
        "major": ("I V vi IV", "I vi IV V", "I IV vi V", "I iii IV V"),
        "minor": ("i VI III VII", "i VII VI VII", "i III VII VI", "i iv VI VII"),
    },
    "blues": {
        "major": ("I7 I7 I7 I7 IV7 IV7 I7 I7 V7 IV7 I7 V7",      # 12-bar
                  "I7 IV7 I7 I7 IV7 IV7 I7 I7 V7 IV7 I7 V7",      # quick change
                  "I7 I7 IV7 I7 V7 IV7 I7 V7"),                   # 8-bar
        "minor": ("i7 i7 i7 i7 iv7 iv7 i7 i7 VI7 V7 i7 V7",
                  "i7 iv7 i7 i7 iv7 iv7 i7 i7 VI7 V7 i7 V7",
                  "i7 i7 iv7 iv7 i7 VI7 V7 i7"),
    },
    "funk": {
        "major": ("I7 IV7 I7 I7", "I7 I7 IV7 I7", "I7 I7 ii7 V7", "I7 bVII7 IV7 I7"),
        "minor": ("i7 IV7", "i7 i7 iv7 i7", "i7 iv7", "i7 VII7 VI7 VII7"),   # i7 IV7: Dorian vamp
    },
    "jazz": {
        "major": ("Imaj7 vi7 ii7 V7", "Imaj7 Imaj7 ii7 V7", "Imaj7 IVmaj7 ii7 V7", "Imaj7 iii7 ii7 V7"),
        "minor": ("i7 i7 ii° V7", "i7 iv7 ii° V7", "i7 VImaj7 ii° V7"),
    },
    "metal": {
        "major": ("I5 IV5 V5 IV5", "I5 V5 IV5 I5", "I5 IV5 I5 V5"),
        "minor": ("i5 VI5 VII5 i5", "i5 i5 bII5 i5", "i5 VII5 VI5 V5", "i5 iv5 VI5 VII5"),
    },
    "folk": {
        "major": ("I IV I V", "I IV V I", "I V IV I", "I vi IV V"),
        "minor": ("i VII VI VII", "i iv i V", "i III VII i", "i VII i V"),
    },
    "electronic": {
        "major": ("I V vi IV", "I iii vi IV", "I IV vi V", "I vi IV V"),
        "minor": ("i VI III VII", "i VII VI VII", "i iv VI VII", "i i VI VII"),
    },
    "reggae": {
        "major": ("I IV I V", "I V IV V", "I IV V IV", "I vi IV V"),
        "minor": ("i iv i iv", "i VII i VII", "i VI VII i", "i iv v i"),
    },
    "soul": {
        "major": ("Imaj7 vi7 ii7 V7", "Imaj7 iii7 IVmaj7 V7", "I iii IV V", "Imaj7 IVmaj7 iii7 ii7"),
        "minor": ("i7 iv7 i7 VII7", "i7 VImaj7 iv7 V7", "i7 iv7 VImaj7 V7"),
    },
}

# Probability that a seed-drawn key is minor, per style (metal mostly minor, blues mostly major).
_MINOR_SHARE = {"default": 0.5, "rock": 0.45, "pop": 0.4, "blues": 0.25, "funk": 0.5, "jazz": 0.35,
                "metal": 0.85, "folk": 0.35, "electronic": 0.6, "reggae": 0.35, "soul": 0.45}

_NUMERAL = re.compile(r"^([b#]?)(VII|VI|IV|V|III|II|I|vii|vi|iv|v|iii|ii|i)(.*)$")
_DEGREES = {"i": 0, "ii": 1, "iii": 2, "iv": 3, "v": 4, "vi": 5, "vii": 6}
_NUMERAL_SUFFIX = {"": None, "7": "7", "maj7": "maj7", "°": "dim", "dim": "dim", "+": "aug",
                   "aug": "aug", "sus2": "sus2", "sus4": "sus4", "5": "5"}


def _style_pattern() -> tuple[re.Pattern, dict[str, str]]:
    words = {word: family for family, family_words in STYLE_KEYWORDS.items() for word in family_words}
    # A lookahead matches at every position (overlapping), and the alternation tries longer words
    # first, so each start yields its longest keyword.
    alternation = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(r"(?<![a-z0-9])(?=(" + alternation + "))"), words


_STYLE_PATTERN, _STYLE_FAMILY = _style_pattern()


@functools.lru_cache(maxsize=1024)
def match_style(style: str | None) -> str:
    """The STYLE_PROGRESSIONS table for a free-text style ("hard rock, gritty" -> "rock").

    The first comma/semicolon-separated phrase that names a genre decides; within it the last
    genre word wins, because the head of an English genre phrase comes last ("blues rock" is rock,
    "jazz funk" is funk); of keywords starting at the same place the longest wins ("dubstep" is
    electronic, not "dub"). No match: "default". (One compiled pattern and a cache: the gateway
    makes a plan for every request.)
    """
    if not style:
        return "default"
    for phrase in re.split(r"[,;/|]", style.lower()):
        best: tuple[int, int, str] | None = None
        for m in _STYLE_PATTERN.finditer(phrase):
            word = m.group(1)
            cand = (m.start(), len(word), _STYLE_FAMILY[word])
            if best is None or cand[:2] > best[:2]:
                best = cand
        if best is not None:
            return best[2]
    return "default"


def progression_in_key(numerals: str, key: Key) -> tuple[str, ...]:
    """Transpose a Roman-numeral progression ("i VI III VII") into ``key``: canonical chord names.

    Degrees count on the key's scale (natural minor for minor keys); case gives the third (upper
    major, lower minor); "b"/"#" lower/raise the degree a semitone; suffixes as in the module doc.

    Raises:
        ValueError: an unreadable numeral (a bug in a table, not a user error).
    """
    scale = _SCALES[key.mode]
    names = []
    for token in numerals.split():
        m = _NUMERAL.match(token)
        if m is None or m.group(3) not in _NUMERAL_SUFFIX:
            raise ValueError(f"unreadable Roman numeral {token!r} in {numerals!r}")
        accidental, numeral, suffix = m.groups()
        root = (key.tonic + scale[_DEGREES[numeral.lower()]] + _ACCIDENTALS[accidental]) % 12
        minor = numeral.islower()
        quality = _NUMERAL_SUFFIX[suffix]
        if quality is None:
            quality = "min" if minor else "maj"
        elif quality == "7" and minor:
            quality = "min7"
        names.append(_chord(root, quality).name)
    return tuple(names)


def _draw(material: str, label: str, n: int) -> int:
    """A number in [0, n) from SHA-256 of the material: the same in every process and Python
    version (``hash()`` of a str is salted per process)."""
    digest = hashlib.sha256(f"stemgen-plan-v1|{material}|{label}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


# --------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class MusicalPlan:
    """Key, chord per bar, tempo and length shared by every stem of one request."""

    key: Key
    progression: tuple[str, ...]       # the cycle of canonical chord names, e.g. ("Am", "F", "C", "G")
    chords: tuple[str, ...]            # one chord name per bar, len == bars
    bpm: float
    bars: int
    beats_per_bar: int = 4
    # where key and chords came from: "request" | "request-chords" | "style-table" | "seed"
    # ("source-audio" or any other text for plans made elsewhere)
    source: str = "request"

    def __post_init__(self):
        if not (isinstance(self.bpm, (int, float)) and math.isfinite(self.bpm) and self.bpm > 0):
            raise ValueError(f"bpm must be a positive number, got {self.bpm!r}")
        if not (isinstance(self.bars, int) and self.bars >= 1):
            raise ValueError(f"bars must be an integer >= 1, got {self.bars!r}")
        if not (isinstance(self.beats_per_bar, int) and self.beats_per_bar >= 1):
            raise ValueError(f"beats_per_bar must be an integer >= 1, got {self.beats_per_bar!r}")
        if len(self.chords) != self.bars or not self.progression:
            raise ValueError(f"{len(self.chords)} chords for {self.bars} bars")

    def chord_objects(self) -> tuple[Chord, ...]:
        """The parsed chord of each bar."""
        return tuple(parse_chord(name) for name in self.chords)

    def bar_seconds(self) -> float:
        """Length of one bar, seconds (quarter-note beats)."""
        return self.beats_per_bar * 60.0 / self.bpm

    def prompt_text(self) -> str:
        """Short MusicGen wording: "in A minor, chord progression Am F C G"."""
        return f"in {self.key.name}, chord progression {' '.join(self.progression)}"

    def to_dict(self) -> dict:
        """JSON-serialisable form (stored with the job, returned by GET /jobs/<id> and the callback)."""
        return {
            "key": self.key.name,
            "tonic": PITCH_CLASSES[self.key.tonic],
            "mode": self.key.mode,
            "bpm": float(self.bpm),
            "bars": self.bars,
            "time_signature": f"{self.beats_per_bar}/4",
            "progression": list(self.progression),
            "chords": list(self.chords),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> MusicalPlan:
        """Inverse of ``to_dict``.

        Raises:
            PlanError (InvalidKeyName, InvalidChordName) or ValueError: a malformed dict.
        """
        try:
            beats = int(str(d.get("time_signature", "4/4")).split("/")[0])
            progression = tuple(c.name for c in _parse_chords(d["progression"]))
            chords = tuple(c.name for c in _parse_chords(d["chords"]))
            key, bpm, bars = parse_key(d["key"]), float(d["bpm"]), int(d["bars"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed plan: {exc!r}") from None
        return cls(key=key, progression=progression, chords=chords, bpm=bpm, bars=bars,
                   beats_per_bar=beats, source=str(d.get("source", "request")))


def bars_for(duration_seconds: float, bpm: float, beats_per_bar: int = 4) -> int:
    """Whole bars closest to ``duration_seconds`` (seconds) at ``bpm`` (BPM), at least one."""
    bar_seconds = beats_per_bar * 60.0 / bpm
    return max(1, int(math.floor(duration_seconds / bar_seconds + 0.5)))


def make_plan(*, bpm: float, bars: int, beats_per_bar: int = 4, key: str | None = None,
              chords: list[str] | None = None, style: str | None = None, seed: int | None = None,
              salt: str = "") -> MusicalPlan:
    """Build the plan of one request (see the module doc for where key and chords come from).

    Args:
        bpm: tempo, BPM.
        bars: length in bars (>= 1); the progression is repeated or truncated to it.
        beats_per_bar: meter numerator (4 for 4/4).
        key: the request's key name (``parse_key``); None or blank: none given.
        chords: the request's chord names, one per bar, cycled (``parse_chord``); None or empty:
            none given.
        style: free-text style; picks the progression table (``match_style``).
        seed: the request's seed; picks the progression (and the key when none is given).
        salt: used instead of the seed when ``seed`` is None (e.g. the generation_request_id),
            so a request without a seed still gets the same plan on every retry.

    Raises:
        InvalidKeyName: bad ``key`` (field "parameters.key").
        InvalidChordName: bad chord; the message names it and its index (field "parameters.chords").
        ValueError: bpm, bars or beats_per_bar out of range.
    """
    parsed_key = parse_key(key) if key is not None and (not isinstance(key, str) or key.strip()) else None
    parsed_chords = _parse_chords(chords) if chords else ()
    family = match_style(style)
    material = f"seed:{int(seed)}" if seed is not None else f"salt:{salt}"

    if parsed_chords:
        progression = tuple(c.name for c in parsed_chords)
        source = "request" if parsed_key is not None else "request-chords"
        plan_key = parsed_key if parsed_key is not None else infer_key(parsed_chords)
    else:
        if parsed_key is not None:
            plan_key, source = parsed_key, "style-table"
        else:
            minor = _draw(material, "mode", 1000) < 1000 * _MINOR_SHARE[family]
            plan_key = Key(_draw(material, "tonic", 12), "minor" if minor else "major")
            source = "seed"
        table = STYLE_PROGRESSIONS[family][plan_key.mode]
        progression = progression_in_key(table[_draw(material, f"progression:{family}", len(table))],
                                          plan_key)
    bars = int(bars)
    per_bar = tuple(progression[i % len(progression)] for i in range(max(bars, 0)))
    return MusicalPlan(key=plan_key, progression=progression, chords=per_bar, bpm=float(bpm),
                       bars=bars, beats_per_bar=int(beats_per_bar), source=source)


# ------------------------------------------------------------------------------ chord render

_RENDER_OCTAVES = ((3, 0.7), (4, 1.0), (5, 0.5))   # (octave, weight): C3..B5, centred on C4
_BASS_OCTAVE, _BASS_WEIGHT = 2, 0.6
_ATTACK_SECONDS = 0.01
_RELEASE_SECONDS = 0.01


def _midi_hz(midi: np.ndarray | int) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0) / 12.0)


def render_chords(plan: MusicalPlan, sample_rate: int, *, seconds: float | None = None) -> np.ndarray:
    """A plain synthetic rendition of the plan's chords, one chord per bar at ``plan.bpm``.

    Each chord tone sounds as sines in three octaves (C3-B5, middle octave loudest) with the
    root (or slash bass) added in octave 2, struck on every beat: 10 ms linear attack, exponential
    decay (time constant half a beat), 10 ms release before the next beat. It carries the plan's
    pitch content without any timbre, which is what a chromagram condition needs (audiocraft
    ``MusicGen.generate_with_chroma`` takes the chroma of a waveform as the melody).

    Args:
        plan: the plan; bar i plays ``plan.chords[i]``; past ``plan.bars`` the chords repeat.
        sample_rate: Hz.
        seconds: length; default ``plan.bars * plan.bar_seconds()``.

    Returns:
        float32 ``[1, samples]``, peak 0.9 (0.0 when ``seconds`` is 0).

    Raises:
        ValueError: non-positive sample rate or negative/non-finite ``seconds``.
    """
    if not (isinstance(sample_rate, (int, np.integer)) and sample_rate > 0):
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if seconds is None:
        seconds = plan.bars * plan.bar_seconds()
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
    total = int(round(seconds * sample_rate))
    out = np.zeros(total, dtype=np.float64)
    beat = 60.0 / plan.bpm
    chords = plan.chord_objects()
    bar_seconds = plan.bar_seconds()
    n_bars = math.ceil(total / (bar_seconds * sample_rate)) if total else 0
    # One beat's envelope, reused: sample positions are rounded per bar so bars do not drift.
    beat_len = int(round(beat * sample_rate))
    t = np.arange(beat_len) / sample_rate
    envelope = np.exp(-t / (0.5 * beat))
    envelope *= np.minimum(1.0, t / _ATTACK_SECONDS)
    envelope *= np.minimum(1.0, (beat_len - np.arange(beat_len)) / (_RELEASE_SECONDS * sample_rate))
    for bar in range(n_bars):
        start = int(round(bar * bar_seconds * sample_rate))
        end = min(total, int(round((bar + 1) * bar_seconds * sample_rate)))
        if end <= start:
            continue
        chord = chords[bar % len(chords)]
        partials = [(12 * (octave + 1) + pc, weight)
                    for pc in chord.pitch_classes for octave, weight in _RENDER_OCTAVES]
        bass = chord.bass if chord.bass is not None else chord.root
        partials.append((12 * (_BASS_OCTAVE + 1) + bass, _BASS_WEIGHT))
        midis, weights = np.array(partials).T
        tt = np.arange(start, end) / sample_rate
        tone = (weights[:, None] * np.sin(2 * np.pi * _midi_hz(midis)[:, None] * tt[None, :])).sum(axis=0)
        reps = np.resize(envelope, end - start) if beat_len else np.ones(end - start)
        out[start:end] = tone * reps
    peak = float(np.max(np.abs(out))) if total else 0.0
    if peak > 0:
        out *= 0.9 / peak
    return out.astype(np.float32)[None, :]
