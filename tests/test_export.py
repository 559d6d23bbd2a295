"""Every built-in recipe finalizes to plain modules that torch.export and ONNX/onnxruntime run
with the sparse model's eval output (resnet18, mobilenet_v3_small)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import sparsify
from sparsify.deploy.export import check_deployable, export_onnx, run_onnx
from sparsify.deploy.compare import outputs_close

MODELS = ["resnet18", "mobilenet_v3_small"]
RECIPES = sorted(sparsify.builtin_recipes())
STEPS = 4


def _trained_a_little(model_name: str, recipe: str, x: torch.Tensor):
    """Sparsify and run the whole (short) schedule so every method reaches its final phase."""
    model = getattr(torchvision.models, model_name)(num_classes=10)
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
