"""The group of semi-structured masks one rule selects (:class:`SemiStructuredGroup`): the masking
ramp, the score-map draws and the best-loss tracking that picks the map to freeze, the size and
sharing warnings, and the state a checkpoint keeps. Apart from the recipe method
(:mod:`sparsify.methods.semistructured.method`), which only selects convs and inserts the nodes."""
from __future__ import annotations

import math

import torch
from torch import nn

from sparsify.core.contract import Group, GroupContext
from sparsify.core.eval_loop import internal
from sparsify.core.extra_state import pack, unpack
from sparsify.core.modes import kept_modes
from sparsify.core.schedules import polynomial
from sparsify.core.sharded import is_distributed
from sparsify.core.staging import active_range, resolve_stages, stage_at
from sparsify.methods.semistructured.mask import Calls, DeployedPositionMask, Sizes, position_mask, sizes_of
from sparsify.methods.semistructured.resolution import (advice, input_size_of, resizing_transforms, resizing_warning,
                                                        trained_elsewhere)

__all__ = ["SemiStructuredGroup"]


class SemiStructuredGroup(Group):
    """The masks of one rule: schedule, score-map draws, best-loss tracking, freezing."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        self.begin, self.end = active_range(params, ctx, method.name)
        if self.end is None:
            raise ValueError("semi-structured: end (when the masks freeze) must be set")
        self._stages = resolve_stages(ctx)  # plain data: a group keeps no reference to the model
        self.input_size = input_size_of(ctx.example_inputs)
        size = self.input_size or (0, 0)
        self.register_buffer("scores", torch.zeros(size))  # the map the masks now come from
        self.register_buffer("best_scores", torch.zeros(size))
        self.register_buffer("best_loss", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("current_sparsity", torch.zeros((), dtype=torch.float64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.generator = torch.Generator().manual_seed(int(params["seed"]))
        self.missing_loss = False
        self._resizing = resizing_transforms(ctx.root)  # names only: said by sparsify()
        calls = Calls()  # one clock for the group's masks: a shared conv is told by the others' calls
        for m in members.values():
            m.__dict__["_sizes"] = Sizes(calls)
            m.fix = advice(self._resizing)
        self.sized_on = "the first forward"  # where the masks' sizes come from, for the size error
        if ctx.example_inputs is not None and any(m.size is None for m in members.values()):
            ran = self._probe_sizes(ctx.root, ctx.example_inputs)
            for m in members.values():  # one forward, one input: a second size is a second feature level
                if len(sizes_of(m).seen) > 1:
                    sizes_of(m).shared = True
            if ran and not ctx.guessed:
                shown = f" ({self.input_size[0]}x{self.input_size[1]})" if self.input_size else ""
                self.sized_on = f"sparsify()'s example_inputs{shown}"
        for m in members.values() if ctx.guessed else ():
            m.size = None  # a guessed 224² image (run before this) is no resolution the caller chose

    @torch.no_grad()
    def _probe_sizes(self, root: nn.Module, example_inputs) -> bool:
        """One eval forward so every mask learns its conv's output size (masks are identities now);
        False when it failed."""
        for m in self.members.values():
            sizes_of(m).forget()
        with kept_modes(root, training=False), internal():
            try:
                root(*example_inputs)
            except Exception:  # sizes are then learned at the first forward
                return False
        return True

    # -- schedule --------------------------------------------------------------------------
    def target(self, step: int) -> float:
        if self.end == self.begin:
            return float(self.params["sparsity"]) if step >= self.end else 0.0
        return polynomial(step, self.begin, self.end, self.params["sparsity"], power=self.params["power"])

    def final_target(self) -> float:
        return float(self.params["sparsity"])

    def _input_size(self) -> tuple[int, int] | None:
        if self.input_size is None:  # no example inputs: the largest output size seen so far
            sizes = [m.size for m in self.members.values() if m.size is not None]
            if sizes:
                self.input_size = max(sizes, key=lambda s: s[0] * s[1])
        return self.input_size

    @torch.no_grad()
    def _draw(self) -> None:
        size = self._input_size()
        if size is None:
            return
        fresh = torch.rand(size, generator=self.generator)
        if tuple(self.scores.shape) != tuple(size):
            self.scores = torch.empty(size, device=self.scores.device)
            self.best_scores = torch.zeros(size, device=self.scores.device)
        self.scores.copy_(fresh)
        if is_distributed():  # every rank must mask the same positions
            torch.distributed.broadcast(self.scores, src=0)

    def _shared(self) -> dict[str, list[tuple[int, int]]]:
        """The masks whose conv runs at several sizes per forward (one head for every feature
        level): no single mask fits them, they stay all ones. By name, with the sizes seen."""
        return {n: sizes_of(m).seen for n, m in self.members.items() if sizes_of(m).shared}

    @torch.no_grad()
    def _unmask_shared(self) -> None:
        for name in self._shared():
            m = self.members[name]
            if bool((m.mask == 0).any()):  # made before the second size showed
                m.set_mask(torch.ones(m.mask.shape, device=m.mask.device))
            m.enabled = False

    @torch.no_grad()
    def _set_masks(self, scores: torch.Tensor, sparsity: float) -> None:
        cache = {}
        for m in self.members.values():
            if m.size is None or sizes_of(m).shared:
                continue
            if m.size not in cache:
                cache[m.size] = position_mask(scores, m.size, sparsity) if sparsity > 0 else None
            if cache[m.size] is None:
                m.set_mask(torch.ones(m.size, device=scores.device))
            else:
                m.set_mask(cache[m.size].to(m.mask.device))
        self.current_sparsity.fill_(sparsity)

    def _mean_loss(self, loss: float) -> float:
        if not is_distributed():
            return float(loss)
        t = torch.tensor([float(loss)], dtype=torch.float64, device=self.scores.device)
        torch.distributed.all_reduce(t)
        return float(t) / torch.distributed.get_world_size()

    def writes_weights(self, step: int) -> bool:
        return False  # its update writes masks and scores, never the weights

    def refuse_step(self) -> str | None:
        # now, not once the masks come on and the next forward cannot run
        wrong = trained_elsewhere(self.members, getattr(self, "sized_on", "the first forward"),
                                 getattr(self, "_resizing", []))  # (pickled before they were kept: defaults)
        for m in self.members.values():
            sizes_of(m).trained = None  # the next check reads the forwards of the next step
        return wrong

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        self._unmask_shared()  # found by the forwards since the last step, frozen or not
        if bool(self.frozen):
            return
        # ``loss`` was computed with the masks set at the previous update: credit that map,
        # unless it was drawn at sparsity 0 (never applied)
        if loss is None and float(self.current_sparsity) > 0:
            self.missing_loss = True  # the applied map cannot be scored (warned once by sparsify.step)
        if loss is not None and float(self.current_sparsity) > 0:
            loss = self._mean_loss(loss)
            if math.isfinite(loss) and loss < float(self.best_loss):
                self.best_loss.fill_(loss)
                self.best_scores.copy_(self.scores)
        if step >= self.end:
            if not math.isfinite(float(self.best_loss)):
                self._draw()  # no map was ever scored (e.g. begin == end): take a fresh one
                if self.scores.numel():
                    self.best_scores.copy_(self.scores)
            if self._input_size() is None or not self.best_scores.numel():
                return  # sizes unknown until the first forward: freeze at the next step
            self.scores.copy_(self.best_scores)
            self._set_masks(self.best_scores, float(self.params["sparsity"]))
            self.frozen.fill_(True)
            return
        s = self.target(step)
        if s > 0:
            self._draw()
            if self.scores.numel():
                self._set_masks(self.scores, s)
        else:
            self._set_masks(self.scores, 0.0)

    def warnings(self) -> list[str]:
        out = self._size_warnings() + self._shared_warnings()
        if self.missing_loss:
            out.append("sparsify.step: semi-structured got no loss: call sparsify.step(model, loss=loss) so that it "
                       "keeps the mask map with the lowest training loss (without it the frozen map is a random "
                       "draw, not the best one)")
        return out

    def build_warnings(self) -> list[str]:
        # sizes are known when example inputs were given
        return resizing_warning(self._resizing) + self._size_warnings() + self._shared_warnings()

    def _shared_warnings(self) -> list[str]:
        # a mask restored shared from a checkpoint, whose sizes this process has not seen, was said there
        shared = {self._layer(n): ", ".join(map(str, s)) for n, s in self._shared().items() if len(s) > 1}
        if not shared:
            return []
        one = len(set(shared.values())) == 1  # the levels of one pyramid: listed once
        names = [n if one else f"{n} ({s})" for n, s in list(shared.items())[:3]]
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        verb, what = ("is", "a head") if len(shared) == 1 else ("are", "heads")
        sizes = f" ({next(iter(shared.values()))})" if one else ""
        return [f"sparsify: semi-structured: {', '.join(names)}{more} {verb} called at several output sizes{sizes} "
                f"per forward ({what} shared across feature levels): no single position mask fits, left unmasked"]

    def _layer(self, name: str) -> str:
        """The conv a mask masks (the mask's own name is the conv's own one only outside containers)."""
        return self.members[name].layer or name.removesuffix("_pmask")

    def _size_warnings(self) -> list[str]:
        """Masks that the final sparsity rounds to every position of their map (the conv's output
        no longer depends on its input) or to none (the layer stays dense), once sizes are known
        (each message is said once per model, by sparsify() or the first step that knows them)."""
        shared = self._shared()  # unmasked: said on their own
        sizes = {n: m.size for n, m in self.members.items() if n not in shared}
        if any(size is None for size in sizes.values()):
            return []
        s = float(self.params["sparsity"])
        every = [n for n, (h, w) in sizes.items() if round(s * h * w) >= h * w]
        none = [n for n, (h, w) in sizes.items() if s > 0 and round(s * h * w) == 0]
        out = []
        for names, what in ((every, "every output position of"), (none, "no output position of")):
            if names:
                shown = ", ".join(f"{self._layer(n)} ({sizes[n][0]}x{sizes[n][1]})" for n in names[:3])
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                one = len(names) == 1
                why = (("its layer's output no longer depends on its input" if one else
                        "their layers' outputs no longer depend on their inputs")
                       + "; lower the sparsity or leave small maps dense with a rule" if names is every else
                       f"{'that layer stays' if one else 'those layers stay'} dense (a larger input resolution has "
                       "more positions to mask)")
                out.append(f"sparsify: semi-structured at sparsity {s:g} masks {what} {len(names)} "
                           f"map{'' if one else 's'}, since "
                           f"{s:g} x H x W rounds to {'all H x W' if names is every else '0'} positions there: "
                           f"{shown}{more}; {why}")
        return out

    # -- reporting --------------------------------------------------------------------------
    def describe(self, step: int) -> dict:
        phase = "frozen" if bool(self.frozen) else "dense" if step < self.begin else "ramp"
        out = {"phase": phase, "sparsity_now": round(float(self.current_sparsity), 6), "begin": self.begin,
               "end": self.end, "input_size": self.input_size,
               "best_loss": float(self.best_loss) if math.isfinite(float(self.best_loss)) else None,
               "masks": len(self.members) - len(shared := self._shared())}
        if shared:  # unmasked, their output positions all kept
            out["unmasked_shared"] = list(shared)
        if self._stages:
            out["stage"] = stage_at(self._stages, step)
        return out

    def layer_stats(self, name: str, module: nn.Module, factor: float | None = None) -> dict:
        if sizes_of(module).shared:  # every position kept, at each size it runs at
            seen = sizes_of(module).seen or [tuple(module.mask.shape)]
            return {"mask_size": None, "masked_positions": 0, "position_sparsity": 0.0,
                    "sparsifies": "output positions", "achieved": 0.0, "elements": sum(h * w for h, w in seen),
                    "shared_sizes": [list(s) for s in seen]}
        n = module.mask.numel()
        zeros = int((module.mask == 0).sum()) if n else 0
        return {"mask_size": list(module.mask.shape), "masked_positions": zeros,
                "position_sparsity": zeros / n if n else 0.0,
                "sparsifies": "output positions", "achieved": zeros / n if n else 0.0, "elements": n}

    def finalize_member(self, name: str, module: nn.Module):
        if not module.enabled or sizes_of(module).shared:
            return None  # an all-ones mask is the identity: drop the node
        return DeployedPositionMask(module.mask, layer=module.layer)

    # the generator state makes a resumed run draw the same maps
    def get_extra_state(self):
        generator = self.generator.get_state()
        return pack({"generator": generator, "input_size": self.input_size, "shared": list(self._shared())},
                    like={"generator": generator, "input_size": [-2 ** 63] * 2, "shared": list(self.members)})

    def set_extra_state(self, state) -> None:
        state = unpack(state)
        self.generator.set_state(state["generator"])
        self.input_size = tuple(state["input_size"]) if state.get("input_size") else None
        for name in state.get("shared", ()):  # found before the save, perhaps by a forward this run did not repeat
            if name in self.members:
                sizes_of(self.members[name]).shared = True
                self.members[name].enabled = False

    # torch.multiprocessing (mp.spawn, Lightning's ddp_spawn) sends tensors as shared memory that
    # the sender must keep alive: a torch.Generator pickles a state tensor made for the occasion,
    # freed before the other process opens it ("unable to resize file"). Its state travels as bytes.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["generator"] = bytes(self.generator.get_state().numpy())
        return state

    def __setstate__(self, state):
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state.pop("generator")), dtype=torch.uint8))
        super().__setstate__(state)
        self.generator = generator

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("scores", "best_scores"):
            if prefix + key in state_dict and state_dict[prefix + key].shape != getattr(self, key).shape:
                setattr(self, key, torch.empty_like(state_dict[prefix + key], device=self.best_loss.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
