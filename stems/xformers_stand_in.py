"""A stand-in for ``xformers`` where the installed xformers cannot load on the installed torch.

Why: audiocraft imports ``xformers.ops`` at module level (``audiocraft.modules.transformer``), and
importing xformers loads its C++/CUDA extension (``xformers/_C.so``). The only xformers on PyPI
that installs next to torch 2.11 is 0.0.35, whose extension is built against torch 2.10: it cannot
load, and every process that imports audiocraft printed a six-line ``WARNING[XFORMERS]``.

What audiocraft uses of xformers with the ``torch`` attention backend (ATTENTION_BACKEND, the
default; ``audiocraft.modules.transformer.StreamingMultiheadAttention``) is pure Python:
``ops.unbind`` (``Tensor.unbind``) and ``ops.LowerTriangularMask``, whose presence alone makes
the attention causal (``scaled_dot_product_attention(..., is_causal=attn_mask is not None)``).
Nothing calls the extension. So where the installed build's extension does not match torch
(xformers' own ``cpp_lib.json`` names the torch it was built for), ``install`` registers this
module's ``ops`` as ``xformers.ops`` before audiocraft is imported, and the extension is never
loaded. Where a matching build is installed, the real xformers is used, unchanged.

``memory_efficient_attention`` (the ``xformers`` attention backend) raises here: it needs a build
of xformers that loads (stems.engine.StemEngine refuses ATTENTION_BACKEND=xformers first).
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path

#: Set on the stand-in modules.
MARKER = "__stemgen_stand_in__"


class LowerTriangularMask:
    """Marks causal self-attention (audiocraft passes it as ``attn_mask``; the torch backend only
    tests it for None)."""


def unbind(x, dim: int):
    """``x.unbind(dim)``: what ``xformers.ops.unbind`` computes (it adds a backward pass that
    keeps the views contiguous, unused in inference)."""
    return x.unbind(dim)


def memory_efficient_attention(*args, **kwargs):
    raise RuntimeError("xformers' memory-efficient attention needs an xformers build whose C++ "
                       "extension loads on this torch; use ATTENTION_BACKEND=torch")


def _base(version: str) -> str:
    return version.split("+", 1)[0]


def extension_loads() -> bool | None:
    """Whether the installed xformers' extension was built for the installed torch (read from
    xformers' ``cpp_lib.json`` without importing either); None when xformers is not installed."""
    spec = importlib.util.find_spec("xformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    build = Path(list(spec.submodule_search_locations)[0]) / "cpp_lib.json"
    try:
        built_for = json.loads(build.read_text())["version"]["torch"]
        installed = importlib.metadata.version("torch")
    except (OSError, ValueError, KeyError, TypeError, importlib.metadata.PackageNotFoundError):
        return False
    return _base(built_for) == _base(installed)


def active() -> bool:
    """Whether ``xformers`` in this process is the stand-in."""
    return bool(getattr(sys.modules.get("xformers"), MARKER, False))


def install() -> bool:
    """Register the stand-in as ``xformers`` and ``xformers.ops`` unless xformers is already
    imported or an xformers whose extension loads is installed; returns ``active()``."""
    if "xformers" in sys.modules or extension_loads():
        return active()
    package = types.ModuleType("xformers", "stemgen's stand-in (stems.xformers_stand_in)")
    package.__spec__ = importlib.machinery.ModuleSpec("xformers", None, is_package=True)
    package.__path__ = []
    ops = types.ModuleType("xformers.ops", "stemgen's stand-in (stems.xformers_stand_in)")
    ops.__spec__ = importlib.machinery.ModuleSpec("xformers.ops", None)
    for name in ("LowerTriangularMask", "unbind", "memory_efficient_attention"):
        setattr(ops, name, globals()[name])
    package.ops = ops
    setattr(package, MARKER, True)
    setattr(ops, MARKER, True)
    sys.modules["xformers"] = package
    sys.modules["xformers.ops"] = ops
    return True
