"""A finalized model is the user's classes again (docs/deployment.md#serving-without-fx-sparsify):
where the recipe leaves each traced graph as it was captured (every built-in recipe but SAS and
semi-structured), finalize gives each traced module its own class back, running its own forward,
so ``torch.save(final)`` loads where fx-sparsify is not installed. Before, every finalized model
was a graph subclass from ``passes.traced`` and its pickle needed fx-sparsify."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.fx as fx
import torchvision

import sparsify

RECIPES = sorted(sparsify.builtin_recipes())
KEEP_GRAPHS = {"sas", "sas-m4", "semi-structured"}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# loads a pickled model in a process where importing fx-sparsify fails, prints its output's sum
LOADER = """
import importlib.abc, sys, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("sparsify", "passes"):
            raise ImportError("fx-sparsify is not installed here: " + name)
sys.meta_path.insert(0, Block())
model = torch.load(sys.argv[1], weights_only=False)
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    out = model(x)
print(type(model).__name__, repr(float(out.double().sum())))
"""


def trained(recipe, net=None, x=X):
    torch.manual_seed(0)
    net = net if net is not None else torchvision.models.resnet18(num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(net, recipe, total_steps=2, example_inputs=x)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for _ in range(2):
            loss = m(x).logsumexp(1).mean() + sparsify.penalty(m)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sparsify.step(m, loss.detach())
        return m, sparsify.finalize(m)


def graphs(model):
    return [n for n, mod in model.named_modules() if isinstance(mod, fx.GraphModule)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_finalized_model_is_the_users_class(recipe):
    m, final = trained(recipe)
    assert isinstance(final, torchvision.models.ResNet)
    if recipe in KEEP_GRAPHS:
        assert "" in graphs(final)  # the root's graph (SAS's layers finalize to small graphs too)
        return
    assert type(final) is torchvision.models.ResNet and graphs(final) == []
    assert {type(mod).__module__.split(".")[0] for mod in final.modules()} <= {"torch", "torchvision"}
    with torch.no_grad():  # what finalize checked, on the class's own forward
        torch.testing.assert_close(final(X), m.eval()(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe", ["st3", "tl1"])
def test_its_pickle_loads_without_fx_sparsify(recipe, tmp_path):
    _, final = trained(recipe)
    torch.save(final, tmp_path / "final.pt")
    torch.save(X, tmp_path / "x.pt")
    run = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "final.pt"), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    name, total = run.stdout.split()
    with torch.no_grad():
        assert name == "ResNet" and float(total) == float(final(X).double().sum())


def test_a_graph_the_recipe_changed_is_kept_and_its_pickle_says_so(tmp_path):
    _, final = trained("sas")
    torch.save(final, tmp_path / "final.pt")
    torch.save(X, tmp_path / "x.pt")
    run = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "final.pt"), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "fx-sparsify is not installed here" in run.stderr


def test_accelerate_keeps_the_graphs():
    m, _ = trained("gmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = sparsify.finalize(m, accelerate={"decide": "never"})
    assert graphs(fast) == [""]


def test_transformers_and_mha_models_are_their_classes_again():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(transformers.LlamaForCausalLM(cfg), "st3", total_steps=2, example_inputs=(ids,))
        final = sparsify.finalize(m)
    assert type(final) is transformers.LlamaForCausalLM and graphs(final) == []
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=10)  # MultiheadAttention's in_proj_weight
    _, final = trained("nm-2-4", vit)
    assert type(final) is torchvision.models.VisionTransformer and graphs(final) == []
    assert type(final.encoder.layers[0].self_attention) is torch.nn.MultiheadAttention


class _OpaqueBlock(torch.nn.Module):
    """An untraceable block (it branches on its input) calling a GELU module: the activation gets
    a one-call graph of its own for the regularizer to follow (BART's and OPT's activation_fn,
    Qwen-MoE's experts' act_fn)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            x = x + 1
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("recipe", ["activation-l1", "activation-hoyer"])
def test_an_activations_one_call_graph_is_the_activation_again(recipe):
    x = torch.randn(4, 8)
    net = torch.nn.Sequential(_OpaqueBlock(), torch.nn.Linear(8, 2))
    m, final = trained(recipe, net, x)
    assert isinstance(m[0].act, fx.GraphModule)  # what this test is about: the shell was made
    assert graphs(final) == [] and type(final[0].act) is torch.nn.GELU
    with torch.no_grad():
        torch.testing.assert_close(final(x), m.eval()(x))
