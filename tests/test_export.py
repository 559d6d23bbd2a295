"""Every built-in recipe finalizes to plain modules that torch.export and ONNX/onnxruntime run
with the sparse model's eval output (resnet18, mobilenet_v3_small, a ViT: its attention's
inference fast path has no ONNX export, and export_onnx failed on every ViT)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import sparsify
from sparsify.deploy.export import check_deployable, export_onnx, run_onnx
from sparsify.deploy.compare import outputs_close

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "vit": lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                       hidden_dim=32, mlp_dim=64, num_classes=10),
}
RECIPES = sorted(sparsify.builtin_recipes())
STEPS = 4


def _trained_a_little(model_name: str, recipe: str, x: torch.Tensor):
    """Sparsify and run the whole (short) schedule so every method reaches its final phase."""
    model = MODELS[model_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, recipe, total_steps=STEPS, example_inputs=x)
        opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-3)
        m.train()
        for _ in range(STEPS):
            loss = m(x).square().mean() + sparsify.penalty(m)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(m, loss=loss)
    return m


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model_name", MODELS)
def test_finalized_model_exports_and_runs_in_onnxruntime(model_name, recipe):
    x = torch.randn(2, 3, 32, 32)
    m = _trained_a_little(model_name, recipe, x)
    final = sparsify.finalize(m)
    m.eval()
    with torch.no_grad():
        expected = m(x)
    # plain torch modules only: no sparsify class survives finalize
    kept = ("PositionMask", "DeployedPositionMask")  # semi-structured's masks are the model's
    leftovers = {type(mod).__name__ for mod in final.modules()
                 if type(mod).__module__.startswith("sparsify") and type(mod).__name__ not in kept}
    assert not leftovers, f"{recipe}: finalize left sparsify modules {leftovers}"
    # the report's totals are the finalized model's (STR's thresholds counted as parameters: 21 too many)
    totals = sparsify.report(m).totals
    assert totals["params"] == sum(p.numel() for p in final.parameters())
    assert totals["nonzero_params"] == sum(int(p.count_nonzero()) for p in final.parameters())
    diffs = check_deployable(final, x, expected)
    assert set(diffs) == {"torch.export", "onnx"}


def test_onnx_batch_dimension_is_dynamic():
    x = torch.randn(2, 3, 32, 32)
    m = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "st3", begin=0, end=0, fix=None,
                          example_inputs=x)
    final = sparsify.finalize(m)
    blob = export_onnx(final, x)
    x5 = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ok, worst = outputs_close(final(x5), run_onnx(blob, x5)[0])
    assert ok, worst


def test_check_deployable_reports_a_wrong_reference():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with pytest.raises(AssertionError, match="torch.export output differs"):
        check_deployable(lin, x, reference=lin(x).detach() + 1.0)
