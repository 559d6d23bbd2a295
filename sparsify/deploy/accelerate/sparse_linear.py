"""Linear and 1x1 conv layers whose weight is held as a CSR or BSR matrix (torch.sparse, MKL).

The sparse matrix is kept as its plain component tensors (row pointers, column indices,
values) so ``deepcopy``, ``state_dict`` and ``torch.load(weights_only=True)`` work (torch's
sparse CSR tensors cannot be deep-copied); the CSR/BSR tensor is a view over them, rebuilt lazily.

>>> import torch
>>> lin = torch.nn.Linear(8, 4)
>>> with torch.no_grad(): lin.weight[:, :6] = 0
>>> fast = SparseLinear.from_linear(lin, "csr")
>>> x = torch.randn(3, 8)
>>> bool(torch.allclose(fast(x), lin(x), atol=1e-6))
True
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.counted import CountedLayer, plain_conv2d, plain_linear
from sparsify.core.subclasses import own_forward_reason

__all__ = ["SparseLinear", "SparseConv1x1", "supports_sparse_linear"]


def supports_sparse_linear(module: nn.Module) -> str | None:
    """None when ``module`` (Linear, or a 1x1 Conv2d without padding and groups) can hold a
    sparse weight here, else why not.

    >>> supports_sparse_linear(torch.nn.Conv2d(4, 4, 3))
    'Conv2d with a 3x3 kernel (1x1 only)'
    """
    if own := own_forward_reason(module, nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d):
        return own
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if tuple(module.kernel_size) != (1, 1):
            return f"Conv2d with a {module.kernel_size[0]}x{module.kernel_size[1]} kernel (1x1 only)"
        if module.groups != 1:
            return "grouped 1x1 conv"
        if module.padding not in ((0, 0), 0, "valid"):
            return "padded 1x1 conv"
        return None
    return f"{type(module).__name__} (Linear or 1x1 Conv2d only)"


@contextlib.contextmanager
def _beta_quiet():
    """Without torch's "Sparse CSR tensor support is in beta state" warning, which the first
    compressed sparse tensor of a process raises: the library chose the layout, the user cannot
    act on it. Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Sparse \w+ tensor support is in beta", category=UserWarning)
        yield


class _SparseWeight(CountedLayer, nn.Module):
    """Holds an (out, in) weight as CSR (``blocksize`` None) or BSR components."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str = "csr",
                 blocksize: int | None = None):
        super().__init__()
        if layout not in ("csr", "bsr"):
            raise ValueError(f"layout must be 'csr' or 'bsr', got {layout!r}")
        if layout == "bsr":
            blocksize = blocksize or 16
            if weight.shape[0] % blocksize or weight.shape[1] % blocksize:
                raise ValueError(f"BSR blocks of {blocksize} do not tile a {tuple(weight.shape)} weight")
        self.layout, self.blocksize = layout, blocksize
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        with _beta_quiet():
            sp = w.to_sparse_csr() if layout == "csr" else w.to_sparse_bsr((blocksize, blocksize))
        self.register_buffer("crow_indices", sp.crow_indices().clone())
        self.register_buffer("col_indices", sp.col_indices().clone())
        self.register_buffer("values", sp.values().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.token_block: int | None = None  # rows of the input per sparse call (None: all); see matmul_rows
        self._cache = (None, None)

    def sparse_weight(self) -> torch.Tensor:
        """The CSR/BSR tensor over the component buffers (rebuilt when they change)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.crow_indices, self.col_indices, self.values))
        if self._cache[0] != key:
            make = torch.sparse_csr_tensor if self.layout == "csr" else torch.sparse_bsr_tensor
            with _beta_quiet():
                w = make(self.crow_indices, self.col_indices, self.values,
                         (self.out_features, self.in_features), check_invariants=False)
            self._cache = (key, w)
        return self._cache[1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = (None, None)
        return state

    def __deepcopy__(self, memo):
        import copy
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = (None, None) if k == "_cache" else copy.deepcopy(v, memo)
        return new

    def dense_weight(self) -> torch.Tensor:
        return self.sparse_weight().to_dense()

    def nnz(self) -> int:
        return self.values.numel()

    def matmul_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W.T + b`` for a 2-D (rows, in_features) ``x2``: computed as ``(W @ x2.T).T``
        because torch's CPU sparse kernels (MKL) take the sparse operand on the left. With
        ``token_block`` set, ``x2`` is taken that many rows at a time, so the dense operand of
        each sparse call stays in cache (measured: 3.1x faster for 3072->768 at 90%, 1576 rows).
        In one call the result is a transposed view of the (out_features, rows) tensor MKL writes;
        in row blocks it is contiguous."""
        if x2.device.type == "cpu" and x2.dtype not in (torch.float32, torch.float64):
            # torch's CPU sparse matmul has no half / bfloat16 kernels: a cast model computes densely
            return F.linear(x2, self.dense_weight().to(x2.dtype), None if self.bias is None else self.bias.to(x2.dtype))
        w = self.sparse_weight()
        tb = self.token_block
        bias = None if self.bias is None else self.bias.unsqueeze(1)
        if not tb or x2.shape[0] <= tb:
            return (torch.mm(w, x2.t()) if bias is None else torch.addmm(bias, w, x2.t())).t()
        # rows-major result and a contiguous (in, block) operand per call: a chain of sparse layers
        # (an MLP) then never hands MKL a strided operand it would copy (measured: 69 vs 83 ms
        # for a 768-3072-768 MLP at 1576 rows, 1 thread, against a (out, rows) result)
        y = x2.new_empty(x2.shape[0], self.out_features)
        for r0 in range(0, x2.shape[0], tb):
            xb = x2[r0:r0 + tb].t().contiguous()
            y[r0:r0 + tb].copy_((torch.mm(w, xb) if bias is None else torch.addmm(bias, w, xb)).t())
        return y

    def extra_repr(self) -> str:
        dens = self.nnz() / (self.out_features * self.in_features)
        return (f"{self.in_features}, {self.out_features}, layout={self.layout}"
                + (f", blocksize={self.blocksize}" if self.layout == "bsr" else "")
                + (f", token_block={self.token_block}" if self.token_block else "")
                + f", stored density={dens:.3f}")


class SparseLinear(_SparseWeight):
    """``nn.Linear`` equivalent with a CSR/BSR weight; any leading batch dimensions."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str = "csr", blocksize: int | None = None) -> "SparseLinear":
        return cls(linear.weight, linear.bias, layout, blocksize)

    def counted_as(self) -> tuple[nn.Linear, None]:
        """The Linear this sparse matrix computes (``sparsify.measure`` counts its multiplies)."""
        return plain_linear(self.dense_weight(), self.bias), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.matmul_rows(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)


class SparseConv1x1(_SparseWeight):
    """Bias-optional 1x1 ``nn.Conv2d`` (no padding, no groups, any stride) with a CSR/BSR weight.

    The output is channels-last memory (an NCHW-shaped view), like oneDNN's convs produce for
    channels-last input.
    """

    def __init__(self, weight, bias, layout="csr", blocksize=None, stride=1):
        super().__init__(weight.reshape(weight.shape[0], -1), bias, layout, blocksize)
        self.stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, layout: str = "csr", blocksize: int | None = None) -> "SparseConv1x1":
        why = supports_sparse_linear(conv)
        if why:
            raise ValueError(f"cannot hold this conv's weight as a sparse matrix: {why}")
        return cls(conv.weight, conv.bias, layout, blocksize, conv.stride)

    def counted_as(self) -> tuple[nn.Conv2d, None]:
        """The 1x1 conv this sparse matrix computes (``sparsify.measure`` counts its multiplies)."""
        w = self.dense_weight()
        return plain_conv2d(w.reshape(*w.shape, 1, 1), self.bias, self.stride), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        y = self.matmul_rows(rows)
        return y.reshape(n, h, w, self.out_features).permute(0, 3, 1, 2)
