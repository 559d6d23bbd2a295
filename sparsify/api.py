"""The functions users call: ``sparsify``, ``plan``, ``step``, ``sync``, ``penalty``, ``report``,
``finalize``, ``param_groups``."""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from passes.call_inputs import input_tuple, positional_inputs
from sparsify.prepare.build import build, check_model
from sparsify.prepare.capture import check_capture
from sparsify.deploy.finalize import check_options, finalize_model
from sparsify.stats.measure import Measurement, measure
from sparsify.prepare.plan import Plan
from sparsify.prepare.recipe import load_recipe
from sparsify.prepare.validate import check_total_steps, schedule_warnings
from sparsify.methods import get_method
from sparsify.stats.report import Report, build_report, silenced_activations
from sparsify.core.devices import model_device, move_buffers
from sparsify.core.averaging import sync_sparsity, unsynced_warning
from sparsify.core.pace import (check_bypassed, check_held, check_idle, check_rate, reset, schedule_unfinished,
                                 watch)
from sparsify.core.schedules import plain_number
from sparsify.core.sharded import full_parameters
from sparsify.core.state import check_filled, find_state, forget_replaced, refuse_unfilled, unwrap
from sparsify.core.wrong_model import given_to_sparsify, remember_sparsified
from sparsify.core.advance import advance
from sparsify.core.penalty_watch import penalty_terms, watch_penalty
from sparsify.core.diverged import diverged_message, nonfinite_parameters, refuse_nonfinite
from sparsify.core.step_checks import after_step, as_loss, say_once
from sparsify.prepare.inputs import check_inputs, refuse_misfit, state_inputs
from sparsify.prepare.sharing import SHARED_WARNING, mark_trained, remember_holder, trained_through_earlier

__all__ = ["sparsify", "plan", "step", "sync", "penalty", "report", "finalize", "param_groups", "measure",
           "Measurement"]


def sparsify(model: nn.Module, recipe, *, example_inputs=None, total_steps: int | None = None,
             inplace: bool = False, copy: bool = False, capture: str | None = None, **overrides) -> nn.Module:
    """Return ``model`` rewritten by ``recipe`` for sparse training, as a new module.

    ``recipe`` is a built-in name (``sparsify recipes`` lists them), a path to a JSON file, or a
    dict. ``overrides`` set recipe parameters (``sparsity=0.95``, ``end=2000``). ``total_steps``
    is the number of optimizer steps of the run, needed when the recipe gives times as fractions.
    ``example_inputs`` (a tensor, a tuple of positional arguments, or a dict of keyword arguments
    such as a tokenizer's output) fix the shapes used for MAC counts and the ``finalize`` check;
    without them a 224² image (or the first layer's natural size) is tried.

    The caller's modules are left as they are, and no weight is copied: the returned model holds
    new module objects around the caller's own parameter and buffer tensors (as
    ``torch.fx.symbolic_trace`` and ``prepare_qat_fx`` do), so training it trains those tensors (a
    later ``sparsify`` of tensors a returned model trained warns: sweeps over recipes need ``copy``).
    ``copy=True`` gives a fully independent model (the caller's tensors never change; costs one
    copy of the weights); ``inplace=True`` rewrites the caller's module tree itself.

    ``capture`` chooses how the forward is captured: ``"fx"`` (torch.fx; submodules it cannot
    trace are rewritten module by module), ``"export"`` (torch.export in training mode on
    ``example_inputs``, for forwards torch.fx cannot trace) or ``"auto"`` (the default: torch.fx,
    and torch.export where torch.fx fell back and torch.export reaches more sites); the recipe's
    ``options.capture`` sets it too. ``plan`` says which capture reached each (sub)module; see
    docs/capture.md.

    >>> import torch, torchvision, sparsify
    >>> m = sparsify.sparsify(torchvision.models.resnet18(), "st3", total_steps=1000)
    >>> type(m.layer1[0].conv1).__name__
    'ST3Conv2d'
    """
    check_inputs(model, None)  # a TorchScript module: before the checks that assume a Python module
    check_model(model)  # a wrong model is the first thing to report, before any recipe problem
    refuse_nonfinite(model)
    for key, value in (("inplace", inplace), ("copy", copy)):
        if not isinstance(value, bool):  # "yes", or a model passed by position, was taken as True
            raise TypeError(f"sparsify: {key} must be True or False, got {type(value).__name__} {value!r}")
    if capture is not None:
        check_capture(capture)
    recipe = load_recipe(recipe, **overrides)
    total_steps = check_total_steps(total_steps)  # a numpy or tensor integer is stored as a Python int
    example_inputs = positional_inputs(model, example_inputs)
    # wrong shapes fail here, not later in finalize; the same forward gives the MAC factors
    factors = check_inputs(model, example_inputs)
    reused = trained_through_earlier(model)  # copy=True copies weights another run may have trained
    before = {id(p) for p in model.parameters()}
    root, plan_ = build(model, recipe, example_inputs=example_inputs, total_steps=total_steps, inplace=inplace,
                        copy=copy, factors=factors, capture=capture)
    for message in plan_.warnings(recipe) + schedule_warnings(recipe, get_method, total_steps):
        warnings.warn(message, stacklevel=2)
    if reused:
        warnings.warn(SHARED_WARNING, stacklevel=2)
    if not copy:
        remember_holder(root)
    remember_sparsified(model, root)  # to name them in errors: the model given, a layer of the one returned
    state = find_state(root)  # its groups make their buffers (step, thresholds) on the CPU
    say_once(state, [(m, m) for g in state.groups.values() for m in g.build_warnings()], stacklevel=2)
    move_buffers((state, *state.groups.values()), model_device(root))
    if state.step.is_meta:  # a shape-only model: refuse to run once materialized without values
        root.register_forward_pre_hook(refuse_unfilled)
    # warns when optimizer steps outrun sparsify.step, or optimizers miss what sparsify created (core.pace)
    watch(state, root, [n for n, p in root.named_parameters() if p.requires_grad and id(p) not in before])
    return root


def plan(model: nn.Module, recipe, *, example_inputs=None, total_steps: int | None = None,
         capture: str | None = None, **overrides) -> Plan:
    """Dry run: what ``sparsify`` would rewrite, what stays dense and why, and the parameter and
    MAC shares of the rewritten layers, and which capture (torch.fx, torch.export, module by
    module) reached each (sub)module (``capture`` as in :func:`sparsify`). The model is not modified,
    so ``plan`` takes :func:`sparsify`'s arguments but ``inplace`` and ``copy``.

    >>> import torchvision, sparsify
    >>> p = sparsify.plan(torchvision.models.resnet18(), "st3")
    >>> len(p.rewritten)
    21
    """
    check_inputs(model, None)
    check_model(model)
    for key in ("inplace", "copy"):
        if key in overrides:  # else reported as an unknown recipe parameter
            raise TypeError(f"sparsify.plan takes no {key}= (a dry run never modifies or copies the model): "
                            "drop it, and give it to sparsify()")
    recipe = load_recipe(recipe, **overrides)
    total_steps = check_total_steps(total_steps)
    example_inputs = positional_inputs(model, example_inputs)
    factors = check_inputs(model, example_inputs)
    _, plan_ = build(model, recipe, example_inputs=example_inputs, total_steps=total_steps, dry_run=True,
                     factors=factors, capture=capture)
    return plan_


def _forget_replaced(model: nn.Module, where: str) -> None:
    """Layers the user replaced after ``sparsify`` leave their groups, said once per model (and a
    model materialized from ``meta`` without its state's values is refused)."""
    state = find_state(model, where=f"sparsify.{where}")
    check_filled(state, where)
    root = unwrap(model)
    gone = forget_replaced(root, state)
    if gone:
        key = "replaced:" + ",".join(gone)
        if key not in state.warned:
            state.warned.add(key)
            names = f"{', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}"
            # (a name forget_replaced returns resolves: the layer now there replaced the member)
            if any(type(root.get_submodule(n)).__module__.split(".")[0] == "peft" for n in gone):
                warnings.warn(f"sparsify.{where}: {names} wrapped by PEFT adapters after sparsify() (get_peft_model, "
                              "LoRA): a wrapped sparse layer leaves the schedule, report and finalize, and the "
                              "adapter's update is dense; merge the adapters and sparsify after "
                              "(docs/integrations.md#peft-lora)", stacklevel=3)
                return
            warnings.warn(f"sparsify.{where}: {names} replaced after "
                          "sparsify() (as timm's reset_classifier does), or given a weight of another shape (as "
                          "transformers' resize_token_embeddings does): the new layer stays dense and the sparse "
                          "one it replaced leaves the schedule, report and finalize; to sparsify the new layer, "
                          "replace it before calling sparsify()", stacklevel=3)


def _check_averaged(model: nn.Module, where: str) -> None:
    """An EMA / SWA wrapper that sync never updated: said once per model."""
    msg = unsynced_warning(model, where)
    state = find_state(model)
    if msg and "unsynced" not in state.warned:
        state.warned.add("unsynced")
        warnings.warn(msg, stacklevel=3)


def step(model: nn.Module, loss=None) -> int:
    """Advance the schedules by one optimizer step; call it right after ``optimizer.step()``.

    Recomputes thresholds and masks, moves staged recipes forward and forgets recorded
    penalties. ``loss`` (a number or a one-element tensor) is used by methods that track the best step
    (semi-structured masks). Returns the new step count.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", begin=0, end=2, fix=None)
    >>> sparsify.step(m)
    1
    """
    _forget_replaced(model, "step")
    state = find_state(model)
    loss = as_loss(loss)
    if not state.stepped_here:  # a later sparsify() of these weights says they were trained
        state.stepped_here = True
        mark_trained(unwrap(model))
    said = []
    if (held := check_held(state)) is not None:  # the optimizer was built before sparsify()
        said.append(("held", held))
    if (idle := check_idle(state)) is not None:  # called more often than the optimizer steps
        said.append(("idle", idle))
    if (rate := check_rate(state)) is not None:  # called less often than the optimizer steps
        said.append(("rate", rate))
    if (bypassed := check_bypassed(state, unwrap(model))) is not None:  # the given model trained, or timm's methods
        said.append(("bypassed", bypassed))
    reset(state)
    t = advance(state, unwrap(model), loss, said)
    say_once(state, said + after_step(state, unwrap(model), t, loss), stacklevel=2)
    return t


def sync(averaged: nn.Module, model: nn.Module) -> nn.Module:
    """Give ``averaged``, an EMA / SWA copy of ``model`` (torch's ``AveragedModel``, timm's
    ``ModelEmaV2`` / ``ModelEmaV3``, or a ``copy.deepcopy`` you average yourself), ``model``'s
    sparsity: masks, thresholds computed from the weights, the step, every method's state. Its
    parameters stay the averaged ones. Call it after each update of the average: those tools
    average or copy the sparsity as if it were a weight (a bool mask averages to the union of all
    masks so far) and never see the Python state. Returns ``averaged``. See
    docs/averaging.md.

    >>> import copy, torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), "gmp", total_steps=4, begin=0, end=1)
    >>> ema = torch.optim.swa_utils.AveragedModel(m, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9),
    ...                                           use_buffers=True)
    >>> ema.update_parameters(m)  # the first update copies
    >>> _ = sparsify.step(m); ema.update_parameters(m)
    >>> bool(ema.module[0].mask.all()), bool(m[0].mask.all())  # averaged as a number: the union
    (True, False)
    >>> bool(torch.equal(sparsify.sync(ema, m).module[0].mask, m[0].mask))
    True
    """
    find_state(model, where="sparsify.sync")
    try:
        find_state(averaged, where="sparsify.sync", what="averaged")
    except TypeError:  # the usual cause: the copy was made before sparsify() returned the model
        if not isinstance(averaged, nn.Module) or given_to_sparsify(averaged):
            raise
        raise TypeError(f"sparsify.sync: averaged ({type(averaged).__name__}) holds no sparsify state: make the "
                        "averaged copy from the model sparsify returned (model = sparsify.sparsify(model, ...), "
                        "then AveragedModel(model))") from None
    sync_sparsity(averaged, model)
    return averaged


def penalty(model: nn.Module):
    """The sum of the activation regularizers recorded by the training-mode forwards since the
    last call (then forgotten: two forwards before one call give both terms), in float32;
    ``0.0`` when the recipe regularizes nothing.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", begin=0, end=2, fix=None)
    >>> sparsify.penalty(m)
    0.0
    """
    state = find_state(model, where="sparsify.penalty")
    terms = penalty_terms(state)
    if not terms:
        return 0.0
    total = torch.stack(terms).sum()
    watch_penalty(state, total)  # the next step says if no gradient passed through it
    return total


def report(model: nn.Module) -> Report:
    """Per-layer and global target vs achieved sparsity, parameters and MACs (dense / non-zero).

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", begin=0, end=0, fix=None)
    >>> sparsify.report(m).totals["weight_sparsity"] >= 0.5
    True
    """
    _forget_replaced(model, "report")
    _check_averaged(model, "report")
    state = find_state(model)
    root = unwrap(model)
    if bad := nonfinite_parameters(root):  # said at each report: its figures are read later
        warnings.warn(diverged_message("sparsify.report", bad), stacklevel=2)
    with full_parameters(root.modules()):  # FSDP2: whole weights on every rank (a collective)
        rep = build_report(root, state)
    if (msg := silenced_activations(rep)) is not None:
        warnings.warn(msg, stacklevel=2)
    return rep


def finalize(model: nn.Module, example_inputs=None, *, check: bool = True, rtol: float = 1e-4,
             atol: float = 1e-5, accelerate: bool | dict = False,
             semi_structured: bool | torch.dtype = False) -> nn.Module:
    """A deployable copy: plain ``nn.Conv2d`` / ``nn.Linear`` holding the effective weights,
    inserted nodes folded or removed, no sparsify state. Its eval output is checked against the
    sparse model's on ``example_inputs`` (default: those given to ``sparsify``) and a
    ``FinalizeError`` is raised if they differ, naming the layer where the difference starts;
    a ``FinalizeWarning`` instead when it starts only in code finalize did not change (top-k/NMS
    over near-equal scores amplifying rounding; see :mod:`sparsify.deploy.divergence`). The training
    model is not modified.

    >>> import torch, sparsify
    >>> _ = torch.manual_seed(0)
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 4)), "st3", begin=0, end=0, fix=None,
    ...                       sparsity=0.5)
    >>> type(sparsify.finalize(m).get_submodule("0")).__name__
    'Linear'

    ``accelerate=True`` (CPU inference) then swaps layers for faster sparse implementations
    where they pay on this machine: patch-skipping convs for semi-structured masks, CSR/BSR for
    Linear / 1x1 conv layers with at least 80% zero weights, a compiled direct sparse convolution
    for Conv2d layers with at least 50% zero weights (a dict passes options to
    :func:`sparsify.deploy.accelerate.accelerate`); the result's ``acceleration`` attribute lists the
    path each layer took. See docs/deployment.md.

    ``semi_structured=True`` (CUDA inference, N:M 2:4 models) stores every Linear whose weight is
    2:4 as torch's semi-structured sparse tensor for the GPU's sparse tensor cores; the model must
    be on a CUDA device in fp16/bf16, or pass the dtype (``semi_structured=torch.bfloat16``) to
    cast the plain model first. The result's ``semi_structured`` attribute says what each Linear
    got. See docs/gpu.md.
    """
    check_options(check, rtol, atol, accelerate, semi_structured)
    if accelerate and semi_structured:
        raise ValueError("finalize: accelerate (CPU inference) and semi_structured (CUDA inference) "
                         "exclude each other: pass one")
    _forget_replaced(model, "finalize")
    _check_averaged(model, "finalize")
    if (msg := schedule_unfinished(model)) is not None:
        warnings.warn(msg, stacklevel=2)
    example_inputs = positional_inputs(unwrap(model), example_inputs)
    # accelerate rewrites the finalized graphs: they stay graphs then
    final = finalize_model(model, example_inputs, check=check, rtol=rtol, atol=atol, plain_classes=not accelerate)
    if semi_structured:
        from sparsify.deploy.semistructured24 import to_semi_structured
        if isinstance(semi_structured, torch.dtype):
            final = final.to(semi_structured)
        return to_semi_structured(final)
    if accelerate:
        from sparsify.deploy.accelerate import accelerate as _accelerate
        inputs = example_inputs if example_inputs is not None else state_inputs(find_state(model), unwrap(model))
        if inputs is None:
            raise ValueError("finalize(accelerate=True) builds and times layers on example inputs: pass "
                             "example_inputs=... here or to sparsify(...)")
        options = accelerate if isinstance(accelerate, dict) else {}
        try:
            final = _accelerate(final, inputs, **{"check": check, **options})
        except Exception as e:
            if example_inputs is not None and not check:  # the check would have said it: say so here
                refuse_misfit("finalize: example_inputs", final, input_tuple(example_inputs), e)
            raise
    return final


def param_groups(model: nn.Module, weight_decay: float | None = None, *, no_decay: tuple[str, ...] = (),
                 **options) -> list[dict]:
    """Optimizer parameter groups that give each method what it needs.

    Every parameter gets ``weight_decay`` (a number >= 0; ``None``, the default: the groups set
    none, so the optimizer's own ``weight_decay=`` applies, as with ``model.parameters()``) except
    names ending with one of ``no_decay`` (name suffixes such as ``("bias", "bn")``, which get 0;
    one suffix may be given as a string, ``no_decay="bias"``); methods may add groups of their own
    (STR's thresholds must be decayed to sparsify). ``options`` (``lr=...``, not ``params``) go into every group.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", begin=0, end=0, fix=None)
    >>> [g["weight_decay"] for g in sparsify.param_groups(m, 1e-4)]
    [0.0001]
    >>> torch.optim.SGD(sparsify.param_groups(m), lr=0.1, weight_decay=5e-4).param_groups[0]["weight_decay"]
    0.0005
    """
    if "params" in options:  # spread into every group, it replaced the group's parameters: an optimizer training nothing
        raise TypeError("sparsify.param_groups: params= is no option (it fills each group's params from the model; "
                        "to leave parameters out of training, set requires_grad=False on them)")
    state = find_state(model, where="sparsify.param_groups")
    weight_decay, no_decay = _decay_arguments(weight_decay, no_decay)
    root = unwrap(model)
    claimed = {}
    groups = []
    for g in state.groups.values():
        for params, opts in g.param_options(weight_decay):
            params = [p for p in params if id(p) not in claimed]
            for p in params:
                claimed[id(p)] = True
            if params:
                groups.append({"params": params, **options, **opts})
    decay, plain = [], []
    for name, p in root.named_parameters():
        if id(p) in claimed:
            continue
        (plain if no_decay and name.endswith(tuple(no_decay)) else decay).append(p)
    base = []
    if decay:  # no key for None: a group's value would override the optimizer's (it silently dropped it)
        base.append({"params": decay, **({} if weight_decay is None else {"weight_decay": weight_decay}), **options})
    if plain:
        base.append({"params": plain, "weight_decay": 0.0, **options})
    return base + groups


def _decay_arguments(weight_decay, no_decay) -> tuple[float, tuple[str, ...]]:
    """``param_groups``' ``weight_decay`` as a float (or None) and ``no_decay`` as a tuple of suffixes."""
    weight_decay = plain_number(weight_decay)
    if weight_decay is not None and (isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)):
        raise TypeError(f"sparsify.param_groups: weight_decay must be a number >= 0 or None, got "
                        f"{type(weight_decay).__name__}")
    if weight_decay is not None and not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"sparsify.param_groups: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    # a bare string would be split into its letters by tuple(), each letter a suffix
    suffixes = (no_decay,) if isinstance(no_decay, str) else no_decay
    try:
        suffixes = tuple(suffixes)
    except TypeError:
        suffixes = None
    if suffixes is None or not all(isinstance(x, str) for x in suffixes):
        bad = type(no_decay).__name__ if suffixes is None else \
            f"{type(no_decay).__name__} holding {type(next(x for x in suffixes if not isinstance(x, str))).__name__}"
        raise TypeError(f"sparsify.param_groups: no_decay must be a name suffix or a tuple of them "
                        f"(\"bias\" or (\"bias\", \"bn\")), got {bad}")
    return (None if weight_decay is None else float(weight_decay)), suffixes
