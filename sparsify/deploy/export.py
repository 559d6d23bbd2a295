"""Export helpers for finalized models: ``torch.export``, ONNX, and an onnxruntime check.

``finalize`` already returns plain torch modules; these helpers make the deployment round trip
one call each and compare outputs with the same tolerance rule as ``finalize``.

ONNX export uses torch's TorchScript-based exporter (``dynamo=False``): it needs only ``onnx``
(the ``export`` extra), works offline, and takes well under a second for a ResNet-18. The newer
dynamo exporter additionally needs ``onnxscript``; pass ``dynamo=True`` to use it when installed.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings

import torch
from torch import nn

from passes.call_inputs import positional_inputs
from sparsify.core.modes import kept_modes
from sparsify.deploy.compare import outputs_close

__all__ = ["export_program", "export_onnx", "run_onnx", "check_deployable", "DeployCheck"]


def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _batch_shapes(inputs: tuple):
    """``dynamic_shapes`` for ``torch.export``: dimension 0 of every tensor input whose dimension 0
    is the batch (the first tensor input's) as ``Dim.AUTO`` (symbolic where the program allows it,
    fixed where the model fixes it), anything else static. ``None`` when the batch is 1, which
    torch.export specializes."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors or tensors[0].shape[0] < 2:
        return None
    batch, auto = tensors[0].shape[0], torch.export.Dim.AUTO
    return tuple({0: auto} if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch else None
                 for x in inputs)


def export_program(model: nn.Module, example_inputs, *,
                   dynamic_batch: bool = True) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model``'s eval forward on ``example_inputs``; the model is in
    the caller's mode again afterwards. ``dynamic_batch`` makes the batch (the first dimension of
    the tensor inputs that share the first input's) symbolic where the model allows it, as
    ``export_onnx`` does; an example batch of 1 fixes it (torch.export specializes sizes 0 and 1),
    which is warned.

    >>> import torch
    >>> ep = export_program(torch.nn.Linear(3, 2), torch.randn(2, 3))
    >>> tuple(ep.module()(torch.ones(5, 3)).shape)
    (5, 2)
    """
    inputs = _as_tuple(positional_inputs(model, example_inputs))
    shapes = _batch_shapes(inputs) if dynamic_batch else None
    if dynamic_batch and shapes is None and any(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        warnings.warn("export_program: an example batch of 1 fixes the exported program's batch size; "
                      "pass a batch of 2 or more for a symbolic batch (or dynamic_batch=False to silence this)",
                      stacklevel=2)
    with kept_modes(model, training=False), torch.no_grad():
        return torch.export.export(model, inputs, dynamic_shapes=shapes)


@contextlib.contextmanager
def _attention_unfused():
    """MultiheadAttention / TransformerEncoderLayer without their inference fast path, whose fused
    op (``aten::_native_multi_head_attention``) has no ONNX export: under ``no_grad`` in eval the
    layers take it, and a ViT failed to export."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike | None = None, *,
                opset: int = 17, dynamo: bool = False, dynamic_batch: bool = True) -> bytes:
    """Export ``model``'s eval forward to ONNX; returns the serialized model, also written to ``path``
    if given, and leaves the model in the caller's mode. ``dynamic_batch`` makes the first dimension of every input symbolic (``"batch"``); an
    output's dimensions are the ones the exporter derives from it (``"batch"`` where it is the batch,
    a symbol of its own for a concatenation's 2 x batch, a number where it does not depend on it).

    >>> import torch
    >>> blob = export_onnx(torch.nn.Linear(3, 2), torch.randn(1, 3))
    >>> blob[:2] != b""
    True
    """
    inputs = _as_tuple(positional_inputs(model, example_inputs))
    with kept_modes(model, training=False):
        return _write_onnx(model, inputs, path, opset, dynamo, dynamic_batch)


def _write_onnx(model: nn.Module, inputs: tuple, path, opset: int, dynamo: bool, dynamic_batch: bool) -> bytes:
    names = [f"input{i}" for i in range(len(inputs))]
    kwargs = {}
    if not dynamo:
        # named outputs: without them the exporter reads ``model.graph``, which on an fx GraphModule
        # is the fx graph, and fails
        from sparsify.deploy.compare import flatten_tensors
        with torch.no_grad(), _attention_unfused():
            n_out = len(flatten_tensors(model(*inputs)))
        kwargs["output_names"] = [f"output{i}" for i in range(n_out)]
        if dynamic_batch:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in names}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _attention_unfused():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its own deprecation
        torch.onnx.export(model, inputs, buf, opset_version=opset, input_names=names, dynamo=dynamo, **kwargs)
    blob = buf.getvalue()
    if path is not None:
        with open(path, "wb") as f:
            f.write(blob)
    return blob


def run_onnx(onnx_model: bytes | str | os.PathLike, inputs, threads: int | None = None) -> list[torch.Tensor]:
    """Run an ONNX model (bytes or a path) in onnxruntime's CPU provider on torch ``inputs``;
    returns the outputs as torch tensors.

    >>> import torch
    >>> lin = torch.nn.Linear(3, 2)
    >>> out = run_onnx(export_onnx(lin, torch.randn(1, 3)), torch.ones(4, 3))[0]
    >>> bool(torch.allclose(out, lin(torch.ones(4, 3)), atol=1e-6))
    True
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    src = onnx_model if isinstance(onnx_model, bytes) else os.fspath(onnx_model)
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), _as_tuple(inputs))}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


class DeployCheck(dict):
    """What :func:`check_deployable` found: ``{"torch.export": rel. diff, "onnx": rel. diff}``."""


def check_deployable(model: nn.Module, example_inputs, reference=None, *, rtol: float = 1e-4, atol: float = 1e-5,
                     onnx: bool = True) -> DeployCheck:
    """Export ``model`` with ``torch.export`` and to ONNX, run both, and compare each output with
    ``reference`` (default: ``model``'s own eval output) under ``finalize``'s tolerance rule
    (``allclose`` with ``atol`` scaled by the reference's largest magnitude). Raises
    ``AssertionError`` naming the path that differs; returns the largest relative differences.

    >>> import torch
    >>> sorted(check_deployable(torch.nn.Linear(3, 2), torch.randn(2, 3)))
    ['onnx', 'torch.export']
    """
    inputs = _as_tuple(positional_inputs(model, example_inputs))
    with kept_modes(model, training=False):
        return _check(model, inputs, reference, rtol, atol, onnx)


def _check(model: nn.Module, inputs: tuple, reference, rtol: float, atol: float, onnx: bool) -> DeployCheck:
    # a batch of 1 cannot be made symbolic (export_program warns); checking the fixed program is the check
    dynamic = _batch_shapes(inputs) is not None
    with torch.no_grad():
        expected = model(*inputs) if reference is None else reference
        got = export_program(model, inputs, dynamic_batch=dynamic).module()(*inputs)
    result = DeployCheck()
    ok, worst = outputs_close(expected, got, rtol, atol)
    if not ok:
        raise AssertionError(f"torch.export output differs (largest relative difference {worst:.3g})")
    result["torch.export"] = worst
    if onnx:
        outs = run_onnx(export_onnx(model, inputs), inputs)
        ok, worst = outputs_close(expected, outs if len(outs) > 1 else outs[0], rtol, atol)
        if not ok:
            raise AssertionError(f"onnxruntime output differs (largest relative difference {worst:.3g})")
        result["onnx"] = worst
    return result
