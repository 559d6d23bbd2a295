"""The activation sparsity ``report`` shows is that of the user's last evaluation (the eval-mode
forwards since the last ``model.eval()`` or training forward), as the fraction of zeros over every
regularized value. Before, ``finalize``'s check, ``measure``'s batches and the report's own MAC
count added to it, a second evaluation without training in between added to the first, and the
total was a plain mean over layers of different sizes (mobilenet_v3_small with tl1: 0.28 reported,
0.19 measured)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sparsify

VAL = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
OTHER = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) + 1.0


def _trained():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    model = sparsify.sparsify(net, "tl1", total_steps=2, example_inputs=(VAL[:2],))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        loss = F.cross_entropy(model(VAL), torch.arange(8) % 3) + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model)
    return model


def _truth(model, x) -> tuple[float, list[float]]:
    """Zeros over every regularized value and per node, from hooks on the regularizer nodes."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
             for n, m in model.named_modules() if type(m).__name__ == "ActivationRegularizer"]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    zeros, total = sum(int((t == 0).sum()) for t in seen), sum(t.numel() for t in seen)
    return zeros / total, [float((t == 0).float().mean()) for t in seen]


def _said(model) -> tuple[float, list[float]]:
    r = sparsify.report(model)
    return r.totals["achieved"]["activations"], [row.achieved for row in r.layers]


def test_the_report_shows_the_last_evaluation_weighted_by_size():
    model = _trained()
    total, per_node = _truth(model, VAL)  # the user's evaluation on VAL (hooks observe it)
    assert len(set(per_node)) > 1  # two nodes of different sparsity and size: a plain mean would differ
    said = _said(model)
    assert abs(said[0] - total) < 1e-9 and said[1] == per_node
    sparsify.finalize(model)  # its check forward
    sparsify.measure(model, [OTHER])  # another data set, measured on its own
    assert _said(model) == said
    _truth(model, OTHER)  # a new evaluation, on OTHER
    other = _said(model)
    assert other != said
    _truth(model, VAL)  # and again on VAL: VAL's numbers, not VAL + OTHER + VAL
    assert _said(model) == said


def test_an_old_activation_count_says_its_step():
    """The figure of an evaluation at step 0 was shown under 'step 40 of 40' as the current one."""
    torch.manual_seed(0)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), "tl1", total_steps=3)
    x = torch.randn(4, 8)
    with torch.no_grad():
        m.eval()(x)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(3):
        (m(x).sum() + sparsify.penalty(m)).backward()
        opt.step()
        sparsify.step(m)
    assert "counted by the last eval-mode forward, before the latest training forwards" in str(sparsify.report(m))
    with torch.no_grad():
        m.eval()(x)
    assert "counted by the last eval-mode forward" not in str(sparsify.report(m))
