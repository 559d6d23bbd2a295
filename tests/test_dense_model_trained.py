"""The model given to ``sparsify`` trained instead of the one it returned
(docs/index.md#the-training-loop-contract). The sparse model shares the given model's parameters,
so a loop that keeps forwarding the given model (``sparse = sparsify(model, ...)``, then
``loss = f(model(x))``) trains the shared weights while the masks progress on a model no loss
sees: the first ``sparsify.step`` after such an optimizer step warns, once. Correct loops stay
quiet, eager, compiled and exported, and so does a validation pass between the steps."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch._dynamo.utils import counters

import sparsify

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])
SAID = "no forward with gradients ran through its sparse layers"


def run(recipe, forwarded, steps=3, compile=False, graphs=None, **extra) -> list[str]:
    torch.manual_seed(0)
    graphs = [] if graphs is None else graphs
    dense = torchvision.models.resnet18(num_classes=10)
    model = sparsify.sparsify(dense, recipe, example_inputs=X, total_steps=steps, **extra)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    net = {"sparse": model, "given": dense}[forwarded]
    net = torch.compile(net, backend="aot_eager") if compile else net
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            loss = F.cross_entropy(net(X), Y) + (sparsify.penalty(model) if forwarded == "sparse" else 0)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sparsify.step(model)
            graphs.append(counters["stats"]["unique_graphs"])
            with torch.no_grad():
                model.eval(); model(X); model.train()  # a validation pass: no gradients, no training
    return [str(w.message) for w in caught if SAID in str(w.message)]


@pytest.mark.parametrize("recipe", sorted(sparsify.builtin_recipes()))
def test_training_the_given_model_is_told_once(recipe):
    said = run(recipe, "given")
    assert len(said) == 1 and "model = sparsify.sparsify(model" in said[0], said


@pytest.mark.parametrize("recipe", sorted(sparsify.builtin_recipes()))
def test_training_the_sparse_model_is_quiet(recipe):
    assert run(recipe, "sparse") == []


@pytest.mark.parametrize("recipe", ["gmp", "sas", "tl1"])
def test_a_compiled_sparse_model_is_quiet_and_compiles_once(recipe):
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    assert run(recipe, "sparse", compile=True, graphs=graphs) == []
    # the forward flag is a store replayed after the graph: no guard on it, no recompilation
    assert graphs[0] >= 1 and graphs == graphs[:1] * len(graphs), graphs


def test_a_compiled_given_model_is_told():
    torch._dynamo.reset()
    assert len(run("gmp", "given", compile=True)) == 1


def test_an_exported_capture_is_quiet_and_told():
    assert run("gmp", "sparse", capture="export") == []
    assert len(run("gmp", "given", capture="export")) == 1


class Attention(torch.nn.Module):
    """Only weights the sparse model reads without calling their layers: nn.MultiheadAttention's
    projections (its forward reads them) and a head computing with a layer's weight directly."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0].mean(1)
        return F.linear(h, self.head.weight, self.head.bias)


@pytest.mark.parametrize("forwarded, warned", [("sparse", 0), ("given", 1)])
def test_weights_read_without_calling_their_layer_count_as_forwarded(forwarded, warned):
    torch.manual_seed(0)
    dense = Attention()
    model = sparsify.sparsify(dense, "gmp", total_steps=3, example_inputs=torch.zeros(1, 5, 16))
    assert len(sparsify.report(model).layers) == 3  # in_proj, out_proj, head: none called as a module
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    net = {"sparse": model, "given": dense}[forwarded]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            F.cross_entropy(net(torch.randn(4, 5, 16)), Y).backward()
            opt.step()
            opt.zero_grad()
            sparsify.step(model)
    assert len([w for w in caught if SAID in str(w.message)]) == warned


def test_a_recipe_that_rewrote_nothing_is_quiet():
    # sas on a model without ReLU: no sparse layer to ask, and the optimizer steps the whole model
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "rewrote nothing", said by sparsify
        model = sparsify.sparsify(net, "sas", example_inputs=torch.zeros(1, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            F.cross_entropy(model(torch.randn(4, 8)), Y).backward()
            opt.step()
            sparsify.step(model)
    assert not [w for w in caught if SAID in str(w.message)]


def test_data_parallel_replicas_share_the_flag():
    # nn.DataParallel replicates the model at every forward with shallow copies of each module
    # (torch.nn.parallel.replicate: one per GPU); a flag set on a replica must reach the model
    from sparsify.core.forwards import forwarded
    model = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 4)), "gmp", total_steps=4)
    layer = model.get_submodule("0")
    replica = layer._replicate_for_data_parallel()
    replica._parameters = dict(layer._parameters)  # replicate() puts each GPU's copies here
    replica(torch.randn(2, 8)).sum().backward()
    assert forwarded([layer]) and not forwarded([layer])


class Refiner(torch.nn.Module):
    """RAFT's shape: a loop count argument; torch.export captures the call it was given."""

    def __init__(self):
        super().__init__()
        self.enc, self.upd = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, num_updates: int = 4):
        h, f = torch.zeros(int(x.shape[0]), 8, int(x.shape[2]), int(x.shape[3])), F.relu(self.enc(x))
        for _ in range(num_updates):
            h = F.relu(self.upd(h + f))
        return h


def test_a_call_the_graph_was_not_traced_for_is_named_not_the_given_model():
    """The forward ran the module's own code (another ``num_updates`` than the example's): the step's
    warning says so, not that the loop trains the model given to sparsify."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = sparsify.sparsify(Refiner(), "tl1", total_steps=4, example_inputs=x, capture="export")
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loss = model(x, num_updates=2).pow(2).mean() + sparsify.penalty(model)
            opt.zero_grad(); loss.backward(); opt.step()
            sparsify.step(model, loss)
    said = [str(w.message) for w in caught]
    assert any("was called with arguments its graph was not traced for" in s for s in said), said
    bypassed = [s for s in said if SAID in s]
    assert len(bypassed) == 1 and "ran its own forward" in bypassed[0], bypassed
    assert "model = sparsify.sparsify(model" not in bypassed[0]
