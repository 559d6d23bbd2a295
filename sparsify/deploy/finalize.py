"""``sparsify.finalize``: plain torch modules for deployment, checked against the sparse model."""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch import nn

from passes import kept_state, set_submodule
from passes.hooks import kept_hooks, remove_hooks, unguard_called
from passes.traced import deepcopy_module

from sparsify.deploy.wrapped_forward import class_forward
from sparsify.deploy.compare import flatten_tensors, outputs_close
from sparsify.deploy.finalize_options import check_options
from sparsify.deploy.input_dependence import _answered_alike
from sparsify.deploy.plain_modules import _finalize_tied, _remove_node, _untrace
from sparsify.deploy.removed_norms import warn_removed_weight_norms
from passes.call_inputs import input_tuple
from sparsify.prepare.open_transformer import close_transformers
from sparsify.prepare.inputs import FIT_HINT, misfit_error, refuse_empty, state_inputs
from sparsify.prepare.pretrained import guard_foreign_layout, kept_layout, unguard_save_pretrained
from sparsify.prepare.tied import point_aliases
from sparsify.prepare.training_only import skipping_line, training_only_graphs
from sparsify.core.contract import Group
from sparsify.core.registry import get_method
from sparsify.core.forwards import entered_hook
from sparsify.core.records import graph_holders
from sparsify.core.dead_outputs import dead_outputs, dead_outputs_message
from sparsify.core.diverged import diverged_message, nonfinite_parameters
from sparsify.core.eval_loop import internal
from sparsify.core.modes import kept_modes
from sparsify.core.sharded import sharded_modules
from sparsify.core.load_hooks import before_load
from sparsify.core.state import STATE_ATTR, SparsifyState, after_load, find_state, refuse_unfilled, unwrap

__all__ = ["FinalizeError", "FinalizeWarning", "finalize_model", "check_options"]


class FinalizeError(RuntimeError):
    """The finalized model does not compute what the sparse model computes (or the model cannot be
    finalized: NaN weights); the message names the layer or graph where the outputs part.

    >>> import sparsify
    >>> issubclass(sparsify.FinalizeError, RuntimeError)
    True
    >>> try:
    ...     deployable = sparsify.finalize(sparsified_model)   # doctest: +SKIP
    ... except sparsify.FinalizeError as e:
    ...     print(e)   # e.g. "finalize: outputs differ ... first at layer3.0.conv1 ..."
    """


class FinalizeWarning(UserWarning):
    """The outputs differ, but only where the model's own unchanged code amplifies rounding (a
    detector's top-k over near-equal scores); ``finalize`` returns the model and says where.

    >>> import warnings, sparsify
    >>> warnings.simplefilter("error", sparsify.FinalizeWarning)   # to make it an error in CI
    >>> warnings.resetwarnings()
    """


@torch.no_grad()
def finalize_model(model: nn.Module, example_inputs=None, *, check: bool = True,
                   rtol: float = 1e-4, atol: float = 1e-5, plain_classes: bool = True) -> nn.Module:
    """See :func:`sparsify.finalize`. ``plain_classes``: see :func:`_untrace`. A forward wrapper
    accelerate set on the instance is set aside (:mod:`sparsify.deploy.wrapped_forward`)."""
    with class_forward(unwrap(model)):
        return _finalize_model(model, example_inputs, check=check, rtol=rtol, atol=atol, plain_classes=plain_classes)


def _finalize_model(model: nn.Module, example_inputs, *, check: bool, rtol: float, atol: float,
                    plain_classes: bool) -> nn.Module:
    if example_inputs is not None:
        refuse_empty(input_tuple(example_inputs), "finalize: example_inputs", "the check would compare nothing; ")
    state: SparsifyState = find_state(model)
    source = unwrap(model)
    if STATE_ATTR not in source._modules:  # reached through a wrapper's attribute forwarding (PEFT's)
        inner = next((n for n, m in source.named_modules() if STATE_ATTR in m._modules), "?")
        if type(source).__module__.split(".")[0] != "peft":
            raise TypeError(f"finalize: this {type(source).__name__} wraps the model sparsify() returned (at "
                            f".{inner}): finalize that model")
        raise TypeError(f"finalize: this {type(source).__name__} wraps the model sparsify() returned (at .{inner}) in "
                        "PEFT adapters, which finalize does not fold in (the sparse layers they wrap left the schedule, "
                        "and their update is dense); for LoRA and a sparse model, merge the adapters first and "
                        "sparsify after (docs/integrations.md#peft-lora)")
    if sharded_modules(source.modules()):
        raise RuntimeError("finalize: this model's parameters are sharded (FSDP2's fully_shard); finalize a full "
                           "copy instead: get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
                           "cpu_offload=True)) from torch.distributed.checkpoint.state_dict, load it on rank 0 into "
                           "the same sparsify(...) of a fresh model and finalize that (docs/distributed.md)")
    # (stacklevel 5: through finalize_model, the no_grad wrapper and sparsify.finalize to the caller)
    if dead := dead_outputs(source, getattr(state, "output_layers", [])):
        warnings.warn(dead_outputs_message("sparsify.finalize", dead), stacklevel=5)
    if bad := nonfinite_parameters(source):  # the output check would fail on NaN, saying less
        if check:
            raise FinalizeError(diverged_message("sparsify.finalize", bad) + "; nothing here is worth deploying")
        warnings.warn(diverged_message("sparsify.finalize", bad), stacklevel=5)
    try:
        final = deepcopy_module(source, kept_hooks(source))  # the caller's hook objects run in it, not copies
    except RuntimeError as e:
        if "deepcopy" not in str(e) or not (held := graph_holders(source)):
            raise
        raise FinalizeError(f"finalize cannot copy the model: {', '.join(held[:3])} {'hold' if len(held) > 1 else 'holds'} tensors of a "
                            "training forward's autograd graph, which torch cannot deepcopy; keep recorded terms in a module "
                            "built on sparsify.core.records.RecordsMixin (its copies start without them), or clear "
                            "them before finalize (docs/writing-a-method.md)") from None
    fstate: SparsifyState = getattr(final, STATE_ATTR)
    foreign = []  # what the model's class does not build
    replaced: dict[int, nn.Module] = {}
    removed = []  # members the default finalize_member removed, for the output check's error
    for group in fstate.groups.values():
        kept = []
        for name, member in group.members.items():
            new = group.finalize_member(name, member)
            if new is not None:
                kept.append(new)
            if new is None:
                if type(group).finalize_member is Group.finalize_member:
                    removed.append(f"{name} ({group.method_name}: {type(member).__name__})")
                if not _remove_node(final, fstate.graph_paths, name):
                    raise FinalizeError(f"could not remove {name} from the graph")
            elif new is not member:
                set_submodule(final, name, new)
                replaced[id(member)] = new
        if (layout := kept_layout(get_method(group.method_name), kept)) and layout not in foreign:
            foreign.append(layout)
    point_aliases(final, replaced)  # a layer under several names (timm CoaT's cpe1) stays one module
    from sparsify.prepare.hidden import finalize_hidden  # weights read outside module calls (Swin, MultiheadAttention)
    finalize_hidden(final, fstate.graph_paths)
    _finalize_tied(final)
    delattr(final, STATE_ATTR)
    # its load_state_dict hook handles checkpoints without sparsify state: the plain model has none
    remove_hooks(final, "_load_state_dict_post_hooks", after_load)
    remove_hooks(final, "_load_state_dict_pre_hooks", before_load)
    remove_hooks(final, "_forward_pre_hooks", refuse_unfilled)  # a model sparsified on meta
    for m in final.modules():  # a method's own module or a plain layer it kept (core/forwards.py)
        remove_hooks(m, "_forward_pre_hooks", entered_hook)
    unguard_save_pretrained(final)
    if foreign:
        guard_foreign_layout(final, " and ".join(foreign))
    for prefix in fstate.graph_paths:
        gm = final.get_submodule(prefix) if prefix else final
        if isinstance(gm, fx.GraphModule):
            gm.recompile()
    if plain_classes:
        final = _untrace(final, fstate)
    close_transformers(final)  # torch's transformer classes, and their fused inference paths, back
    unguard_called(final)  # a module called again runs hooks registered on it
    final.train(False)
    # a frozen layer stays frozen and a trainable one trainable: the finalized model can be
    # fine-tuned or sparsified again (frozen layers are left dense by sparsify)
    # (a parameter renamed on the way, MultiheadAttention's in_proj.weight -> in_proj_weight, keeps
    # the flag it was made with)
    trainable = {n: p.requires_grad for n, p in source.named_parameters()}
    for n, p in final.named_parameters():
        p.requires_grad_(trainable.get(n, p.requires_grad))
    # a weight norm removed before sparsify() (its advice) that the class loads checkpoints by
    warn_removed_weight_norms(final, stacklevel=5)
    if not check:
        return final
    inputs = example_inputs if example_inputs is not None else state_inputs(state, unwrap(model))
    if inputs is None:
        raise FinalizeError("finalize checks the plain model against the sparse one and needs example "
                            "inputs: pass example_inputs=... here or to sparsify(...), or check=False")
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    _warn_training_only_graphs(source)
    # a BatchNorm the user froze stays frozen (core/modes.py)
    with kept_modes(source, training=False):
        # both from one random state: a model that draws in eval too (MC dropout, augmentation
        # layers) draws the same numbers in each
        with kept_state(source), internal():
            try:
                expected = source(*inputs)
            except Exception as e:
                if example_inputs is None:  # sparsify() ran them: the model fails on its own
                    raise
                raise misfit_error("finalize: example_inputs", source, inputs, e, FIT_HINT) from None
        _refuse_nan_outputs(expected, inputs, source)
        alike = _answered_alike(source, inputs, expected)
    if alike:  # nothing else says a model that ignores its input
        warnings.warn(f"sparsify.finalize: the model gives one and the same output for {alike} different example "
                      "inputs: it does not depend on its input (a layer whose outputs or activations are all zero: a "
                      "sparsity too high, a penalty's lam too strong, or a zero-initialized head not trained yet; "
                      "see sparsify.report)", stacklevel=5)
    with kept_state(final):
        got = final(*inputs)
    ok, worst = outputs_close(expected, got, rtol, atol)
    if not ok:
        try:
            _explain_difference(source, final, inputs, worst, rtol, atol)
        except FinalizeError as e:
            if not removed:
                raise
            raise FinalizeError(f"{e}; finalize removed {', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}: "
                                "its group has no finalize_member, and the default removes a member that is no sparse "
                                "layer (an inserted identity); give the group a finalize_member returning the "
                                "module the finalized model should hold (docs/writing-a-method.md)") from None
    return final


def _refuse_nan_outputs(expected, inputs, model: nn.Module) -> None:
    """A trained model that answers its example inputs with NaN (its parameters are finite: they
    were checked) has nothing worth deploying and nothing to compare the deployed model with. A
    model held in float16 overflows on its own (a dense resnet18 in float16 on the CPU answers
    NaN in eval mode after three SGD steps): said as that, not as divergence."""
    if not any(t.is_floating_point() and bool(t.isnan().any()) for t in flatten_tensors(expected)):
        return
    if any(t.is_floating_point() and not bool(t.isfinite().all()) for t in flatten_tensors(inputs)):
        raise FinalizeError("sparsify.finalize: the example inputs hold NaN or inf, and so do the model's outputs: "
                            "pass finite example_inputs")
    if any(p.dtype == torch.float16 for p in model.parameters()):
        raise FinalizeError("sparsify.finalize: the trained model answers the example inputs with NaN although its "
                            "parameters are finite: it computes in float16, whose range (65504) an activation "
                            "exceeded; train in float32 under autocast (float16 or bfloat16), or hold the model in "
                            "bfloat16, which has float32's range")
    raise FinalizeError("sparsify.finalize: the trained model answers the example inputs with NaN although its "
                        "parameters are finite: an activation overflowed (weights grown too large: lower the learning "
                        "rate) and training diverged; nothing here is worth deploying")


def _warn_training_only_graphs(source: nn.Module) -> None:
    """The check compares eval outputs; a graph that holds the training branch of a module's
    ``if self.training:`` runs that module's own forward in eval, without the nodes a method
    inserted (semi-structured's masks), in the sparse model and the finalized one alike."""
    for name, cls, skipped in training_only_graphs(source):
        warnings.warn(f"finalize: {skipping_line(name, cls, skipped, 'in eval (and in the finalized model)')}: the "
                      "deployed model does not apply them, and this check cannot see it (docs/capture.md#training-and-"
                      "eval-branches)", FinalizeWarning, stacklevel=4)


def _explain_difference(source: nn.Module, final: nn.Module, inputs, worst: float, rtol: float, atol: float) -> None:
    """The outputs differ: find the module calls where that starts (:mod:`sparsify.deploy.divergence`).
    Accepted, with a warning, when it starts only in code finalize did not change (a detector's
    top-k/NMS over near-equal scores amplifying rounding) and reading no parameter finalize changed;
    else a FinalizeError naming them, and the parameter such code read directly (a rewritten layer's
    weight read beside its call: the sparse model trained with the dense weight there)."""
    from sparsify.deploy.divergence import locate_divergence
    with kept_modes(source, training=False):
        d = locate_divergence(source, final, inputs, rtol, atol)
    where = ", ".join(f"{n or '<root>'} ({r:.3g})" for n, r in d.own[:3]) + (" ..." if len(d.own) > 3 else "")
    message = (f"the finalized model's output differs from the sparse model's eval output (largest "
               f"relative difference {worst:.3g}; rtol={rtol}, atol={atol})")
    if d.amplified_only:
        warnings.warn(f"finalize: {message}, but only after code finalize did not change: the outputs of "
                      f"{where} differ while everything they call agrees (largest relative difference "
                      f"{d.worst_agreeing:.3g}, {d.agreeing} module calls agree). That code amplifies "
                      "rounding below the tolerance (e.g. top-k or NMS over near-equal scores), so the check "
                      "compared the module outputs instead and they agree", FinalizeWarning, stacklevel=4)
        return
    if d.changed:
        changed = ", ".join(f"{n or '<root>'} ({r:.3g})" for n, r in d.changed[:3])
        message += f"; it starts in code finalize changed: {changed}"
    if d.reads:  # before any amplification story: the sparse model trained with a dense weight there
        param = d.reads[0][1]
        layer = param.rpartition(".")[0] or "<root>"
        code = f"the code of {d.reads[0][0] or '<root>'}"
        message += (f"; {code + ' reads' if d.changed else 'it starts in ' + code + ', which reads'} {param} directly, "
                    f"outside a call of {layer}, and finalize changed that parameter: the sparse model computed with "
                    "its dense weight there, the finalized one with the pruned weight. Give sparsify() example_inputs "
                    "that run that code, so the layer is found and left dense, or leave it dense in the recipe "
                    f'({{"match": {{"name": "{layer}"}}, "method": null}})')
    raise FinalizeError(message)
