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
                      prompt: str | None = None) -> str:
    """Return the MusicGen description for one stem.

    Args:
        stem: "guitar", "bass" or "drums".
        bpm: target tempo in BPM, written as "N bpm" (integers without decimals).
        style: genre or mood, for example "rock"; optional.
        prompt: the user's free text; optional.

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
    parts = [_clean(style), description, _clean(prompt), f"{bpm:g} bpm"]
    return ", ".join(p for p in parts if p)
