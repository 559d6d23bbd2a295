"""The functions users call: ``sparsify``, ``plan``, ``step``, ``sync``, ``penalty``, ``report``,
``finalize``, ``param_groups``."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from passes.call_inputs import positional_inputs
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
from sparsify.core.averaging import sync_sparsity
from sparsify.core.pace import (check_bypassed, check_held, check_idle, check_rate, reset, schedule_unfinished,
                                 watch)
from sparsify.core.sharded import full_parameters
from sparsify.core.state import find_state, refuse_unfilled, unwrap
from sparsify.core.wrong_model import given_to_sparsify, remember_sparsified
from sparsify.core.advance import advance
from sparsify.core.penalty_watch import penalty_terms, watch_penalty
from sparsify.core.records import penalty_sum
from sparsify.core.diverged import diverged_message, nonfinite_parameters, refuse_nonfinite
from sparsify.core.step_checks import after_step, as_loss, say_once
from sparsify.prepare.inputs import check_inputs
from sparsify.prepare.sharing import SHARED_WARNING, mark_trained, remember_holder, trained_through_earlier
from sparsify.changed_model import _check_averaged, _forget_replaced
from sparsify.inference_targets import check_target, for_target
from sparsify.optimizer_groups import build_param_groups

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
    say_once(state, [(m, m) for m in state.build_said], stacklevel=2)
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
    last call (then forgotten: two forwards before one call give both terms), in float32
    (float64 when a term is: a float64 model's); ``0.0`` when the recipe regularizes nothing.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", begin=0, end=2, fix=None)
    >>> sparsify.penalty(m)
    0.0
    """
    state = find_state(model, where="sparsify.penalty")
    terms, computed = penalty_terms(state)
    if not terms:
        return 0.0
    total = penalty_sum(terms)
    watch_penalty(state, total, computed)  # the next step says if no gradient passed through it
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
    check_target(accelerate, semi_structured)
    _forget_replaced(model, "finalize")
    _check_averaged(model, "finalize")
    if (msg := schedule_unfinished(model)) is not None:
        warnings.warn(msg, stacklevel=2)
    example_inputs = positional_inputs(unwrap(model), example_inputs)
    # accelerate rewrites the finalized graphs: they stay graphs then
    final = finalize_model(model, example_inputs, check=check, rtol=rtol, atol=atol, plain_classes=not accelerate)
    return for_target(final, model, example_inputs, check, accelerate, semi_structured)


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
    return build_param_groups(model, weight_decay, no_decay, options)
