"""Real multi-sampled drum kits from Debian's ``hydrogen-drumkits`` package.

Each kit maps a drum voice (kick, snare, hat, open hat, ride, crash) to the sample files of that
voice, ordered soft -> hard so a hit's velocity picks a layer. Samples are trimmed so that their
first sample is the attack: a hit placed at time t then has its onset at t, which is what the
evaluation set's known onset times assume.
"""

from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass

import librosa
import numpy as np
import soundfile as sf

DRUMKIT_DIR = os.environ.get("STEMGEN_DRUMKIT_DIR", "/usr/share/hydrogen/data/drumkits")

# voice -> glob patterns, each pattern's matches sorted soft -> hard by the order given.
_KITS: dict[str, dict[str, list[str]]] = {
    "black-pearl": {  # acoustic Pearl DX, 5 velocity layers per voice
        "kick": [f"The Black Pearl 1.0/PearlKick-{v}.wav" for v in ("Soft", "Med", "Hard", "Hardest")],
        "snare": [f"The Black Pearl 1.0/PearlSnare-{v}.wav" for v in ("Soft", "Med", "Hard", "Hardest")],
        "hat": [f"The Black Pearl 1.0/SabianHatClosed-{v}.wav" for v in ("Softest", "Soft", "Med", "Hard")],
        "open": [f"The Black Pearl 1.0/SabianHatOpen-{v}.wav" for v in ("Soft", "Med")],
        "ride": [f"The Black Pearl 1.0/PaisteRide-{v}.wav" for v in ("Soft", "Med", "Hard")],
        "crash": ["The Black Pearl 1.0/SabianCrash-Hard.wav"],
    },
    "colombo": {  # acoustic, multi-mic stereo
        "kick": ["ColomboAcousticDrumkit/bassdrum-4mics-br-stereo-soft2.flac",
                 "ColomboAcousticDrumkit/bassdrum-4mics-br-stereo-normal3.flac"],
        "snare": ["ColomboAcousticDrumkit/snare-opaque-normal-mic-normal_shot2.flac",
                  "ColomboAcousticDrumkit/snare-opaque-normal-mic-normal_shot3.flac",
                  "ColomboAcousticDrumkit/snare-opaque-normal-mic-rimshot2.flac"],
        "hat": ["ColomboAcousticDrumkit/hihat-closed-1.flac", "ColomboAcousticDrumkit/hihat-closed-4.flac",
                "ColomboAcousticDrumkit/hihat-closed-6.flac"],
        "open": ["ColomboAcousticDrumkit/hihat-semi-open-1.flac"],
        "ride": ["ColomboAcousticDrumkit/crash20i__ride4.flac"],
        "crash": ["ColomboAcousticDrumkit/crash16i__crash1.flac"],
    },
    "millo": {
        "kick": [f"Millo_MultiLayered2/bd_0{i}.flac" for i in (1, 2, 3, 4, 5)],
        "snare": [f"Millo_MultiLayered2/rsnare_0{i}.flac" for i in (1, 2, 3, 4, 5)],
        "hat": [f"Millo_MultiLayered2/hhclosed_0{i}.flac" for i in (1, 2, 3, 4, 5)],
        "open": ["Millo_MultiLayered2/hhopen_01.flac"],
        "ride": [f"Millo_MultiLayered2/ride_0{i}.flac" for i in (1, 2, 3)],
        "crash": ["Millo_MultiLayered2/crash_03.flac"],
    },
    "bja-pacific": {
        "kick": [f"BJA_Pacific/BD_0{i}.aiff" for i in range(1, 9)],
        "snare": [f"BJA_Pacific/SN_0{i}.aiff" for i in range(1, 9)],
        "hat": [f"BJA_Pacific/HH_0{i}.aiff" for i in range(1, 9)],
        "open": ["BJA_Pacific/HH2_05.aiff"],
        "ride": [f"BJA_Pacific/RD_0{i}.aiff" for i in range(1, 6)],
        "crash": ["BJA_Pacific/RD2_05.aiff"],
    },
    "electric-empire": {  # electronic
        "kick": ["ElectricEmpireKit/EE_Kick_Lite_1.flac", "ElectricEmpireKit/EE_Kick_Hard_1.flac"],
        "snare": ["ElectricEmpireKit/EE_Snare_1.flac", "ElectricEmpireKit/EE_Clap_Hard.flac"],
        "hat": ["ElectricEmpireKit/EE_Hat_Cl_Bs.flac", "ElectricEmpireKit/EE_Hat_Cl_Dirty.flac"],
        "open": ["ElectricEmpireKit/EE_Hat_Op_Dirty.flac"],
        "ride": ["ElectricEmpireKit/EE_Hat_Ring_1.flac"],
        "crash": ["ElectricEmpireKit/EE_Hat_Ring_2.flac"],
    },
    "hard-electro": {
        "kick": ["HardElectro1/HardHse_K_02.flac", "HardElectro1/PowR_BD_1.flac"],
        "snare": ["HardElectro1/Clap_1.flac", "HardElectro1/PowR_SN_1.flac"],
        "hat": ["HardElectro1/CHH_1.flac", "HardElectro1/Hard_CHH_01.flac"],
        "open": ["HardElectro1/Hard_Hse_OHH_1.flac"],
        "ride": ["HardElectro1/PowR_HH_2.flac"],
        "crash": ["HardElectro1/Hard_Hse_OHH_1.flac"],
    },
    "varibreaks": {
        "kick": ["VariBreaks/VP Kick 1.flac", "VariBreaks/VP Kick 2.flac"],
        "snare": ["VariBreaks/VP Snare 1.flac", "VariBreaks/VP Snare 2.flac"],
        "hat": ["VariBreaks/VP Hat 1 Cl.flac", "VariBreaks/VP Hat 2 Cl.flac"],
        "open": ["VariBreaks/VP Hat 1 Op.flac"],
        "ride": ["VariBreaks/VP Hat 3 Cl.flac"],
        "crash": ["VariBreaks/VP Hat 1 Op.flac"],
    },
}

ACOUSTIC_KITS = ("black-pearl", "colombo", "millo", "bja-pacific")
ELECTRONIC_KITS = ("electric-empire", "hard-electro", "varibreaks")


class DrumKitMissing(RuntimeError):
    """The hydrogen-drumkits package is not installed (run bench/tempo/prepare.sh)."""


@dataclass(frozen=True)
class DrumKit:
    name: str
    sample_rate: int
    voices: dict[str, list[np.ndarray]]  # voice -> layers soft..hard, each mono float32 [samples]

    def hit(self, voice: str, velocity: float) -> np.ndarray:
        """Sample for ``voice`` at ``velocity`` in 0..1, scaled by velocity (mono, float32)."""
        layers = self.voices[voice]
        index = min(len(layers) - 1, int(velocity * len(layers)))
        return layers[index] * np.float32(0.35 + 0.65 * velocity)


def kit_names() -> tuple[str, ...]:
    return tuple(_KITS)


def _trim_to_attack(sample: np.ndarray) -> np.ndarray:
    """Drop leading near-silence so that sample index 0 is the attack."""
    peak = float(np.max(np.abs(sample))) if sample.size else 0.0
    if peak == 0.0:
        return sample
    above = np.flatnonzero(np.abs(sample) > peak * 0.03)
    start = max(0, int(above[0]) - 8)
    out = sample[start:].copy()
    fade = min(len(out), 8)
    out[:fade] *= np.linspace(0.0, 1.0, fade, endpoint=False, dtype=np.float32)
    return out


@functools.lru_cache(maxsize=32)
def load_kit(name: str, sample_rate: int) -> DrumKit:
    """Load kit ``name`` resampled to ``sample_rate`` Hz. Raises DrumKitMissing if not installed."""
    spec = _KITS[name]
    voices: dict[str, list[np.ndarray]] = {}
    for voice, patterns in spec.items():
        layers = []
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(DRUMKIT_DIR, pattern))):
                data, sr = sf.read(path, dtype="float32", always_2d=True)
                mono = data.mean(axis=1)
                if sr != sample_rate:
                    mono = librosa.resample(mono, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq")
                mono = _trim_to_attack(mono.astype(np.float32))
                layers.append(mono / max(1e-6, float(np.max(np.abs(mono)))))
        if not layers:
            raise DrumKitMissing(f"no samples for {name}/{voice} under {DRUMKIT_DIR}; "
                                 "install Debian's hydrogen-drumkits (bench/tempo/prepare.sh)")
        voices[voice] = layers
    return DrumKit(name=name, sample_rate=sample_rate, voices=voices)
