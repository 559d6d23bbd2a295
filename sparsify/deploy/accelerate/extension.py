"""The compiled operator library of the accelerated layers (``direct_conv.cpp``, its headers and
``max_pool.cpp`` beside this file): built on first use with ``torch.utils.cpp_extension.load``
(``-O3 -march=native -fopenmp``; cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``, in a folder of its own per Python and torch version), registered
as ``torch.ops.sparsify_direct``. Where it cannot be built, one warning says why and the layers
that need it stay dense. ``SPARSIFY_DIRECT_CONV=0`` never tries. See docs/deployment.md.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
import warnings

import torch

__all__ = ["EXTENSION_NAME", "direct_available", "build_directory"]

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


# a build takes about a minute; a lock this much older was left by a build that was killed
_STALE_LOCK_S = 15 * 60


def build_directory() -> str:
    """Where the library is built and cached: a folder per Python and torch version under
    ``TORCH_EXTENSIONS_DIR`` (torch's own cache folder is per Python and CUDA version only, so
    two environments with different torches would load each other's build).

    >>> os.path.basename(build_directory()).startswith("sparsify_direct_conv-py3")
    True
    """
    from torch.utils.cpp_extension import get_default_build_root
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    tag = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    # torch's load() reads TORCH_EXTENSIONS_DIR before its default root; a build folder passed to it
    # is taken as it is, so the variable is read here
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return os.path.join(root, f"{EXTENSION_NAME}-{python}-torch{tag}")


def clear_stale_lock(folder: str, older_than_s: float = _STALE_LOCK_S) -> bool:
    """Remove ``folder``'s build lock when it is older than ``older_than_s``, saying so: a build
    killed mid-way (SIGKILL, a job's time limit) leaves it, and torch then waits on it forever.
    True when one was removed."""
    lock = os.path.join(folder, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return False
    if age <= older_than_s:
        return False
    try:
        os.remove(lock)
    except OSError:
        return False
    warnings.warn(f"removed {lock}, left {age / 60:.0f} minutes ago by a build of the direct sparse conv extension "
                  "that did not finish (a build takes about a minute); building again", RuntimeWarning, stacklevel=2)
    return True


def _build() -> None:
    """Compile (or take from the build cache) and load the operator library."""
    from torch.utils.cpp_extension import load
    folder = build_directory()
    os.makedirs(folder, exist_ok=True)
    clear_stale_lock(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No CUDA runtime is found" and similar, irrelevant here
        load(name=EXTENSION_NAME, sources=[_SOURCE, *_EXTRA_SOURCES], extra_cflags=_FLAGS, extra_ldflags=_LDFLAGS,
             build_directory=folder, is_python_module=False, verbose=False)


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
