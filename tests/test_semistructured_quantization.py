"""Quantizing a finalized semi-structured model: eager-mode torch.ao.quantization is refused in one
line naming FX graph mode, and FX graph mode, as docs/deployment.md shows it, keeps the masks."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision

pytest.importorskip("torch.ao.quantization.quantize_fx", reason="this torch has no torch.ao.quantization (deprecated "
                    "for torchao)")
from torch.ao import quantization as tq  # noqa: E402
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: E402

import sparsify
from sparsify.methods.semistructured import DeployedPositionMask

pytestmark = pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")

X = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def final():
    torch.manual_seed(0)
    m = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "semi-structured", example_inputs=X,
                          begin=0, end=0, sparsity=0.3)
    return sparsify.finalize(m.eval(), example_inputs=X)


def test_eager_quantization_is_refused_in_one_line_naming_fx_graph_mode(final):
    """The converted model failed inside torch, 'empty_strided not supported on quantized
    tensors', at the mask's multiply."""
    wrapped = tq.QuantWrapper(copy.deepcopy(final))
    wrapped.qconfig = tq.get_default_qconfig("x86")
    prepared = tq.prepare(wrapped)
    prepared(X)  # calibration runs in float
    quantized = tq.convert(prepared)
    with pytest.raises(RuntimeError, match=r"^PositionMask: conv1's output is quantized: eager-mode quantization "
                                           r"\(torch.ao.quantization prepare/convert\) .* use FX graph mode"):
        quantized(X)


def test_fx_graph_mode_quantization_keeps_the_masks(final):
    config = PrepareCustomConfig().set_non_traceable_module_classes([DeployedPositionMask])
    prepared = prepare_fx(copy.deepcopy(final), tq.get_default_qconfig_mapping("x86"), (X,),
                          prepare_custom_config=config)
    prepared(X)
    quantized = convert_fx(prepared)
    seen = {}
    quantized.conv1_pmask.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    with torch.no_grad():
        out, want = quantized(X), final(X)
    dropped = final.conv1_pmask.mask == 0
    assert bool(dropped.any()) and bool((seen["out"][:, :, dropped] == 0).all())
    assert float((out - want).abs().max()) < 0.2 * float(want.abs().max())  # 8-bit activations
