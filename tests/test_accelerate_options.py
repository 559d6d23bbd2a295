"""finalize(..., accelerate=...)'s options and the compiled extension's switch and build folder
(guards a mutation probe of sparsify/deploy/accelerate found missing)."""
from __future__ import annotations

import os

import pytest
import torch


def test_the_extension_is_not_built_when_disabled_by_the_environment(monkeypatch):
    """SPARSIFY_DIRECT_CONV=0 makes direct_available() say so, whatever is already loaded."""
    from sparsify.deploy.accelerate import extension
    monkeypatch.setenv("SPARSIFY_DIRECT_CONV", "0")
    monkeypatch.setitem(extension._state, "tried", False)
    monkeypatch.setitem(extension._state, "why", None)
    assert extension.direct_available() == "disabled by SPARSIFY_DIRECT_CONV=0"


def test_each_torch_build_gets_its_own_extension_folder(monkeypatch):
    """Two torch builds of one version (CUDA / CPU wheels) never share a build folder."""
    from sparsify.deploy.accelerate import extension
    folders = set()
    for version in ("2.14.1+cu130", "2.14.1+cpu"):
        monkeypatch.setattr(torch, "__version__", version)
        folders.add(extension.build_directory())
    assert len(folders) == 2


def test_the_extension_is_built_under_torch_extensions_dir(monkeypatch, tmp_path):
    """TORCH_EXTENSIONS_DIR moves the build, as it does torch's own extensions (the docs say so);
    without it, the per-user cache folder torch uses."""
    from torch.utils.cpp_extension import get_default_build_root

    from sparsify.deploy.accelerate import extension
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert os.path.dirname(extension.build_directory()) == str(tmp_path)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert os.path.dirname(extension.build_directory()) == get_default_build_root()


def test_finalize_refuses_a_flag_for_a_tolerance_and_accelerates_own_arguments_as_options():
    """rtol=True is no tolerance; accelerate={"example_inputs": ...} names the key as no option."""
    from sparsify.deploy.finalize import check_options
    with pytest.raises(TypeError, match="rtol is a tolerance"):
        check_options(True, True, 1e-5, False, False)
    with pytest.raises(TypeError, match="accelerate has no option 'example_inputs'"):
        check_options(True, 1e-4, 1e-5, {"example_inputs": torch.ones(1)}, False)
