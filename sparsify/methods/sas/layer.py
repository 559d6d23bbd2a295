"""SAS layers (``SASConv1d/2d/3d``, ``SASLinear``) in the official interleaved weight layout, and the
plain module they finalize to."""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


from sparsify.core.layers import SparseWeightMixin, specialize, weight_base
from sparsify.core.plain import memory_format_of
from sparsify.core.buffers import eager
from sparsify.core.forwards import entered
from sparsify.methods.sas.rules import make_slot_rule
from sparsify.methods.sas.kernel import _SASFunction


class SASMixin(SparseWeightMixin):
    """A Conv1d/2d/3d or Linear whose input is lifted into ``sas_m`` slots (see the module doc).

    Build one directly like the torch layer plus ``m``/``slot_rule`` (weights initialised like the
    official ``SASConv2d``), or from a dense layer with :meth:`from_dense`. ``weight`` has the
    official interleaved layout ``(Cout, m·Cin/groups, *k)`` / ``(out, m·in)``; ``in_channels`` /
    ``in_features`` keep the narrow input size.

    >>> layer = SASConv2d(8, 16, 3, padding=1)
    >>> tuple(layer.weight.shape), tuple(layer(torch.randn(2, 8, 5, 5)).shape)
    ((16, 16, 3, 3), (2, 16, 5, 5))
    """

    def __init__(self, *args, m: int = 2, slot_rule: str = "auto", slot_options: dict | None = None,
                 recompute: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_sparse(m=m, slot_rule=slot_rule, slot_options=slot_options, recompute=recompute)
        self.reset_sas_parameters()

    def init_sparse(self, m: int = 2, slot_rule: str = "auto", slot_options: dict | None = None,
                    coefficients: list[float] | None = None, sas_input: str = "as constructed",
                    recompute: bool = True) -> None:
        """Widen ``weight`` to ``m`` slots: slot k holds ``coefficients[k] · W`` (default all zero
        but slot 0, i.e. the dense layer on relu inputs)."""
        rule = make_slot_rule(slot_rule, int(m), slot_options)
        self.sas_m = rule.m
        self.slot_rule = rule
        self.sas_input = sas_input
        self.sas_recompute = bool(recompute)  # keep only x for the backward (memory) or the slots (speed)
        coefficients = coefficients if coefficients is not None else [1.0] + [0.0] * (rule.m - 1)
        self.sas_coefficients = [float(c) for c in coefficients]
        self.weight = nn.Parameter(self.widen(self.weight.detach()), requires_grad=self.weight.requires_grad)

    def widen(self, dense: torch.Tensor) -> torch.Tensor:
        """The wide weight this layer was made of for the dense (narrow) weight ``dense``: slot k
        holds ``sas_coefficients[k] · dense``.

        >>> layer = SASLinear.from_dense(nn.Linear(3, 2), coefficients=[1.0, -1.0])
        >>> layer.widen(torch.ones(2, 3))[0].tolist()
        [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
        """
        # stored as the dense weight is (channels-last: the model's convolutions run in that layout)
        wide = torch.stack([c * dense for c in self.sas_coefficients], 2).flatten(1, 2)
        return wide.contiguous(memory_format=memory_format_of(dense))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a dense (pretrained) checkpoint: its narrow weight is converted as sparsify() converted
        # the layer's own, so that loading it after sparsify() equals sparsify() of the loaded model
        key = prefix + "weight"
        w = state_dict.get(key)
        if isinstance(w, torch.Tensor) and w.dim() == self.weight.dim() and w.shape[0] == self.weight.shape[0] \
                and w.shape[1] * self.sas_m == self.weight.shape[1] and w.shape[2:] == self.weight.shape[2:]:
            state_dict = {**state_dict, key: self.widen(w.to(self.weight.device))}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def reset_sas_parameters(self) -> None:
        """The official initialisation: Kaiming-uniform over the wide weight, bias bound from the
        narrow fan-in."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = nn.init._calculate_fan_in_and_fan_out(self.weight)[0] / self.sas_m
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def dense_class(self) -> type:
        return weight_base(self)

    def forward(self, x):
        entered(self, x)
        if not eager():
            # plain ops: the kernel's shared workspace, out= writes into strided slot views and
            # autograd.grad of the generic rules each break torch.compile's graph (and per-layer
            # recompiles then hit dynamo's limit; the compiler fuses the projection into one graph
            # itself), and torch.func's transforms (per-sample gradients) take no such kernel
            return self.reference_forward(x)
        linear = isinstance(self, nn.Linear)
        if linear:
            conf = (True, None, None, None, 1)
        else:
            padding = self.padding
            if isinstance(padding, str) or self.padding_mode != "zeros":
                # slot rules map 0 to 0 and copy-padding commutes with the elementwise projection
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
                padding = (0,) * len(self.kernel_size)
            conf = (False, list(self.stride), list(padding), list(self.dilation), self.groups)
        return _SASFunction.apply(x, self.weight, self.bias, self.slot_rule, conf, self.sas_recompute)

    def reference_forward(self, x):
        """The same result through plain autograd ops (slots stacked, interleaved, one wide layer)."""
        linear = isinstance(self, nn.Linear)
        dim = -1 if linear else 2
        proj = torch.stack(self.slot_rule.slots(x), dim).flatten(dim - 1, dim)
        return F.linear(proj, self.weight, self.bias) if linear else self._conv_forward(proj, self.weight, self.bias)

    def deploy_module(self) -> fx.GraphModule:
        """A plain-ops copy (slot ops, stack, conv/linear) as a ``GraphModule`` holding
        ``weight`` (official layout) and ``bias``; ``torch.export`` accepts it. It answers the
        layer's public attributes (``kernel_size``, ``in_channels``, ``in_features``, ...) as the
        layer did: model code reads them (timm's davit: ``k_h, k_w = self.conv.kernel_size``).

        >>> layer = SASConv2d(4, 8, 3, padding=1)
        >>> gm = layer.deploy_module()
        >>> gm.kernel_size, gm.in_channels, gm.padding, tuple(gm.weight.shape), gm.sas_m
        ((3, 3), 4, (1, 1), (8, 8, 3, 3), 2)
        >>> import copy; copy.deepcopy(gm).in_channels
        4
        """
        gm = fx.symbolic_trace(SASDeploy(self))
        # sas_m marks it as a SAS layer (accelerate lists it); GraphModule's deepcopy keeps only
        # the attributes named under this meta key (accelerate and finalize copy the model)
        kept = {name: self.__dict__[name] for name in _LAYER_ATTRIBUTES if name in self.__dict__}
        kept["sas_m"] = self.sas_m
        for name, value in kept.items():
            setattr(gm, name, value)
        gm.meta["_user_preserved_attributes"] = kept
        return gm

    def sparse_repr(self) -> str:
        return f"m={self.sas_m}, slot_rule={self.slot_rule!r}" + ("" if self.sas_recompute else ", keep slots")


SAS_CLASSES = specialize(SASMixin, prefix="SAS")
SASConv1d, SASConv2d, SASConv3d, SASLinear = (SAS_CLASSES[t] for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))


#: what a Conv/Linear answers besides its parameters, kept on the deployed SAS module
_LAYER_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "in_features", "out_features")


class SASDeploy(nn.Module):
    """What :meth:`SASMixin.deploy_module` traces: the official forward without the zeros tensor."""

    def __init__(self, layer: SASMixin):
        super().__init__()
        self.linear = isinstance(layer, nn.Linear)
        self.rule = layer.slot_rule
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        if not self.linear:
            self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(layer.kernel_size)]
            self.pad = None
            self.padding = layer.padding
            if layer.padding_mode != "zeros":
                self.pad = (layer._reversed_padding_repeated_twice, layer.padding_mode)
                self.padding = 0
            self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups

    def forward(self, x):
        if self.linear:
            proj = torch.stack(self.rule.slots(x), -1).flatten(-2)
            return F.linear(proj, self.weight, self.bias)
        if self.pad is not None:
            x = F.pad(x, self.pad[0], mode=self.pad[1])
        proj = torch.stack(self.rule.slots(x), 2).flatten(1, 2)
        return self.conv(proj, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# --------------------------------------------------------------------------------------------
# the ReLU rewiring
