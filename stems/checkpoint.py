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

A melody checkpoint (``write_checkpoint(..., melody=True)``, after musicgen-melody:
``config/conditioner/chroma2music.yaml``) adds the ``self_wav`` chroma conditioner
(``ChromaStemConditioner``). That conditioner loads Demucs itself, through
``demucs.pretrained.get_model("htdemucs")``, which reads ``$TORCH_HOME/hub/checkpoints/<file>``
and downloads it when missing. So the directory also holds a TORCH_HOME (``<dir>/torch``) with a
tiny random-weight HTDemucs at that path (``write_tiny_demucs``), and the model is loaded inside
``melody_environment(dir)``, which points TORCH_HOME there for the duration of the load.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Literal

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


def lm_config(scale: Scale = "tiny", *, max_duration_seconds: float = 30.0,
              melody: bool = False) -> dict:
    """Resolved ``xp.cfg`` of a MusicGen language model of the given scale (see module doc).

    ``melody=True`` gives musicgen-melody's conditioning (``config/conditioner/chroma2music.yaml``):
    a ``self_wav`` chroma conditioner and the description, both prepended to the token sequence
    (no cross-attention), with the LUT text conditioner in place of T5.
    """
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
    config = {
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
    if melody:
        # config/conditioner/chroma2music.yaml, resolved (sample_rate: ${sample_rate}).
        config["classifier_free_guidance"] = {"training_dropout": 0.2, "inference_coef": 3.0}
        config["attribute_dropout"] = {"args": {"active_on_eval": False}, "text": {},
                                       "wav": {"self_wav": 0.5}}
        config["fuser"] = {
            "cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1,
            "sum": [], "prepend": ["self_wav", "description"], "cross": [], "input_interpolate": [],
        }
        config["conditioners"] = {
            "self_wav": {
                "model": "chroma_stem",
                "chroma_stem": {
                    "sample_rate": SAMPLE_RATE, "n_chroma": 12, "radix2_exp": 14, "argmax": True,
                    "match_len_on_eval": False, "eval_wavs": None, "n_eval_wavs": 100,
                    "cache_path": None,
                },
            },
            "description": config["conditioners"]["description"],
        }
    return config


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


@contextlib.contextmanager
def codec_deprecation_silenced() -> Iterator[None]:
    """Building audiocraft 1.3.0's codec (SEANet) calls ``torch.nn.utils.weight_norm``, which torch
    2.11 deprecates: a FutureWarning about audiocraft's code on every model build or load, nothing
    a user can act on. Only that warning is silenced (not thread-safe: warnings.catch_warnings;
    models are built and loaded at start-up)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r".*torch\.nn\.utils\.weight_norm.* is deprecated")
        yield


def write_checkpoint(directory: str | os.PathLike, scale: Scale = "tiny", *, seed: int = 0,
                     max_duration_seconds: float = 30.0, melody: bool = False) -> Path:
    """Write a random-weight MusicGen checkpoint that ``MusicGen.get_pretrained(directory)`` loads.

    Args:
        directory: created if missing; existing checkpoint files are overwritten.
        scale: "tiny" (about 1 MB, for tests), "small" (musicgen-small's 300M architecture) or
            "medium" (1.5B). small and medium use musicgen's full-size 32 kHz EnCodec.
        seed: torch RNG seed for the random weights (same seed → same files).
        max_duration_seconds: the model's ``dataset.segment_duration`` (MusicGen.max_duration).
        melody: give the model musicgen-melody's chroma conditioner (``generate_with_chroma``).
            The directory then also holds ``torch/`` (a TORCH_HOME with a tiny random-weight
            "htdemucs" for that conditioner); load it inside ``melody_environment(directory)``.

    Returns:
        The directory path.
    """
    import torch
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lm_cfg = lm_config(scale, max_duration_seconds=max_duration_seconds, melody=melody)
    comp_cfg = compression_config("tiny" if scale == "tiny" else "full")
    with contextlib.ExitStack() as stack:
        stack.enter_context(codec_deprecation_silenced())
        if melody:
            # Building the LM builds the ChromaStemConditioner, which loads "htdemucs" already.
            write_tiny_demucs(melody_torch_home(out), "htdemucs", seed=seed)
            stack.enter_context(melody_environment(out))
        torch.manual_seed(seed)
        lm = builders.get_lm_model(OmegaConf.create(copy.deepcopy(lm_cfg)))
    with codec_deprecation_silenced():
        compression = builders.get_compression_model(OmegaConf.create(copy.deepcopy(comp_cfg)))
    torch.save({"xp.cfg": lm_cfg, "best_state": lm.state_dict()}, out / "state_dict.bin")
    torch.save({"xp.cfg": comp_cfg, "best_state": compression.state_dict()},
               out / "compression_state_dict.bin")
    return out


def cache_dir() -> Path:
    """Where random-weight models made on first use are kept: ``$STEMGEN_CACHE_DIR``, else
    ``<tmp>/stemgen``."""
    return Path(os.environ.get("STEMGEN_CACHE_DIR") or Path(tempfile.gettempdir()) / "stemgen")


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding both audiocraft checkpoint files."""
    p = Path(path)
    return (p / "state_dict.bin").is_file() and (p / "compression_state_dict.bin").is_file()


# --- Demucs ---------------------------------------------------------------------------------------

#: Sources of the released HTDemucs bags (Rouard et al. 2023), in the models' output order.
DEMUCS_SOURCES: dict[str, tuple[str, ...]] = {
    "htdemucs": ("drums", "bass", "other", "vocals"),
    "htdemucs_6s": ("drums", "bass", "other", "vocals", "guitar", "piano"),
}

#: A tiny HTDemucs: the released models' layout (``conf/config.yaml`` ``htdemucs:`` section: STFT of
#: 4096, depth 4, kernel 8, stride 4, complex-as-channels, frequency embedding, cross-transformer),
#: 44.1 kHz stereo, with 4 channels instead of 48 and 2 transformer layers instead of 5: about
#: 0.1 M parameters, 0.3 MB on disk. Its cost is set by the spectrogram (fixed by the audio length,
#: not by the weights): 10 s of audio separates in about 2 s on one CPU thread.
_TINY_HTDEMUCS: dict = {
    "audio_channels": 2, "channels": 4, "growth": 2, "nfft": 4096, "depth": 4,
    "kernel_size": 8, "stride": 4, "time_stride": 2, "dconv_comp": 4,
    "t_layers": 2, "t_heads": 2, "t_hidden_scale": 2.0, "samplerate": 44100,
}

#: The released HTDemucs models' training segment, seconds (also the longest ``segment`` they take).
RELEASED_HTDEMUCS_SEGMENT = Fraction(39, 5)


def demucs_checkpoint_path(torch_home: str | os.PathLike, name: str = "htdemucs_6s") -> Path:
    """Where ``demucs.pretrained.get_model(name)`` reads (or downloads) ``name``'s model file.

    demucs 4.0.1 resolves a name through the bag list it ships (``demucs/remote/<name>.yaml``: the
    model signatures) and ``demucs/remote/files.txt`` (signature → URL), then calls
    ``torch.hub.load_state_dict_from_url``, which keeps the file as
    ``$TORCH_HOME/hub/checkpoints/<basename of the URL>`` and downloads only when it is missing
    (the hash in the name is checked on download only).

    Raises:
        ValueError: for a name that is not a single-model HTDemucs bag (``DEMUCS_SOURCES``).
    """
    if name not in DEMUCS_SOURCES:
        raise ValueError(f"no tiny Demucs for {name!r}; known: {', '.join(DEMUCS_SOURCES)}")
    import yaml
    from demucs import pretrained

    bag = yaml.safe_load((pretrained.REMOTE_ROOT / f"{name}.yaml").read_text())
    (signature,) = bag["models"]  # both bags hold one model
    # demucs's own parser of files.txt, so that the path follows demucs's layout.
    url = pretrained._parse_remote_files(pretrained.REMOTE_ROOT / "files.txt")[signature]
    return Path(torch_home) / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]


def write_tiny_demucs(torch_home: str | os.PathLike, name: str = "htdemucs_6s", *,
                      seed: int = 0, segment_seconds: float = 1.0,
                      released_size: bool = False) -> Path:
    """Write a random-weight, tiny HTDemucs where ``demucs.pretrained.get_model(name)`` finds it.

    With ``TORCH_HOME=torch_home`` (and no ``torch.hub.set_dir`` in force), ``get_model(name)``
    then loads it offline through demucs's own loading code. The file is demucs's model package
    (``demucs.states.serialize_model``: class, constructor arguments, half-precision state), the
    format of the released models; the model has the named model's sources, sample rate (44.1 kHz)
    and channels (stereo) — see ``_TINY_HTDEMUCS`` for its size.

    Args:
        torch_home: the TORCH_HOME directory; the file goes to ``<torch_home>/hub/checkpoints/``.
        name: "htdemucs" (drums, bass, other, vocals; what audiocraft's melody conditioner loads)
            or "htdemucs_6s" (those and guitar, piano).
        seed: torch RNG seed for the weights (the global RNG is left as it was).
        released_size: the released models' size instead (HTDemucs's default constructor: 48
            channels, 5 transformer layers, about 27 M parameters), for benchmarks: the cost of
            separation with random weights is that of the real model.
        segment_seconds: the model's training segment. HTDemucs pads every chunk it is given to
            this length and the cost is about proportional to the audio run, so 1 s (rather than
            the released models' 7.8 s, ``RELEASED_HTDEMUCS_SEGMENT``) keeps the short clips of
            tests cheap at no cost for long ones; pass 7.8 to reproduce the released chunking.

    Returns:
        The file written (replaced atomically if it existed).

    Raises:
        ValueError: for another name or a non-positive segment.
    """
    import torch
    from demucs.htdemucs import HTDemucs
    from demucs.states import serialize_model
    from omegaconf import OmegaConf

    target = demucs_checkpoint_path(torch_home, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if segment_seconds <= 0:
        raise ValueError("segment_seconds must be > 0")
    size = {"audio_channels": 2, "samplerate": 44100} if released_size else _TINY_HTDEMUCS
    kwargs = dict(size, segment=Fraction(segment_seconds).limit_denominator(1000))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HTDemucs(sources=list(DEMUCS_SOURCES[name]), **kwargs)
    # training_args is free-form metadata in the package; record what this model is.
    package = serialize_model(model, OmegaConf.create(
        {"stemgen": {"tiny_random_weights": True, "name": name, "seed": seed}}))
    fd, staging = tempfile.mkstemp(prefix=".tiny-", suffix=".th", dir=target.parent)
    os.close(fd)
    try:
        torch.save(package, staging)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target


@contextlib.contextmanager
def torch_home_environment(torch_home: str | os.PathLike) -> Iterator[Path]:
    """Set ``TORCH_HOME`` to ``torch_home`` for the ``with`` block, then restore it.

    torch.hub reads TORCH_HOME at each call, so model files (demucs's) load from there inside the
    block. Process-wide and not thread-safe: use it where models are loaded (worker start, tests).

    Raises:
        RuntimeError: when ``torch.hub.set_dir`` was called, which takes precedence over TORCH_HOME.
    """
    import torch.hub

    home = Path(torch_home)
    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    try:
        if Path(torch.hub.get_dir()) != home / "hub":
            raise RuntimeError(f"torch.hub.set_dir({torch.hub.get_dir()!r}) overrides TORCH_HOME")
        yield home
    finally:
        if previous is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = previous


def melody_torch_home(directory: str | os.PathLike) -> Path:
    """The TORCH_HOME inside a melody checkpoint directory (holds its tiny "htdemucs")."""
    return Path(directory) / "torch"


def melody_environment(directory: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Context manager to load a melody checkpoint written by ``write_checkpoint(melody=True)``::

        with melody_environment(directory):
            model = MusicGen.get_pretrained(str(directory))

    The ChromaStemConditioner loads "htdemucs" while the model is built and keeps it, so only the
    load needs the environment; generation does not. Harmless around a text checkpoint.
    """
    return torch_home_environment(melody_torch_home(directory))
