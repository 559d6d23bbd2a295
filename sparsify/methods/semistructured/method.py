"""Semi-structured activation sparsity's recipe method: which convs it masks and the mask node it
inserts after each (:class:`SemiStructuredMethod`), with its params. The masks are made in
:mod:`~sparsify.methods.semistructured.mask` and scheduled by the group
(:mod:`~sparsify.methods.semistructured.group`); see the package docstring."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparsify.core.contract import Method, Site
from sparsify.core.params import Params, param
from sparsify.core.registry import register
# the group and the mask helpers lived here once: pickles made then name this module
from sparsify.methods.semistructured.group import SemiStructuredGroup
from sparsify.methods.semistructured.mask import DeployedPositionMask, PositionMask, position_mask
from sparsify.methods.semistructured.resolution import input_size_of

__all__ = ["PositionMask", "DeployedPositionMask", "SemiStructuredGroup", "SemiStructuredMethod", "position_mask",
           "input_size_of"]


@dataclass
class SemiStructuredParams(Params):
    ramp_end = True
    sparsity: float = param(0.2, "Final fraction of masked output positions.", ge=0, lt=1, what="a fraction in [0, 1)")
    begin: float = param(0.1, "Step where the masking ramp starts.", time=True)
    end: float | None = param(0.9, "Step where the ramp reaches `sparsity`.", time=True)
    power: float = param(2, "Exponent of the polynomial ramp.", gt=0)
    skip_1x1: bool = param(True, "Leave 1x1 convolutions unmasked (as the official example does).")
    seed: int = param(0, "Seed of the random masks (the same on every rank).")
    stage: str | None = param(None, "Name of a recipe stage whose range replaces begin/end (null: none).")


@register
class SemiStructuredMethod(Method):
    """Recipe method ``semi-structured`` (docs/methods/semistructured.md); params
    (:class:`SemiStructuredParams`):

    * ``sparsity`` (0.2): final fraction of masked output positions, reached by a polynomial ramp
      of exponent ``power`` (2) from ``begin`` (0.1) to ``end`` (0.9), or over ``stage``;
    * ``skip_1x1`` (true): 1x1 convs stay unmasked; ``seed`` (0): seed of the random masks.
    """

    name = "semi-structured"
    own_forward = "keep"  # the mask node follows the conv, which stays as it is
    description = "Semi-structured activation sparsity: random output-position masks after convs (ICCV-W 2023)"
    needs_example_inputs = True  # masks are sized from the input resolution at build time
    site = "module"
    inserts_after = True  # the mask node after the conv's call
    # said by the finalized model's save_pretrained, with what from_pretrained does with it
    deploy_layout = ("semi-structured's position masks, modules of their own after the masked convs (from_pretrained "
                     "drops them silently: the outputs change)")
    targets = (nn.Conv2d,)
    tied_weights = "keep"  # the conv keeps its weight; masks go after it
    Params = SemiStructuredParams
    group_class = SemiStructuredGroup

    def accepts(self, site: Site) -> str | None:
        why = super().accepts(site)
        if why:
            return why
        skip = site.params.get("skip_1x1", self.params["skip_1x1"])
        if skip and tuple(site.module.kernel_size) == (1, 1):
            return "1x1 conv (skip_1x1)"
        if site.node is None or site.gm is None:
            return "inside an untraceable submodule: no graph to insert a mask node into"
        return None

    def apply(self, site: Site, params) -> None:
        site.insert_after(PositionMask(layer=site.name), "pmask")
