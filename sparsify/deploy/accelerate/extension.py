"""The compiled operator library of the accelerated layers (``direct_conv.cpp``, its headers and
``max_pool.cpp`` beside this file): built on first use with ``torch.utils.cpp_extension.load``
(``-O3 -march=native -fopenmp``; cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), registered as ``torch.ops.sparsify_direct``. Where it cannot be
built, one warning says why and the layers that need it stay dense. ``SPARSIFY_DIRECT_CONV=0``
never tries. See docs/deployment.md.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

__all__ = ["EXTENSION_NAME", "direct_available"]

EXTENSION_NAME = "sparsify_direct_conv"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "direct_conv.cpp")
# built into the same library: the NCHW max pool that networks of direct convs use (pool.py)
_EXTRA_SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "max_pool.cpp")]
# -fopenmp: without it _OPENMP is undefined in the ATen headers and at::parallel_for runs its
# body on the calling thread only. The library then links the libgomp torch already loaded.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_state = {"tried": False, "why": None}  # why: None when the operator is loaded, else the reason
_lock = threading.Lock()


def _build() -> None:
    """Compile (or take from the build cache) and load the operator library."""
    from torch.utils.cpp_extension import load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No CUDA runtime is found" and similar, irrelevant here
        load(name=EXTENSION_NAME, sources=[_SOURCE, *_EXTRA_SOURCES], extra_cflags=_FLAGS, extra_ldflags=_LDFLAGS,
             is_python_module=False, verbose=False)


def _op_loaded() -> bool:
    try:
        return all(hasattr(torch.ops.sparsify_direct, op) for op in ("conv2d", "max_pool2d"))
    except (AttributeError, RuntimeError):
        return False


def direct_available() -> str | None:
    """None when the compiled operator is loaded (building it on the first call), else why not.
    The first failure warns once; later calls return the same reason without retrying.

    >>> direct_available() is None or isinstance(direct_available(), str)
    True
    """
    if _state["tried"]:  # settled: every forward asks, so no lock once the answer is known
        return _state["why"]
    with _lock:
        if not _state["tried"]:
            if os.environ.get("SPARSIFY_DIRECT_CONV", "1") == "0":
                _state["why"] = "disabled by SPARSIFY_DIRECT_CONV=0"
            else:
                try:
                    if not _op_loaded():
                        _build()
                    _state["why"] = None if _op_loaded() else "the built library registered no operator"
                except Exception as e:  # no compiler, no ninja, a failed compile: all mean "stay dense"
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    _state["why"] = f"the direct sparse conv extension could not be built ({first})"
                    warnings.warn(f"{_state['why']}; weight-sparse convs stay dense. It needs a C++ compiler "
                                  f"(g++) and ninja; see docs/deployment.md", RuntimeWarning, stacklevel=2)
            _state["tried"] = True  # last: a caller that skips the lock must see the final answer
        return _state["why"]
