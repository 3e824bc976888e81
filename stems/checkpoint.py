"""MusicGen checkpoints with random weights, in audiocraft's own on-disk format.

A directory holding ``state_dict.bin`` (the language model) and ``compression_state_dict.bin`` (the
EnCodec tokenizer), each ``{"xp.cfg": <resolved config dict>, "best_state": <state_dict>}``, is what
``audiocraft.models.MusicGen.get_pretrained(dir)`` loads. Weights cannot be downloaded on the
machines we test on, so tests and benchmarks write such a directory themselves and load it through
the same code path as a real checkpoint.

The configuration keys are those of audiocraft 1.3.0's hydra configs (``config/model/lm/default.yaml``,
``config/model/lm/musicgen_lm.yaml``, ``config/model/lm/model_scale/*.yaml``,
``config/model/encodec/default.yaml``, ``config/model/encodec/encodec_large_nq4_s640.yaml``,
``config/solver/musicgen/default.yaml``), resolved. The text conditioner is a look-up table with
audiocraft's ``noop`` tokenizer instead of T5, which would download t5-base.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal

Scale = Literal["tiny", "small", "medium"]

#: transformer_lm sizes: ``model_scale/small.yaml`` (300M) and ``medium.yaml`` (1.5B); tiny is ours.
_LM_SCALES: dict[str, dict] = {
    "tiny": {"dim": 32, "num_heads": 2, "num_layers": 2, "card": 256},  # card ≥ top_k 250
    "small": {"dim": 1024, "num_heads": 16, "num_layers": 24, "card": 2048},
    "medium": {"dim": 1536, "num_heads": 24, "num_layers": 48, "card": 2048},
}

#: SEANet sizes: musicgen's 32 kHz EnCodec (``encodec_large_nq4_s640``), and a tiny one with the
#: same hop length (640 samples → 50 Hz frames at 32 kHz).
_SEANET_SCALES: dict[str, dict] = {
    "tiny": {"dimension": 32, "n_filters": 4, "lstm": 0},
    "full": {"dimension": 128, "n_filters": 64, "lstm": 2},
}

SAMPLE_RATE = 32000
N_Q = 4


def lm_config(scale: Scale = "tiny", *, max_duration_seconds: float = 30.0) -> dict:
    """Resolved ``xp.cfg`` of a MusicGen language model of the given scale (see module doc)."""
    size = _LM_SCALES[scale]
    transformer_lm = {
        # config/model/lm/default.yaml
        "dim": size["dim"], "num_heads": size["num_heads"], "num_layers": size["num_layers"],
        "hidden_scale": 4, "n_q": N_Q, "card": size["card"], "dropout": 0.0, "emb_lr": None,
        "activation": "gelu", "norm_first": True, "bias_ff": False, "bias_attn": False,
        "bias_proj": False, "past_context": None, "causal": True, "custom": False,
        "memory_efficient": True, "attention_as_float32": False, "layer_scale": None,
        "positional_embedding": "sin", "xpos": False, "checkpointing": "none",
        "weight_init": "gaussian", "depthwise_init": "current", "zero_bias_init": True,
        "norm": "layer_norm", "cross_attention": False, "qk_layer_norm": False,
        "qk_layer_norm_cross": False, "attention_dropout": None, "kv_repeat": 1,
        "two_step_cfg": False,
    }
    return {
        "device": "cpu",
        "dtype": "float32",
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "lm_model": "transformer_lm",
        "transformer_lm": transformer_lm,
        # config/model/lm/musicgen_lm.yaml
        "codebooks_pattern": {
            "modeling": "delay",
            "delay": {"delays": list(range(N_Q)), "flatten_first": 0, "empty_initial": 0},
        },
        # config/conditioner/text2music.yaml, with a LUT conditioner in place of T5
        "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {
            "cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1,
            "sum": [], "prepend": [], "cross": ["description"], "input_interpolate": [],
        },
        "conditioners": {
            "description": {
                "model": "lut",
                "lut": {"n_bins": 1024, "dim": size["dim"], "tokenizer": "noop"},
            }
        },
        "dataset": {"segment_duration": max_duration_seconds},
    }


def compression_config(scale: Literal["tiny", "full"] = "tiny") -> dict:
    """Resolved ``xp.cfg`` of the 32 kHz, 4-codebook EnCodec that MusicGen decodes with."""
    seanet = _SEANET_SCALES[scale]
    card = _LM_SCALES["tiny"]["card"] if scale == "tiny" else 2048
    return {
        "device": "cpu",
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "compression_model": "encodec",
        "encodec": {
            "autoencoder": "seanet", "quantizer": "rvq", "sample_rate": SAMPLE_RATE,
            "channels": 1, "causal": False, "renormalize": False,
        },
        "seanet": {
            "dimension": seanet["dimension"], "channels": 1, "causal": False,
            "n_filters": seanet["n_filters"], "n_residual_layers": 1, "ratios": [8, 5, 4, 4],
            "activation": "ELU", "activation_params": {"alpha": 1.0}, "norm": "weight_norm",
            "norm_params": {}, "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 7,
            "dilation_base": 2, "pad_mode": "constant", "true_skip": True, "compress": 2,
            "lstm": seanet["lstm"], "disable_norm_outer_blocks": 0,
            "decoder": {"trim_right_ratio": 1.0, "final_activation": None,
                        "final_activation_params": None},
            "encoder": {},
        },
        "rvq": {
            # kmeans_init off: codebooks start random, so random-weight models decode to sound
            # rather than to the constant output of all-zero codebooks.
            "n_q": N_Q, "q_dropout": False, "bins": card, "decay": 0.99, "kmeans_init": False,
            "kmeans_iters": 50, "threshold_ema_dead_code": 2, "orthogonal_reg_weight": 0.0,
            "orthogonal_reg_active_codes_only": False,
        },
    }


def write_checkpoint(directory: str | os.PathLike, scale: Scale = "tiny", *, seed: int = 0,
                     max_duration_seconds: float = 30.0) -> Path:
    """Write a random-weight MusicGen checkpoint that ``MusicGen.get_pretrained(directory)`` loads.

    Args:
        directory: created if missing; existing checkpoint files are overwritten.
        scale: "tiny" (about 1 MB, for tests), "small" (musicgen-small's 300M architecture) or
            "medium" (1.5B). small and medium use musicgen's full-size 32 kHz EnCodec.
        seed: torch RNG seed for the random weights (same seed → same files).
        max_duration_seconds: the model's ``dataset.segment_duration`` (MusicGen.max_duration).

    Returns:
        The directory path.
    """
    import torch
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    lm_cfg = lm_config(scale, max_duration_seconds=max_duration_seconds)
    comp_cfg = compression_config("tiny" if scale == "tiny" else "full")
    lm = builders.get_lm_model(OmegaConf.create(copy.deepcopy(lm_cfg)))
    compression = builders.get_compression_model(OmegaConf.create(copy.deepcopy(comp_cfg)))
    torch.save({"xp.cfg": lm_cfg, "best_state": lm.state_dict()}, out / "state_dict.bin")
    torch.save({"xp.cfg": comp_cfg, "best_state": compression.state_dict()},
               out / "compression_state_dict.bin")
    return out


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding both audiocraft checkpoint files."""
    p = Path(path)
    return (p / "state_dict.bin").is_file() and (p / "compression_state_dict.bin").is_file()
