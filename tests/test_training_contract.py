"""An optimizer built before ``sparsify`` (docs/index.md#the-training-loop-contract): it holds
the model's parameters from then, so the ones the recipe added or replaced (STR's thresholds,
SAS's wider weights; every one with ``copy=True``) never train. Before, nothing said so: STR
learned no sparsity, SAS's layers kept their initial weights. The first ``sparsify.step`` after
an optimizer step now warns, once; an optimizer built after ``sparsify`` (or two that share the
parameters) stays quiet."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

import sparsify

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])
SAID = "no optimizer updates"


def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def steps(model, optimizers, n=2, every: int = 1, batch=None, said: str = SAID) -> list[str]:
    """``n`` iterations, each stepping every optimizer, sparsify.step after every ``every``-th;
    the warnings that contain ``said``."""
    x, y = batch if batch is not None else (X, Y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(n):
            loss = F.cross_entropy(model(x), y) + sparsify.penalty(model)
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad()
            if i % every == every - 1:
                sparsify.step(model)
    return [str(w.message) for w in caught if said in str(w.message)]


@pytest.mark.parametrize("recipe,created", [("str", "conv1.s"), ("sas", "layer1.0.conv1.weight")])
def test_an_optimizer_built_before_sparsify_is_named(recipe, created):
    net = resnet()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    model = sparsify.sparsify(net, recipe, total_steps=4, example_inputs=X)
    before = model.get_parameter(created).detach().clone()
    said = steps(model, [opt])
    assert len(said) == 1 and repr(created) in said[0] and "sparsify.param_groups" in said[0]
    assert torch.equal(model.get_parameter(created), before)  # what it warns about: never trained


def test_copy_true_and_an_old_optimizer_train_nothing_and_say_so():
    net = resnet()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    model = sparsify.sparsify(net, "st3", total_steps=4, example_inputs=X, copy=True)
    said = steps(model, [opt])
    assert len(said) == 1 and "any parameter of this model" in said[0]


@pytest.mark.parametrize("recipe", ["str", "sas", "st3"])
def test_optimizers_built_after_sparsify_are_quiet(recipe):
    model = sparsify.sparsify(resnet(), recipe, total_steps=4, example_inputs=X)
    assert steps(model, [torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01)]) == []


def test_two_optimizers_sharing_the_parameters_are_quiet():
    """Weights and thresholds in two optimizers: together they hold everything."""
    model = sparsify.sparsify(resnet(), "str", total_steps=4, example_inputs=X)
    thresholds = [p for n, p in model.named_parameters() if n.endswith(".s")]
    rest = [p for n, p in model.named_parameters() if not n.endswith(".s")]
    opts = [torch.optim.SGD(rest, lr=0.01), torch.optim.Adam(thresholds, lr=0.01)]
    assert steps(model, opts) == []


def test_frozen_parameters_are_not_asked_for():
    net = resnet()
    model = sparsify.sparsify(net, "str", total_steps=4, example_inputs=X)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.endswith(".s"))  # thresholds fixed on purpose
    assert steps(model, [torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)]) == []


# -- sparsify.step called more often than the optimizer steps ------------------------------------

IDLE = "sparsify.step calls followed no optimizer step"


def small():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def accumulate(model, opt, calls: int, every: int, step_each_micro_batch: bool, scaler=None) -> list[str]:
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(calls):
            loss = F.cross_entropy(model(x), y) / every
            if scaler is not None:
                scaler.scale(loss * float("inf")).backward()  # non-finite gradients every step
            else:
                loss.backward()
            if i % every == every - 1:
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad()
                if not step_each_micro_batch:
                    sparsify.step(model)
            if step_each_micro_batch:
                sparsify.step(model)
    return [str(w.message) for w in caught if IDLE in str(w.message)]


def test_a_step_per_micro_batch_is_told():
    model = sparsify.sparsify(small(), "gmp", total_steps=100)
    said = accumulate(model, torch.optim.SGD(model.parameters(), lr=0.01), 80, 4, step_each_micro_batch=True)
    assert len(said) == 1 and "only after the optimizer.step that ends each accumulation" in said[0]


def test_a_step_per_optimizer_step_under_accumulation_is_quiet():
    model = sparsify.sparsify(small(), "gmp", total_steps=100)
    assert accumulate(model, torch.optim.SGD(model.parameters(), lr=0.01), 160, 4, step_each_micro_batch=False) == []


def test_a_grad_scaler_that_skips_every_step_is_told():
    model = sparsify.sparsify(small(), "st3", total_steps=100)
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.step()  # one real step: the model is known to be stepped by this optimizer
    said = accumulate(model, opt, 30, 1, step_each_micro_batch=False, scaler=scaler)
    assert len(said) == 1 and "GradScaler" in said[0]


def test_sparse_layers_no_optimizer_steps_are_not_asked_about():
    """A frozen sparsified backbone, a trained head: the sparse layers are never stepped."""
    recipe = {"version": 1, "rules": [{"match": {"name": "0"}, "method": "magnitude"}]}
    model = sparsify.sparsify(small(), recipe, total_steps=100)
    model.get_submodule("0").requires_grad_(False)
    opt = torch.optim.SGD(model.get_submodule("2").parameters(), lr=0.01)
    assert accumulate(model, opt, 60, 1, step_each_micro_batch=True) == []


@pytest.mark.parametrize("recipe", ["tl1", "activation-hoyer", "dual"])
def test_a_penalty_added_on_the_last_micro_batch_only_is_refused_by_name(recipe):
    """The earlier micro-batch's term was backpropagated away with its loss: torch said only "Trying
    to backward through the graph a second time ... retain_graph=True", naming neither sparsify
    nor the penalty. Two forwards before one backward (two views of a batch) stay valid."""
    torch.manual_seed(0)
    model = sparsify.sparsify(small(), recipe, total_steps=4, begin=0) if recipe != "dual" else \
        sparsify.sparsify(small(), recipe, total_steps=4)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    for _ in range(3):  # dual's activations stage begins at step 2
        both = F.cross_entropy(model(x), y) + F.cross_entropy(model(x + 1), y) + sparsify.penalty(model)
        both.backward()
        sparsify.step(model)
    F.cross_entropy(model(x), y).backward()  # micro-batch 1, without the penalty
    loss = F.cross_entropy(model(x), y) + 0.0
    with pytest.raises(RuntimeError, match=r"^sparsify.penalty: the \S+ penalty holds terms of earlier forwards "
                                           r"whose loss was already backpropagated"):
        sparsify.penalty(model)
    loss.backward()


def test_an_optimizer_whose_filter_left_out_the_thresholds_is_not_told_it_came_first():
    """An optimizer built after sparsify() from a filter that drops STR's '.s' thresholds was told
    'the optimizer was built before sparsify()' as a fact: the warning gives both causes."""
    model = sparsify.sparsify(resnet(), "str", total_steps=4, example_inputs=X)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.endswith(".s")], lr=0.01)
    said = steps(model, [opt])
    assert len(said) == 1 and "may have been built before sparsify()" in said[0], said
    assert "a filter of the parameters that left them out" in said[0] and "'<layer>.s'" in said[0]
    assert "the optimizer was built before" not in said[0]


RATE = "times in the last 20 sparsify.step calls"


def every_other(model, optimizers, n: int, every: int = 2) -> list[str]:
    """``n`` iterations, each stepping every optimizer; sparsify.step after every ``every``-th."""
    return steps(model, optimizers, n, every, (torch.randn(4, 8), torch.tensor([0, 1, 2, 3])), RATE)


def test_a_step_on_every_other_optimizer_step_is_told():
    """It kept the lag at 2 (the check waits for 20 in a row): nothing was said while gmp's ramp
    stretched to twice the run and ST-3 / N:M never reached their fix."""
    model = sparsify.sparsify(small(), "gmp", total_steps=100)
    said = every_other(model, [torch.optim.SGD(model.parameters(), lr=0.01)], 100)
    assert len(said) == 1 and "stepped this model 40 times" in said[0] and "2 times slower" in said[0], said


def test_two_optimizers_stepping_one_model_each_step_are_quiet():
    """Weights and STR's thresholds in two optimizers: two steps per sparsify.step, one each."""
    model = sparsify.sparsify(small(), "str", total_steps=100)
    thresholds = [p for n, p in model.named_parameters() if n.endswith(".s")]
    weights = [p for n, p in model.named_parameters() if not n.endswith(".s")]
    assert thresholds
    optimizers = [torch.optim.SGD(weights, lr=0.01), torch.optim.SGD(thresholds, lr=0.01)]
    assert every_other(model, optimizers, 60, every=1) == []


# -- sparsify.step called before optimizer.step ----------------------------------------------------

ORDER = "ran after sparsify.step() with no training forward between"


def _conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


def ordered(model, opt, n: int, step_first: bool, between=None, closure: bool = False) -> list[str]:
    x = torch.randn(4, 3, 8, 8) if isinstance(model[0], torch.nn.Conv2d) else torch.randn(4, 8)
    y = torch.tensor([0, 1, 2, 3])

    def loss_of():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + sparsify.penalty(model)
        loss.backward()
        return loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            if closure:
                opt.step(loss_of)
                sparsify.step(model)
                continue
            loss = loss_of()
            if step_first:
                sparsify.step(model, loss)
                if between is not None:
                    between()
                opt.step()
            else:
                opt.step()
                sparsify.step(model, loss)
                if between is not None:
                    between()
    return [str(w.message) for w in caught if ORDER in str(w.message)]


@pytest.mark.parametrize("recipe", ["st3", "str", "gmp", "nm-2-4", "sas", "tl1", "dual", "semi-structured"])
def test_a_step_before_the_optimizer_step_is_told_once(recipe):
    """Nothing fails when sparsify.step comes before optimizer.step(): masks and thresholds come
    from weights one update old. Said once, at the optimizer step that follows it."""
    net = _conv_net() if recipe == "semi-structured" else small()
    model = sparsify.sparsify(net, recipe, total_steps=20)
    said = ordered(model, torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01), 4, step_first=True)
    assert len(said) == 1 and said[0].startswith("sparsify: SGD.step() ran after sparsify.step()"), said
    assert "forward, backward, optimizer.step(), sparsify.step(model)" in said[0]


def test_a_forward_without_gradients_between_does_not_hide_the_order():
    model = sparsify.sparsify(small(), "st3", total_steps=20)

    def evaluate():
        with torch.no_grad():
            model(torch.randn(2, 8))
    said = ordered(model, torch.optim.SGD(model.parameters(), lr=0.01), 3, step_first=True, between=evaluate)
    assert len(said) == 1


@pytest.mark.parametrize("recipe", ["st3", "tl1"])
def test_the_documented_order_is_quiet_with_validation_and_closures(recipe):
    model = sparsify.sparsify(small(), recipe, total_steps=20)

    def validate():
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 8))
        model.train()
    assert ordered(model, torch.optim.SGD(model.parameters(), lr=0.01), 4, step_first=False, between=validate) == []
    # LBFGS runs its forward inside step(): the step after sparsify.step has one
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    assert ordered(model, lbfgs, 3, step_first=False, closure=True) == []
