"""What the export helpers promise beyond a round trip, on tiny models: each exports the eval forward
(a Dropout left in training mode exports and compares as in eval) and leaves every module in the
caller's mode, export_program's batch is symbolic as ONNX's is, the ONNX file's batch
dimension is symbolic on outputs as on inputs, the attention fast-path setting is the caller's
again afterwards, ``path`` is where the file goes, and ``check_deployable(onnx=False)`` runs no
ONNX."""
from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from torch import nn

from sparsify.deploy import export
from sparsify.deploy.export import check_deployable, export_onnx, export_program, run_onnx


def dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 3)).train()


def test_export_program_exports_the_eval_forward_of_a_model_left_in_training():
    """export_program exports what the model computes in eval mode, even if the user left it training."""
    m, x = dropout_net(), torch.randn(4, 6)
    got = export_program(m, x).module()(x)
    assert m.training, "export_program left the caller's model in eval mode"
    with torch.no_grad():
        assert torch.allclose(got, m.eval()(x), atol=1e-6), "the exported program dropped activations"


def test_every_export_helper_leaves_each_module_in_the_callers_mode():
    """Exporting mid-training must not freeze BatchNorm and switch Dropout off for the epochs after;
    a module the user put in eval on purpose (a frozen BatchNorm) stays in eval."""
    m = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    m[1].eval()
    before = [mod.training for mod in m.modules()]
    x = torch.randn(4, 6)
    for call in (lambda: export_program(m, x), lambda: export_onnx(m, x), lambda: check_deployable(m, x)):
        call()
        assert [mod.training for mod in m.modules()] == before


def test_export_program_batch_is_symbolic_like_onnx():
    """The exported program runs at another batch size than the example's, as the ONNX file does."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    m(torch.randn(2, 3, 6, 6))
    ep = export_program(m, torch.randn(2, 3, 6, 6))
    x = torch.randn(7, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), m(x), atol=1e-6)
    fixed = export_program(m, torch.randn(2, 3, 6, 6), dynamic_batch=False)
    with pytest.raises(Exception):
        fixed.module()(x)


def test_export_program_says_a_batch_of_one_fixes_the_batch():
    """torch.export specializes a size-1 dimension; the user who wanted a symbolic batch is told."""
    with pytest.warns(UserWarning, match="batch of 1 fixes"):
        export_program(nn.Linear(3, 2), torch.randn(1, 3))


class Scaled(nn.Module):
    """A scalar first input, the batch second, a table whose rows are not the batch third."""

    def forward(self, t, x, table):
        return t * x @ table.T


def test_export_program_makes_only_the_batch_symbolic_and_warns_only_a_batch_of_one():
    """The batch is that of the first input with a dimension (a 0-d scalar before it has none);
    another input whose first size is not the batch stays fixed; inputs without a dimension, and
    check_deployable's own batch-one export, are not warned about a batch."""
    t, table = torch.tensor(2.0), torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ep = export_program(Scaled(), (t, torch.randn(2, 3), table))
        export_program(nn.ReLU(), torch.tensor(1.0))
        check_deployable(nn.Linear(3, 2), torch.randn(1, 3), onnx=False)
    assert tuple(ep.module()(t, torch.randn(5, 3), table).shape) == (5, 4)
    with pytest.raises(Exception):
        ep.module()(t, torch.randn(5, 3), torch.randn(6, 3))


def test_check_deployable_compares_eval_outputs_of_a_model_left_in_training():
    """check_deployable on a model in training mode compares eval outputs, not one dropout draw with another."""
    m = dropout_net()
    found = check_deployable(m, torch.randn(4, 6), onnx=False)
    assert sorted(found) == ["torch.export"]  # onnx=False runs no ONNX
    assert found["torch.export"] < 1e-4


def test_check_deployable_without_onnx_never_exports_to_onnx(monkeypatch):
    """onnx=False does not touch the ONNX exporter (users without onnx installed rely on it)."""
    def refuse(*a, **k):
        raise AssertionError("export_onnx called")
    monkeypatch.setattr(export, "export_onnx", refuse)
    assert sorted(check_deployable(nn.Linear(3, 2), torch.randn(2, 3), onnx=False)) == ["torch.export"]


def test_onnx_outputs_have_the_symbolic_batch_of_the_inputs():
    """With dynamic_batch (the default), the ONNX graph's outputs are batch-symbolic like its inputs."""
    proto = onnx.load_from_string(export_onnx(nn.Linear(3, 2), torch.randn(1, 3)))
    dims = [v.type.tensor_type.shape.dim[0].dim_param for v in list(proto.graph.input) + list(proto.graph.output)]
    assert dims == ["batch", "batch"]


class _Reshaped(nn.Module):
    """Outputs whose first dimension is not the batch: twice it, a scalar, the features."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y = self.fc(x)
        return torch.cat([y, y]), y.sum(), y.t()


def test_onnx_names_batch_only_the_output_dimensions_that_are_the_batch():
    """Only dimensions that are the batch are named 'batch': a concatenation's 2 x batch gets a symbol
    of its own, a transpose keeps its fixed size first, and the outputs still run at another batch."""
    blob = export_onnx(_Reshaped(), torch.randn(1, 3))
    proto = onnx.load_from_string(blob)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.output]
    assert dims[0][0] not in ("batch", 1) and dims[0][1] == 2
    assert dims[1] == [] and dims[2] == [2, "batch"]
    assert [tuple(o.shape) for o in run_onnx(blob, torch.randn(5, 3))] == [(10, 2), (), (2, 5)]


@pytest.mark.parametrize("before", [False, True])
def test_export_onnx_gives_back_the_callers_attention_fast_path_setting(before):
    """export_onnx turns the attention fast path off for the export only: the caller's setting is kept."""
    keep = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(before)
        export_onnx(nn.Linear(3, 2), torch.randn(1, 3))
        assert torch.backends.mha.get_fastpath_enabled() is before
    finally:
        torch.backends.mha.set_fastpath_enabled(keep)


def test_export_onnx_writes_the_file_it_is_given(tmp_path):
    """The bytes export_onnx returns are the file it wrote at path."""
    path = tmp_path / "m.onnx"
    blob = export_onnx(nn.Linear(3, 2), torch.randn(1, 3), path)
    assert path.read_bytes() == blob
