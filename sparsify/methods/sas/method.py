"""The SAS method: which sites it takes, how it rewrites them, its group (reporting, deployment)."""
from __future__ import annotations

from dataclasses import dataclass


import torch
import torch.fx as fx
from torch import nn


from passes.hooks import share_hooks

from sparsify.core.contract import Group, Method, Site
from sparsify.core.registry import register
from sparsify.core.params import Literal, Params, param
from sparsify.core.layers import weight_base
from sparsify.methods.sas.rules import make_slot_rule
from sparsify.methods.sas.layer import SAS_CLASSES
from sparsify.methods.sas.rewire import _non_negative, _rewire, find_relu_input, hooks_in_the_way, mode_branching_source


def _made_by(site: Site, src: fx.Node | None) -> str:
    """What computes a layer's input, as the user's model names it: a module or attribute by its
    qualified name, a function or tensor method by its own name (not torch.fx's node names such as
    ``_0`` or ``add_1``).

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    >>> flatten, linear = [n for n in gm.graph.nodes if n.op == "call_module"]
    >>> _made_by(Site("head.1", gm.get_submodule("1"), gm=gm, node=linear, prefix="head"), flatten)
    'the output of head.0 (Flatten)'
    """
    if src is None:
        return "not a tensor computed in its graph"
    if src.op == "call_module":
        return f"the output of {site.qualify(str(src.target))} ({type(site.gm.get_submodule(src.target)).__name__})"
    if src.op == "get_attr":
        return f"the attribute {site.qualify(str(src.target))}"
    if src.op == "call_method":
        return f"the output of the tensor method .{src.target}()"
    return f"the output of {getattr(src.target, '__name__', src.target)}()"


class SASGroup(Group):
    """The SAS layers of one rule: no per-step state; reporting and deployment."""

    def describe(self, step: int) -> dict:
        m = self.params["m"]
        rule = make_slot_rule(self.params["slot_rule"], m, self.params["slot_options"])
        return {"m": m, "slot_rule": repr(rule), "activation_sparsity": 1 - 1 / m}

    @torch.no_grad()
    def layer_stats(self, name: str, module: nn.Module, factor: float | None = None) -> dict:
        w = module.weight
        m = module.sas_m
        nnz = int(torch.count_nonzero(w))
        # SAS sparsifies its input slots: at most one of the m is non-zero (1 - 1/m of them are
        # zero by construction; zeros of the input itself add to that, measured by sparsify train)
        out = {"params": w.numel(), "nonzero_params": nnz, "weight_sparsity": 1 - nnz / w.numel(),
               "m": m, "input": module.sas_input, "activation_sparsity": 1 - 1 / m,
               "sparsifies": "input slots", "achieved": 1 - 1 / m}
        if factor is not None:
            narrow = int(round(factor * w.numel() / m))
            # the authors count one multiply per input element (its one active slot): the dense MACs
            out.update(macs=narrow, nonzero_macs=narrow, executed_macs=int(round(factor * w.numel())))
        return out

    def finalize_member(self, name: str, module: nn.Module) -> nn.Module:
        # the caller's hooks run around the deployed layer (those a rewiring would change left
        # the layer dense: SASMethod.accepts)
        deployed = module.deploy_module()
        share_hooks(module.__dict__, deployed)
        return deployed


@dataclass
class SASParams(Params):
    m: int = param(2, "Slots per input element.", ge=2)
    slot_rule: str = param("auto", "How inputs are split into slots (auto: sign for m = 2, signed_levels otherwise).")
    slot_options: dict = param({}, "Options of the slot rule (e.g. {\"scale\": 1.0}).")
    input: Literal["rewire", "as_is"] = param("rewire", "rewire: a layer fed by a relu reads the relu's input.")
    not_relu: Literal["dense", "as_is"] = param("dense", "Rewire layers not fed by a relu: left dense, or converted as is.")
    through_average: bool = param(False, "Also look through average pooling for the relu (the official ResNet head).")
    init: Literal["auto", "zero", "identity"] = param("auto", "Slot coefficients: auto, zero (official) or identity.")
    recompute: bool = param(True, "Recompute the slots in the backward instead of keeping them.")

    def check(self):
        try:
            make_slot_rule(self.slot_rule, self.m, self.slot_options)
        except (ValueError, TypeError) as e:
            return [("slot_rule", str(e))]
        return []


@register
class SASMethod(Method):
    """Recipe method ``sas``; parameters (see docs/methods/sas.md):

    * ``m`` (2): slots per input element; ``slot_rule`` (``"auto"``: ``sign`` for m = 2,
      ``signed_levels`` otherwise) and ``slot_options`` (e.g. ``{"scale": 1.0}``);
    * ``input``: ``"rewire"`` (a layer fed by a relu reads the relu's input) or ``"as_is"``;
    * ``not_relu``: for ``rewire`` layers not fed by a relu, ``"dense"`` (left alone) or ``"as_is"``;
    * ``through_average`` (false): also look through average pooling to find the relu (the
      official ResNet head; changes the function);
    * ``init``: ``"auto"`` (relu coefficients where the input is a relu output, identity
      coefficients otherwise, so the converted network computes what the dense one did),
      ``"zero"`` (the official converter: negative slots zero everywhere) or ``"identity"``;
    * ``recompute`` (true): keep only the input for the backward and recompute the slots there
      into the shared scratch buffer (M x less activation memory for the layer, two more
      elementwise passes; measured no slower); false keeps a copy of the slots.
    """

    name = "sas"
    description = "SAS: structured activation sparsification, M slots per input, relu rewiring (ICLR 2024)"
    Params = SASParams
    group_class = SASGroup
    # not transformers' Conv1D (its slot layout is not implemented), nor ConvTranspose (docs/methods/sas.md)
    targets = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    full_trace = True  # the relu feeding a layer may sit inside a module with nothing to rewrite
    # said by the finalized model's save_pretrained, with what from_pretrained does with it
    deploy_layout = ("SAS layers M times wider than the dense ones, fed by rewired ReLUs (from_pretrained refuses "
                     "the wider weights)")
    training_layout = "SAS layers M times wider than the dense ones"
    tied_weights = "refuse"  # the weight gets M times wider: a tied embedding cannot read it

    def accepts(self, site: Site) -> str | None:
        why = super().accepts(site)
        if why:
            return why
        p = {**self.params, **site.params}
        if p["input"] == "rewire" and site.node is not None:
            found = find_relu_input(site.gm, site.node, p["through_average"])
            if found is not None and (hooked := hooks_in_the_way(site.gm, site.node, site.module, found)):
                return f"sas: {hooked}"
        if p["input"] == "as_is" or p["not_relu"] == "as_is":
            return None
        if site.node is None:
            return "sas: input unknown (layer outside a traced graph); not_relu='as_is' would convert it as is"
        if find_relu_input(site.gm, site.node, p["through_average"]) is None:
            src = site.node.args[0] if site.node.args and isinstance(site.node.args[0], fx.Node) else None
            if src is not None and src.op == "placeholder" and not site.prefix:
                return (f"sas: its input is the model's input {src.target!r}, not a relu output (not_relu='as_is' "
                        "would convert it as is)")
            if src is not None and src.op == "placeholder":  # made in another graph: whether by a relu is unknown
                owner = f"of {site.prefix}" if site.prefix else "of the model"
                return (f"sas: input {src.name} is an argument {owner}, traced apart from the code that computes it "
                        "(torch.fx could not trace the module around both), so whether it is a relu output is "
                        "unknown; not_relu='as_is' would convert it as is")
            if (inside := mode_branching_source(site.gm, site.node, p["through_average"])) is not None:
                path = site.qualify(inside)
                return (f"sas: its ReLU is inside {path} ({type(site.gm.get_submodule(inside)).__name__}), whose "
                        "forward branches on self.training: SAS would run in training mode only, so the layer stays "
                        "dense (not_relu='as_is' would convert it on its actual input)")
            return (f"sas: its input, {_made_by(site, src)}, is not a relu output (not_relu='as_is' would convert it "
                    "as is)")
        return None

    def apply(self, site: Site, params) -> None:
        p = {**self.params, **params}
        found = None
        if p["input"] == "rewire" and site.node is not None:
            found = find_relu_input(site.gm, site.node, p["through_average"])
        rule = make_slot_rule(p["slot_rule"], p["m"], p["slot_options"])
        relu_input = found is not None or (site.node is not None and _non_negative(site.gm, site.node))
        init = p["init"]
        if init == "auto":
            init = "zero" if relu_input else "identity"
        coefficients = rule.relu_coefficients() if init == "zero" else rule.identity_coefficients()
        if found is not None:
            how = _rewire(site.gm, site.node, *found, site.changes)
        else:
            how = "as is" + (" (input is a relu output)" if relu_input else "")
        new = SAS_CLASSES[weight_base(site.module)].from_dense(
            site.module, m=p["m"], slot_rule=p["slot_rule"], slot_options=p["slot_options"],
            coefficients=coefficients, sas_input=how, recompute=p["recompute"])
        site.replace(new)
