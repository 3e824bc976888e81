"""Tempo: beat analysis (``stems.beats``) and warping onto a grid (``stems.warping``).

The names callers have always imported from here are kept here.
"""

from stems.beats import TempoAnalysisError, TempoError, estimate_tempo
from stems.warping import (
    CONFIDENCE_THRESHOLD,
    ConformResult,
    TempoAnalysis,
    conform_file,
    conform_to_beats,
    conform_to_bpm,
)

__all__ = [
    "CONFIDENCE_THRESHOLD",
    "TempoError",
    "TempoAnalysisError",
    "TempoAnalysis",
    "ConformResult",
    "conform_to_bpm",
    "conform_to_beats",
    "conform_file",
    "estimate_tempo",
]
