"""Every built-in recipe's model survives what PyTorch users do to models: ``.to(dtype)``,
``.float()`` / ``.double()``, ``share_memory()``, ``copy.deepcopy``, pickle, ``torch.save(model)``
and ``state_dict`` round trips. After each, the copy gives the original's outputs, its groups manage
the copy's own layers (not the original's), and training goes on exactly as it would have."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision

import sparsify
from sparsify.core.state import find_state

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 2, 3, 4])
STEPS = 6  # total_steps: every recipe's schedule (fractions of it) is past its first phase at step 4
RECIPES = sorted(sparsify.builtin_recipes())


def trained(recipe: str, steps: int = 4):
    """A squeezenet1_1 sparsified with ``recipe`` after ``steps`` optimizer steps (masks, thresholds and
    penalties in play), in eval mode."""
    torch.manual_seed(0)
    model = sparsify.sparsify(torchvision.models.squeezenet1_1(num_classes=10), recipe, example_inputs=X[:2],
                              total_steps=STEPS)
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01, momentum=0.9)
    for _ in range(steps):
        one_step(model, opt)
    return model.eval(), opt


def one_step(model, opt) -> None:
    model.train()
    torch.manual_seed(1)  # squeezenet's dropout: the same masks for a model and its copy
    task = F.cross_entropy(model(X), Y)
    loss = task + sparsify.penalty(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sparsify.step(model, loss=task)
    model.eval()


def torch_save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # a model this test made: trusted


def assert_groups_own(model) -> None:
    """Every group member is a module of ``model`` itself, and the state holds no module tree."""
    mods = {id(m) for m in model.modules()}
    state = find_state(model)
    for gname, group in state.groups.items():
        for name, member in group.members.items():
            assert id(member) in mods, f"{gname}: member {name} is not a module of this model"
            assert member is model.get_submodule(name), f"{gname}: member {name} is not the model's {name}"


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": torch_save_load,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_copies_give_the_same_outputs_and_train_on_identically(recipe, how):
    model, opt = trained(recipe)
    with torch.no_grad():
        ref = model(X)
    other = COPIES[how](model)
    assert_groups_own(other)
    assert int(find_state(other).step) == int(find_state(model).step) == 4
    with torch.no_grad():
        assert torch.equal(other(X), ref)
    # the copy trains on as the original does (same state: masks, thresholds, generators, counters)
    opt2 = torch.optim.SGD(sparsify.param_groups(other, 1e-4), lr=0.01, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the momentum tensors
    one_step(model, opt)
    one_step(other, opt2)
    with torch.no_grad():
        assert torch.equal(other(X), model(X))
    assert sparsify.report(other).to_dict() == sparsify.report(model).to_dict()


def safetensors_round_trip(state: dict) -> dict:
    """What ``save_pretrained``, ``Trainer`` checkpoints and accelerate's ``save_state`` write:
    safetensors, which holds tensors only (no dicts, no strings)."""
    try:
        from safetensors.torch import load, save
    except ImportError:
        pytest.skip("safetensors is not installed (it comes with transformers: pip install fx-sparsify[dev])")
    return load(save(state))


STATE_COPIES = {"deepcopy": copy.deepcopy, "safetensors": safetensors_round_trip}


@pytest.mark.parametrize("how", list(STATE_COPIES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_state_dict_round_trip_into_a_fresh_sparsify(recipe, how):
    model, opt = trained(recipe)
    fresh, _ = trained(recipe, steps=0)
    fresh.load_state_dict(STATE_COPIES[how](model.state_dict()))
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    assert sparsify.report(fresh).to_dict() == sparsify.report(model).to_dict()
    # and it trains on as the original does (thresholds, masks, generators, stage flags all loaded)
    opt2 = torch.optim.SGD(sparsify.param_groups(fresh, 1e-4), lr=0.01, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    one_step(model, opt)
    one_step(fresh, opt2)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


@pytest.mark.parametrize("recipe", RECIPES)
def test_dtype_moves_and_shared_memory(recipe):
    model, _ = trained(recipe)
    with torch.no_grad():
        ref = model(X)
    model.double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(X.double()), ref.double(), rtol=1e-4, atol=1e-5)
    model.float()
    model.to(torch.float64).to(torch.float32).to("cpu")
    model.share_memory()
    assert all(p.is_shared() for p in model.parameters())
    assert_groups_own(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref, rtol=1e-4, atol=1e-5)
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01)
    one_step(model, opt)  # the moved model still trains and steps
    with torch.no_grad():
        assert torch.isfinite(model(X)).all()


@pytest.mark.parametrize("recipe", RECIPES)
def test_moves_to_a_gpu_and_back(recipe):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: .to('cuda') is tested where there is one")
    model, _ = trained(recipe)
    with torch.no_grad():
        ref = model(X)
    model.cuda()
    assert all(b.is_cuda for b in model.buffers())
    with torch.no_grad():
        torch.testing.assert_close(model(X.cuda()).cpu(), ref, rtol=1e-3, atol=1e-4)
    model.cpu()
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref, rtol=1e-3, atol=1e-4)


class _FunctionalDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(F.dropout(torch.relu(self.fc(x)), 0.5, self.training))


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copied_graph_still_reads_the_mode_at_run_time(how):
    # torch rebuilds an unpickled GraphModule by tracing its code again with the tracer class that
    # made it: that must not leave the modules' ``training`` flags as trace-time proxies
    model = sparsify.sparsify(_FunctionalDropout(), "st3", example_inputs=(torch.zeros(2, 8),), total_steps=10)
    other = COPIES[how](model)
    assert all(isinstance(m.training, bool) for m in other.modules())
    x = torch.randn(64, 8)
    other.train()
    torch.manual_seed(0)
    dropped = other(x)
    other.eval()
    assert not torch.equal(dropped, other(x))
    assert torch.equal(other(x), model.eval()(x))


@pytest.mark.parametrize("recipe", ["dual", "semi-structured", "st3"])
def test_checkpoints_with_extra_state_as_dicts_still_load(recipe):
    """Before extra state became a uint8 tensor (safetensors), it was saved as a dict."""
    from sparsify.core.extra_state import unpack
    model, _ = trained(recipe)
    old = {k: unpack(v) if k.endswith("_extra_state") else v for k, v in model.state_dict().items()}
    assert any(isinstance(v, dict) for v in old.values())
    fresh, _ = trained(recipe, steps=0)
    fresh.load_state_dict(old)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    assert sparsify.report(fresh).to_dict() == sparsify.report(model).to_dict()
