"""Text prompts that ask MusicGen for one isolated instrument at a tempo.

MusicGen (Copet et al. 2023, "Simple and Controllable Music Generation") is conditioned on a free
text description. It was trained on full mixes, so a stem prompt names the instrument as a solo,
isolated track and lists what must be absent; the tempo is written as "N bpm", the form its training
descriptions use. The model follows the tempo only roughly: tempo conform (stems.tempo) makes it exact.
"""

from __future__ import annotations

import re

#: What each stem asks for. Wording kept short: MusicGen's conditioner attends to every token.
STEM_DESCRIPTIONS: dict[str, str] = {
    "guitar": "solo electric guitar, isolated guitar track, no drums, no bass, no vocals",
    "bass": "solo bass guitar, isolated bass line, no drums, no guitar, no vocals",
    "drums": "solo drum kit, isolated drum track, steady beat, no bass, no guitar, no melody, no vocals",
}

#: Longest user text (style or prompt) kept, in characters.
MAX_TEXT_CHARS = 300

_SPACE = re.compile(r"\s+")


class UnknownStemError(ValueError):
    """The stem name is not one of STEM_DESCRIPTIONS."""


def _clean(text: str | None) -> str:
    if not text:
        return ""
    # Control characters and runs of whitespace carry nothing for the conditioner.
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return _SPACE.sub(" ", text).strip()[:MAX_TEXT_CHARS].strip(" ,")


def build_stem_prompt(stem: str, bpm: float, *, style: str | None = None,
                      prompt: str | None = None, harmony: str | None = None) -> str:
    """Return the MusicGen description for one stem.

    Args:
        stem: "guitar", "bass" or "drums".
        bpm: target tempo in BPM, written as "N bpm" (integers without decimals).
        style: genre or mood, for example "rock"; optional.
        prompt: the user's free text; optional.
        harmony: the plan's key and chords (stems.plan.MusicalPlan.prompt_text), for harmonic
            stems; drums ignore it (a drum kit has no key).

    Raises:
        UnknownStemError: for a stem without a description.

    Example:
        >>> build_stem_prompt("bass", 120, style="funk", prompt="slap")
        'funk, solo bass guitar, isolated bass line, no drums, no guitar, no vocals, slap, 120 bpm'
    """
    try:
        description = STEM_DESCRIPTIONS[stem]
    except KeyError:
        raise UnknownStemError(f"unknown stem {stem!r}; expected one of {sorted(STEM_DESCRIPTIONS)}") from None
    harmonic = stem in HARMONIC_STEMS
    parts = [_clean(style), description, _clean(prompt), _clean(harmony) if harmonic else "",
             f"{bpm:g} bpm"]
    return ", ".join(p for p in parts if p)


#: Stems that have a key and follow chords (the others are unpitched).
HARMONIC_STEMS = frozenset({"guitar", "bass"})

#: How each instrument is named in an ensemble description.
ENSEMBLE_NAMES: dict[str, str] = {"guitar": "electric guitar", "bass": "bass guitar", "drums": "drum kit"}


def build_ensemble_prompt(stems: list[str], bpm: float, *, style: str | None = None,
                          prompt: str | None = None, harmony: str | None = None) -> str:
    """Return the MusicGen description of one arrangement that plays every requested stem.

    Used by ensemble generation: the model writes the parts together (one performance) and
    source separation splits them afterwards. Instruments that were not requested are excluded
    by name, so the separated stems carry less bleed.

    Args:
        stems: the requested stems, e.g. ["guitar", "bass", "drums"].
        bpm: tempo, BPM. style, prompt: as for build_stem_prompt.
        harmony: the plan's key and chords (stems.plan.MusicalPlan.prompt_text).

    Raises:
        UnknownStemError: for a stem without a description.

    Example:
        >>> build_ensemble_prompt(["guitar", "drums"], 100, style="rock", harmony="in E minor")
        'rock, band playing electric guitar and drum kit, instrumental, no vocals, no bass, in E minor, 100 bpm'
    """
    unknown = [s for s in stems if s not in ENSEMBLE_NAMES]
    if unknown or not stems:
        raise UnknownStemError(f"unknown stems {unknown!r}; expected some of {sorted(ENSEMBLE_NAMES)}")
    names = [ENSEMBLE_NAMES[s] for s in stems]
    played = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    absent = ", ".join(f"no {s}" for s in ENSEMBLE_NAMES if s not in stems)
    parts = [_clean(style), f"band playing {played}", "instrumental, no vocals", absent,
             _clean(prompt), _clean(harmony), f"{bpm:g} bpm"]
    return ", ".join(p for p in parts if p)
