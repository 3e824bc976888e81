"""MusicGen's sampling settings and its next-token sampler, as data a captured step reads.

audiocraft's ``LMModel._sample_next_token`` takes the settings as Python numbers and branches on
them (greedy, top-p, top-k, plain). A CUDA graph cannot branch on the host or take a new Python
number, so here the settings are written into small device tensors before each replay
(``SamplingTensors.write``) and every branch is computed and one picked with ``torch.where``.
top-k is a rank threshold over the sorted probabilities (``torch.topk`` needs a Python ``k``):
the k-th largest probability read from a sort, which is the value ``torch.topk`` returns.

The arithmetic of each branch is audiocraft's (``audiocraft.utils.utils.sample_top_k``,
``sample_top_p``, ``multinomial``), with ``torch.multinomial`` replaced by the exponential race
it takes itself for one sample (``argmax(p / q)``, ``q ~ Exp(1)``): the same draws from the same
generator state give the same tokens (tests/stems/test_decoding.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """MusicGen sampling settings (audiocraft's ``set_generation_params`` / ``generate``
    arguments): top-k (0: off), top-p (0: off; wins over top-k), temperature (0: greedy),
    classifier-free guidance coefficient; ``use_sampling=False`` is greedy decoding."""

    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0
    use_sampling: bool = True

    @property
    def draws(self) -> bool:
        """Whether a step draws random numbers (audiocraft: ``use_sampling and temp > 0``)."""
        return self.use_sampling and self.temperature > 0.0


class SamplingTensors:
    """The settings of one generation as 0-d tensors on ``device`` (fixed addresses a captured
    step reads; ``write`` changes their values, never their storage)."""

    def __init__(self, device):
        import torch

        self.greedy = torch.zeros((), dtype=torch.bool, device=device)
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.top_p = torch.zeros((), dtype=torch.float32, device=device)
        self.top_k = torch.zeros((), dtype=torch.long, device=device)
        self.cfg_coef = torch.ones((), dtype=torch.float32, device=device)

    def write(self, params: SamplingParams, card: int) -> None:
        """Write ``params`` (top-k clamped to ``card``, as ``torch.topk`` would refuse more)."""
        self.greedy.fill_(not params.draws)
        self.temperature.fill_(params.temperature if params.temperature > 0 else 1.0)
        self.top_p.fill_(params.top_p)
        self.top_k.fill_(min(int(params.top_k), card))
        self.cfg_coef.fill_(params.cfg_coef)


def opmath(x, op, scalar):
    """``op(x, scalar)`` computed as a Python scalar would be: in float32, rounded once to
    ``x``'s dtype (a 0-d device tensor would otherwise be rounded to half first)."""
    import torch

    if x.dtype == torch.float32:
        return op(x, scalar)
    return op(x.float(), scalar).to(x.dtype)


def guide(cond, uncond, cfg_coef):
    """audiocraft's classifier-free guidance ``uncond + (cond - uncond) * cfg_coef`` with a
    tensor coefficient."""
    import operator

    return uncond + opmath(cond - uncond, operator.mul, cfg_coef)


def sample_next(logits, settings: SamplingTensors, noise):
    """Sample one token per row and codebook.

    Args:
        logits: ``[rows, codebooks, card]``, guidance already applied.
        settings: the generation's sampling tensors.
        noise: ``[rows, codebooks, card]`` Exp(1) draws to race with (ignored when greedy), in
            the probabilities' dtype (``probs_dtype``), as ``torch.multinomial`` draws them. Drawn outside a captured step, for the real rows only, so a padded batch's
            draws are those of the unpadded batch.

    Returns:
        int64 ``[rows, codebooks, 1]``.
    """
    import operator

    import torch

    greedy = torch.argmax(logits, dim=-1, keepdim=True)
    probs = torch.softmax(opmath(logits, operator.truediv, settings.temperature), dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    # top-p (audiocraft's sample_top_p): race over the sorted probabilities
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    kept = probs_sort * (~(probs_sum - probs_sort > settings.top_p)).to(probs.dtype)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    top_p = torch.gather(probs_idx, -1, torch.argmax(kept / noise, dim=-1, keepdim=True))
    # top-k (sample_top_k): keep what reaches the k-th largest probability, race in vocab order
    index = (settings.top_k - 1).clamp(min=0).view(1, 1, 1).expand(*probs.shape[:-1], 1)
    kth = torch.gather(probs_sort, -1, index)
    top_k = probs * (probs >= kth).to(probs.dtype)
    top_k = top_k / top_k.sum(dim=-1, keepdim=True)
    top_k = torch.argmax(top_k / noise, dim=-1, keepdim=True)
    plain = torch.argmax(probs / noise, dim=-1, keepdim=True)
    drawn = torch.where(settings.top_p > 0.0, top_p, torch.where(settings.top_k > 0, top_k, plain))
    return torch.where(settings.greedy, greedy, drawn)



def probs_dtype(precision: str, device_type: str):
    """The dtype of the probabilities audiocraft samples from under ``precision``'s autocast:
    the half type on CPU, float32 on CUDA (whose autocast runs softmax in float32).
    ``torch.multinomial`` draws its Exp(1) numbers in that dtype, so the race must too."""
    import torch

    from stems.precision import autocast, compute_dtype

    logits = torch.zeros((1, 2), dtype=compute_dtype(precision) or torch.float32, device=device_type)
    with autocast(precision, device_type):
        return torch.softmax(logits, dim=-1).dtype
