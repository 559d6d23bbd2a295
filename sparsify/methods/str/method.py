"""The STR method: its group (the shared threshold of global granularity, the thresholds' weight
decay, the warning when nothing decays them) and the recipe method ``str``."""
from __future__ import annotations

from dataclasses import dataclass

import warnings
import weakref

import torch
from torch import nn

from sparsify.core.contract import Group, GroupContext, Method
from sparsify.core.registry import register
from sparsify.core.params import Literal, Params, param
from sparsify.core.keep import EmptyLayerWarning, empty_message
from sparsify.core.layers import weight_base
from sparsify.core.sharded import is_sharded
from sparsify.methods.str.kernel import str_threshold
from sparsify.methods.str.layer import STR_CLASSES, _reshape_scalar_s

__all__ = ["STRGroup", "STRParams", "STRMethod"]


def _whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, gathered if FSDP2 shards it (a collective then: every rank calls it)."""
    return t.detach().full_tensor() if is_sharded(t) else t.detach()


# Optimizers seen stepping an STR threshold without weight decay, reported by the groups' warnings().
_GROUPS: "weakref.WeakSet[STRGroup]" = weakref.WeakSet()
_HOOK = None


def _decay_of(group: dict) -> float:
    wd = group.get("weight_decay", 0.0)
    return float(wd) if isinstance(wd, (int, float)) else 0.0


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """Global optimizer post-step hook: note STR thresholds stepped with weight_decay == 0."""
    if not _GROUPS:
        return
    groups = optimizer.param_groups
    # which param group, of how many: timm's and torchvision's optimizer factories put 1-d
    # parameters (a scalar s) into a group of their own without decay
    undecayed = {id(p): f"{type(optimizer).__name__} param group {i + 1} of {len(groups)}, weight_decay=0"
                 for i, g in enumerate(groups) if _decay_of(g) == 0.0 for p in g["params"]}
    seen = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for group in list(_GROUPS):
        if any(id(p) in seen for _, p in group.thresholds()):
            group.stepped_by_torch_optimizer = True
    if not undecayed:
        return
    for group in list(_GROUPS):
        for name, p in group.thresholds():
            if id(p) in undecayed:
                group.undecayed.add(undecayed[id(p)])
                break


def _install_hook() -> None:
    global _HOOK
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


class STRGroup(Group):
    """The layers of one STR rule: the shared threshold (global), decay options and the warning."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        if params["granularity"] == "global":
            device = next(iter(members.values())).weight.device
            self.s = nn.Parameter(torch.full((1,), float(params["s_init"]), dtype=torch.float32, device=device))
            for m in members.values():
                object.__setattr__(m, "_s_owner", self)
        self.undecayed: set[str] = set()
        self.stepped_by_torch_optimizer = False  # then the hook's verdict is exact
        self._last: dict[str, torch.Tensor] | None = None  # s after the previous step, to spot no decay
        self._frozen_names: list[str] = []
        self._warned_empty: set[str] = set()
        _GROUPS.add(self)
        _install_hook()

    def thresholds(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, s)`` of every threshold parameter of this rule (once for global)."""
        if self.params["granularity"] == "global":
            return [("<global>", self.s)]
        return [(n, m.s) for n, m in self.members.items()]

    # -- optimizer plumbing ------------------------------------------------------------------
    def param_options(self, weight_decay: float) -> list[tuple[list[nn.Parameter], dict]]:
        """The thresholds get ``threshold_decay`` (default: the model's ``weight_decay``)."""
        decay = self.params["threshold_decay"]
        decay = weight_decay if decay is None else float(decay)
        # None: the optimizer's own weight_decay, as for every other parameter
        return [([p for _, p in self.thresholds()], {} if decay is None else {"weight_decay": decay})]

    def reads_weights(self, step: int) -> bool:
        return False  # only the thresholds, gathered below when FSDP2 shards them

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _reshape_scalar_s(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def writes_weights(self, step: int) -> bool:
        return False  # its update writes thresholds, never the weights

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        # a threshold whose loss gradient is exactly zero (sigmoid(s) underflows, as with the
        # paper's s_init = -3200) moves only by weight decay: if it did not move, nothing decays it
        now = {n: _whole(p).clone() for n, p in self.thresholds()}
        frozen = []
        if self._last is not None and not self.stepped_by_torch_optimizer:
            for n, p in self.thresholds():
                grad_zero = p.grad is None or not bool(_whole(p.grad).any())
                if grad_zero and bool((now[n] != 0).any()) and torch.equal(now[n], self._last[n]):
                    frozen.append(n)
        self._frozen_names = frozen
        self._last = now
        self._warn_empty()

    def _warn_empty(self) -> None:
        """Warn once per layer whose every weight is at or below its threshold: its output no
        longer depends on its input, and the weights under a threshold get no gradient from the
        loss, so it stays so (a decay too strong for the run; a layer initialized at zero, as
        torchvision's ViT head is, never trains)."""
        names = [n for n, m in self.members.items() if n not in self._warned_empty and not is_sharded(m.weight)
                 and m.weight.device.type != "meta"]
        if not names:
            return
        # "not all at or below": a NaN weight or threshold is not an emptied layer (step says diverged)
        alive = torch.stack([~torch.le(self.members[n].weight.detach().abs(), self.members[n].threshold()).all()
                             for n in names]).tolist()
        empty = [n for n, a in zip(names, alive) if not a]
        if empty:
            self._warned_empty.update(empty)
            warnings.warn(empty_message("str", empty, "weights under the threshold get no gradient, so it stays so, "
                                        "and a layer initialized at zero starts so",
                                        "lower the thresholds' weight decay (threshold_decay) or leave the layer "
                                        "dense with a rule"), EmptyLayerWarning, stacklevel=4)

    def warnings(self) -> list[str]:
        out = []
        if self.undecayed or self._frozen_names:
            where = (", ".join(sorted(self.undecayed)) if self.undecayed else
                     f"thresholds {', '.join(self._frozen_names[:3])}{' ...' if len(self._frozen_names) > 3 else ''} "
                     "did not move")
            out.append(f"STR: the optimizer applies no weight decay to the thresholds s ({where}); STR gets "
                       "its sparsity from that decay, so the thresholds stay near s_init and so does the sparsity. "
                       "Build the optimizer with sparsify.param_groups(model, weight_decay=...) or give every "
                       "'.s' parameter weight_decay > 0 (with transformers' Trainer or sparsify train: a "
                       "weight_decay > 0 in their settings; the Trainer's default is 0).")
        return out

    # -- reporting -------------------------------------------------------------------------
    def target(self, step: int):
        return None  # learned sparsity: no schedule

    def final_target(self):
        return None

    def describe(self, step: int) -> dict:
        ts = [float(str_threshold(p.detach()).mean()) for _, p in self.thresholds()]
        out = {"granularity": self.params["granularity"], "s_init": self.params["s_init"]}
        if ts:
            out["threshold_mean"] = sum(ts) / len(ts)
        return out

    def layer_stats(self, name: str, module: nn.Module, factor: float | None = None) -> dict:
        t = module.threshold().detach()
        return {"threshold": float(t.mean()), "s": float(module.threshold_param().detach().float().mean())}


@dataclass
class STRParams(Params):
    s_init: float = param(-10.0, "Initial threshold parameter s (threshold sigmoid(s)); negative starts near-dense.",
                          what="a number (e.g. -3200 as in the paper)")
    granularity: Literal["layer", "channel", "global"] = param(
        "layer", "One threshold per layer, per output channel, or one for the whole rule.")
    threshold_decay: float | None = param(None, "Weight decay of the threshold parameters (null: the optimizer's).",
                                          ge=0, what="null (= the optimizer's weight_decay) or >= 0")

    def check(self):
        s = self.s_init
        if s >= 0:  # sigmoid(0) = 0.5 already exceeds almost every initialised weight
            return [("s_init", f"{s} prunes every weight with |w| < sigmoid({s}) = "
                     f"{float(torch.sigmoid(torch.tensor(float(s)))):.3g} at step 0 (the official "
                     "repo's default 100 prunes everything); use a negative value such as -10, or the "
                     "paper's -3200 for long ImageNet runs")]
        return []


@register
class STRMethod(Method):
    """Recipe method ``str`` (docs/methods/str.md); params (:class:`STRParams`):

    * ``s_init`` (-10): initial threshold parameter s, threshold sigmoid(s); must be < 0;
    * ``granularity`` ("layer"): ``"layer"``, ``"channel"`` or ``"global"`` thresholds;
    * ``threshold_decay`` (null): weight decay of the thresholds (null: the optimizer's).
    """

    name = "str"
    own_forward = "run"  # its layer computes through SparseWeightMixin.forward_with
    description = "STR: learned per-layer soft thresholds sigmoid(s), sparsity driven by weight decay (ICML 2020)"
    Params = STRParams
    group_class = STRGroup

    def out_channel_state(self, params: dict) -> bool:
        return params["granularity"] == "channel"

    def apply(self, site, params) -> None:
        site.replace(STR_CLASSES[weight_base(site.module)].from_dense(
            site.module, granularity=params["granularity"], s_init=params["s_init"]))
