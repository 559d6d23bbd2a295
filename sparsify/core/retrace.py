"""A sparse layer met by another ``torch.fx`` tracer: refused with the ways out."""
from __future__ import annotations

import torch.fx as fx

from passes.example_answers import ExampleAnswers

__all__ = ["RETRACE", "refuse_retrace"]

RETRACE = ("sparsify: a sparsified model cannot be traced again by torch.fx (torchvision's create_feature_extractor, "
           "torch.fx.symbolic_trace, prepare_fx): trace the dense model and sparsify the result "
           "(sparsify.sparsify(create_feature_extractor(model, ...), recipe)), or trace sparsify.finalize(model)")


def refuse_retrace(x) -> None:
    """Raise when ``x`` is a value of a ``torch.fx`` trace other than fx-sparsify's own: a new graph
    of a sparse layer would freeze the computation its masks and thresholds change step by step
    (and tracing it fails deep inside on a branch otherwise).

    >>> import torch
    >>> refuse_retrace(torch.ones(1))
    >>> g = torch.fx.Graph()
    >>> refuse_retrace(torch.fx.Proxy(g.placeholder("x"), torch.fx.Tracer()))
    Traceback (most recent call last):
    ...
    RuntimeError: sparsify: a sparsified model cannot be traced again by torch.fx ...
    """
    if isinstance(x, fx.Proxy) and not isinstance(x.tracer, ExampleAnswers):
        raise RuntimeError(RETRACE)
