"""Code that asks questions of its inputs which a traced value answers wrongly, from libraries
beyond torchvision / timm / transformers (found by calling diffusers' models as their users do)."""
from __future__ import annotations

import copy as copy_module
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields

import torch
from torch import nn

import sparsify


class TimestepNet(nn.Module):
    """diffusers' UNet timestep handling: Python numbers become a tensor, tensors pass through."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.emb = nn.Linear(1, 8)

    def forward(self, sample, timestep):
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        return self.conv(sample) + self.emb(timesteps.float()[:, None])[:, :, None, None]


def test_is_tensor_of_a_traced_value_takes_the_tensor_branch():
    """``torch.is_tensor(Proxy)`` was False: the graph held the branch for Python numbers and the
    first training forward on the very example inputs raised deep in generated code."""
    torch.manual_seed(0)
    model = TimestepNet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "st3", example_inputs=(x, t), total_steps=3, copy=True)
    m.train()
    out = m(x, t)
    assert torch.allclose(out, model(x, t), atol=1e-6)  # step 0: nothing pruned yet
    out.square().mean().backward()
    assert m.conv.weight.grad is not None


@dataclass
class DecoderOutput(OrderedDict):
    """diffusers' ``BaseOutput`` / transformers' ``ModelOutput``: a dataclass that is a dict."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return DecoderOutput(sample=self.out(self.act(self.conv(x))))


def test_a_dataclass_dict_output_keeps_its_type():
    """A traced root returned a plain dict in training (``vae(x).sample`` raised AttributeError),
    the output class in eval (its own forward): the graph's dict is turned back into the class,
    also after finalize, deepcopy and pickling."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for recipe in ("st3", "semi-structured"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = sparsify.sparsify(Decoder(), recipe, example_inputs=(x,), total_steps=3)
            assert isinstance(m, torch.fx.GraphModule)
            for mode in (m.train, m.eval):
                mode()
                out = m(x)
                assert type(out) is DecoderOutput and out.sample.shape == (2, 3, 8, 8), recipe
            for copy in (sparsify.finalize(m), copy_module.deepcopy(m), pickle.loads(pickle.dumps(m))):
                assert type(copy.eval()(x)) is DecoderOutput, recipe
