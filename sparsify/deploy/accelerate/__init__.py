"""CPU inference that gets faster from the sparsity: patch-skipping convs for semi-structured
activation masks, CSR/BSR for very sparse Linear and 1x1 conv layers, a compiled direct sparse
convolution for weight-sparse convs, max pools run channels-last in NCHW networks. See
docs/deployment.md.

>>> import torch
>>> from sparsify.deploy.accelerate import accelerate
>>> m = torch.nn.Sequential(torch.nn.Linear(32, 32))
>>> fast = accelerate(m, torch.randn(1, 32), decide="never")
>>> fast.acceleration.path_of("0")
'dense'
"""
from sparsify.deploy.accelerate.direct_conv import DirectSparseConv2d, direct_available, supports_direct
from sparsify.deploy.accelerate.convert import AccelerationError, accelerate, keep_mask_of
from sparsify.deploy.accelerate.fold import PositionFill, folded_conv
from sparsify.deploy.accelerate.gemm import onednn_available
from sparsify.deploy.accelerate.patch_conv import PatchSkipConv2d, fold_bn, supports_patch_skip
from sparsify.deploy.accelerate.pool import ChannelsLastMaxPool2d
from sparsify.deploy.accelerate.select import AccelerationReport, LayerPath
from sparsify.deploy.accelerate.sparse_linear import SparseConv1x1, SparseLinear, supports_sparse_linear

__all__ = ["accelerate", "AccelerationError", "AccelerationReport", "LayerPath", "keep_mask_of",
           "PatchSkipConv2d", "fold_bn", "supports_patch_skip", "SparseLinear", "SparseConv1x1",
           "supports_sparse_linear", "onednn_available", "PositionFill", "folded_conv", "DirectSparseConv2d",
           "direct_available", "supports_direct",
           "ChannelsLastMaxPool2d"]
