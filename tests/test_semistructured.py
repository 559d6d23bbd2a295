"""Semi-structured activation masks: the oracles of docs/methods/semistructured.md, best-loss tracking, DDP agreement."""
from __future__ import annotations

import copy
import json
import os
import socket
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsify
from sparsify.methods.semistructured import PositionMask, position_mask

X32 = torch.randn(2, 3, 32, 32)


def masks(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PositionMask)}


def group(model):
    return next(iter(model.sparsify_state.groups.values()))


def recipe(**params):
    return {"version": 1, "rules": [{"match": {"type": "Conv2d"}, "method": "semi-structured", "params": params}]}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_position_mask_drops_round_s_hw_lowest_pooled_scores():
    scores = torch.rand(32, 32)
    for size, s in [((16, 16), 0.2), ((7, 7), 0.2), ((8, 4), 0.33), ((1, 1), 0.4), ((5, 5), 0.0)]:
        m = position_mask(scores, size, s)
        k = int((m == 0).sum())
        assert k == round(s * size[0] * size[1])
        pooled = F.adaptive_avg_pool2d(scores[None, None], size)[0, 0]
        if 0 < k < m.numel():
            assert float(pooled[m == 0].max()) <= float(pooled[m == 1].min())


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (2, 0, 1), (1, 2, 2), (3, 1, 1)])
def test_masked_conv_equals_gemm_on_masked_im2col_columns(stride, padding, dilation):
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation, bias=False)
    x = torch.randn(2, 3, 13, 13)
    m = sparsify.sparsify(nn.Sequential(conv), recipe(sparsity=0.3, begin=0, end=0), example_inputs=x)
    pm = next(iter(masks(m).values()))
    y = m(x)
    h, w = y.shape[-2:]
    cols = F.unfold(x, 3, dilation=dilation, padding=padding, stride=stride)  # (N, Cin*9, L)
    expected = (conv.weight.reshape(5, -1) @ (cols * pm.mask.reshape(1, 1, -1))).reshape(2, 5, h, w)
    assert torch.allclose(y, expected, atol=1e-5)
    assert int((pm.mask == 0).sum()) == round(0.3 * h * w)
    # shared by every channel and sample, no rescaling of the kept positions
    assert bool((y[:, :, pm.mask == 0] == 0).all())
    assert torch.equal(y[:, :, pm.mask == 1], conv(x)[:, :, pm.mask == 1])


def test_sparsity_zero_is_bit_identical_to_dense(resnet):
    m = sparsify.sparsify(resnet, "semi-structured", example_inputs=X32, sparsity=0.0, begin=0, end=2)
    ref = copy.deepcopy(resnet).eval()
    m.eval()
    for _ in range(3):
        assert torch.equal(m(X32), ref(X32))
        sparsify.step(m, loss=1.0)
    assert not any(pm.enabled for pm in masks(m).values())


def test_schedule_closed_form():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    m = sparsify.sparsify(net, "semi-structured", example_inputs=torch.randn(1, 3, 12, 12), total_steps=100)
    g = group(m)
    assert (g.begin, g.end) == (10, 90)
    assert g.target(10) == 0.0 and g.target(5) == 0.0
    assert g.target(50) == pytest.approx(0.2 * 0.75)  # p = 1/2: 1 - (1/2)^2
    assert g.target(90) == pytest.approx(0.2)
    assert g.target(30) == pytest.approx(0.2 * (1 - 0.75 ** 2))



def test_schedule_is_quadratic_when_a_rule_omits_power():
    # the paper's ramp, s·(1 − (1 − p)²), also for a rule that does not spell out `power`
    m = sparsify.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3)), recipe(sparsity=0.4, begin=10, end=90),
                          example_inputs=torch.randn(1, 3, 12, 12))
    g = group(m)
    for t, p in ((50, 0.5), (30, 0.25), (70, 0.75)):
        assert g.target(t) == pytest.approx(0.4 * (1 - (1 - p) * (1 - p)))
    assert g.target(50) == pytest.approx(0.3)  # 0.75·s at the midpoint (a cubic ramp: 0.875·s)


def test_without_a_ramp_the_target_is_the_sparsity_from_end_on():
    # begin == end: no ramp, the report's target jumps from 0 to `sparsity` at that step
    m = sparsify.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3)), recipe(sparsity=0.4, begin=3, end=3),
                          example_inputs=torch.randn(1, 3, 12, 12))
    assert [group(m).target(t) for t in (2, 3, 4)] == [0.0, 0.4, 0.4]


def test_resnet18_masks_per_layer_shared_by_resolution_and_1x1_skipped(resnet):
    m = sparsify.sparsify(resnet, "semi-structured", example_inputs=X32, begin=0, end=0)
    ms = masks(m)
    assert len(ms) == 17 and not any("downsample" in n for n in ms)
    by_size = {}
    for pm in ms.values():
        h, w = pm.mask.shape
        assert int((pm.mask == 0).sum()) == round(0.2 * h * w)
        by_size.setdefault((h, w), []).append(pm.mask)
    assert len(by_size) > 1
    for group_masks in by_size.values():
        assert all(torch.equal(group_masks[0], g) for g in group_masks)
    m_all = sparsify.sparsify(resnet, "semi-structured", example_inputs=X32, skip_1x1=False, begin=0, end=0)
    assert len(masks(m_all)) == 20
    # the mask sits between the conv and its BatchNorm
    code = m.code
    assert code.index("self.conv1(x)") < code.index("self.conv1_pmask(conv1)") < code.index("self.bn1(conv1_pmask)")


def test_fresh_map_each_ramp_step_best_loss_kept_and_frozen():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    x = torch.randn(2, 3, 16, 16)
    m = sparsify.sparsify(net, recipe(sparsity=0.5, begin=0, end=6), example_inputs=x)
    g = group(m)
    # the loss of step t belongs to the map applied since the previous step; the lowest loss is
    # handed in while the map was drawn at sparsity 0, which must never count
    losses = [0.0, 5.0, 4.0, 1.0, 3.0, 2.0]
    applied, sparsities = [], []
    for loss in losses:
        m(x)
        applied.append(g.scores.clone())
        sparsities.append(float(g.current_sparsity))
        sparsify.step(m, loss=loss)
    assert sparsities[0] == 0.0 and all(s > 0 for s in sparsities[1:])
    assert len({tuple(a.reshape(-1)[:4].tolist()) for a in applied[1:]}) == 5  # a fresh map every step
    assert bool(g.frozen) and float(g.best_loss) == 1.0
    assert torch.equal(g.scores, applied[3])
    for pm in masks(m).values():
        assert torch.equal(pm.mask, position_mask(applied[3], pm.mask.shape, 0.5))
    before = {n: pm.mask.clone() for n, pm in masks(m).items()}
    for _ in range(3):
        sparsify.step(m, loss=0.0)
    assert all(torch.equal(before[n], pm.mask) for n, pm in masks(m).items())
    assert "frozen" in str(sparsify.report(m))


def test_masks_stay_on_in_eval_and_finalize_keeps_constant_masks(resnet):
    m = sparsify.sparsify(resnet, "semi-structured", example_inputs=X32, begin=0, end=0)
    m.eval()
    y = m(X32)
    f = sparsify.finalize(m)  # checks eval outputs
    fm = masks(f)
    # layer4's outputs are 1x1 at this size: round(0.2 * 1) = 0 positions, an identity node, dropped
    assert len(fm) == sum(pm.enabled for pm in masks(m).values()) == 13 and not hasattr(f, "sparsify_state")
    assert torch.equal(f(X32), y)
    assert not torch.equal(y, copy.deepcopy(resnet).eval()(X32))


def test_bn_folded_deployment_writes_the_folded_bias_at_masked_positions():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    m = sparsify.sparsify(nn.Sequential(conv, bn), recipe(sparsity=0.25, begin=0, end=0), example_inputs=x).eval()
    mask = next(iter(masks(m).values())).mask
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w_folded = conv.weight * scale.reshape(-1, 1, 1, 1)
    b_folded = bn.bias - bn.running_mean * scale
    folded = F.conv2d(x, w_folded, None, padding=1) * mask + b_folded.reshape(1, -1, 1, 1)
    assert torch.allclose(m(x), folded, atol=1e-5)
    assert not bool((m(x)[:, :, mask == 0] == 0).any())  # after BN the masked positions are not 0


def test_checkpoint_resume_continues_the_same_draws():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(1, 3, 8, 8)
    rec = recipe(sparsity=0.5, begin=0, end=20)
    a = sparsify.sparsify(net, rec, example_inputs=x)
    for loss in (3.0, 2.0, 4.0):
        sparsify.step(a, loss=loss)
    b = sparsify.sparsify(net, rec, example_inputs=x)
    b.load_state_dict(a.state_dict())
    assert float(group(b).best_loss) == 2.0
    for m in (a, b):
        sparsify.step(m, loss=1.0)
    assert torch.equal(next(iter(masks(a).values())).mask, next(iter(masks(b).values())).mask)
    assert torch.equal(group(a).best_scores, group(b).best_scores)


# ---------------------------------------------------------------------------------------------
# torch.distributed: masks broadcast from rank 0, loss averaged; penalty computed in forward
# ---------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # ranks differ in data; the recipe seed differs too: only a broadcast aligns them
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    torch.manual_seed(0)
    net_init = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    rec = {"version": 1, "rules": [
        {"match": {"type": "Conv2d"}, "method": "semi-structured",
         "params": {"sparsity": 0.5, "begin": 0, "end": 4, "seed": rank}},
        {"match": {"type": "ReLU"}, "method": "tl1", "params": {"lam": 1.0}}]}
    m = sparsify.sparsify(net_init, rec, example_inputs=x)
    ddp = DDP(m)
    torch.manual_seed(100 + rank)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(6):
        xb = torch.randn(2, 3, 8, 8)
        loss = ddp(xb).square().mean()
        pen = sparsify.penalty(ddp)
        assert isinstance(pen, torch.Tensor) and pen.requires_grad
        (loss + pen).backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(ddp, loss=loss)
    result = {"masks": [pm.mask.tolist() for pm in masks(m).values()],
              "weight": m.get_submodule("0").weight.reshape(-1)[:5].tolist(),
              "best": float(group(m).best_loss)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_ddp_ranks_agree_on_masks_and_train_with_the_penalty(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["masks"] == r1["masks"]
    assert any(0.0 in row for mk in r0["masks"] for row in mk)
    assert r0["weight"] == pytest.approx(r1["weight"])  # gradients (penalty included) were all-reduced
    assert r0["best"] == r1["best"]


def test_another_resolution_is_refused_and_leaves_the_masks_size():
    m = PositionMask(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    y = torch.ones(1, 3, 2, 2)
    with pytest.raises(RuntimeError, match=r"mask is \(2, 2\) but this conv's output is \(3, 3\).*resolution its masks"):
        m(torch.ones(1, 3, 3, 3))
    assert m.size == (2, 2)  # the size the masks were made for, which the group's updates read
    assert torch.equal(m(y)[0, 0], torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


def test_a_finalized_model_at_another_resolution_names_the_layer_and_sizes():
    """The finalized model said only 'this conv's output size is not the one its mask was made
    for', where the training model names the conv and both sizes; in TorchScript too."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    m = sparsify.sparsify(net, "semi-structured", example_inputs=torch.randn(1, 3, 8, 8), begin=0, end=0,
                          sparsity=0.3)
    final = sparsify.finalize(m)
    want = r"mask is \(8, 8\) but 0's output is \(16, 16\): run the model at the input resolution it was trained at"
    for model in (final, torch.jit.script(final)):
        with pytest.raises((RuntimeError, torch.jit.Error), match=want):  # (TorchScript's is no RuntimeError)
            model(torch.randn(1, 3, 16, 16))


def test_masks_keep_the_example_resolution_and_training_at_another_is_refused_at_the_step():
    """The masks were made for the size of the latest forward: a step at 96x96 after example_inputs
    at 64x64 made 96x96-sized masks, and the next 64x64 call (and finalize) failed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    model = sparsify.sparsify(net, "semi-structured", total_steps=5, example_inputs=torch.zeros(1, 3, 16, 16))
    with torch.no_grad():
        model(torch.randn(1, 3, 24, 24))  # evaluating at another size before masks are on is no training
    loss = model(torch.randn(2, 3, 24, 24)).square().mean()
    loss.backward()
    said = (r"^semi-structured: a training forward ran 0 at output size 24x24, but its position mask is made for "
            r"16x16, its size on sparsify\(\)'s example_inputs \(16x16\): .*; train at that resolution, or give "
            r"sparsify\(\.\.\.\) example_inputs at the resolution you train at$")
    with pytest.raises(RuntimeError, match=said):
        sparsify.step(model, loss.detach())
    for _ in range(4):  # at the example resolution the run goes on, its masks at that size
        loss = model(X32[:, :, :16, :16]).square().mean()
        loss.backward()
        sparsify.step(model, loss.detach())
    assert [tuple(m.mask.shape) for m in masks(model).values()] == [(16, 16), (8, 8)]
    assert any(bool((m.mask == 0).any()) for m in masks(model).values())
    sparsify.finalize(model)


def test_a_step_refused_for_another_resolution_leaves_the_state_as_it_was():
    """The refused step had counted itself before the check: the run went on one step ahead of
    a run that never had the bad batch (its ramp, masks and frozen map all shifted by one)."""
    def run(bad_batch: bool) -> dict:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
        model = sparsify.sparsify(net, recipe(begin=2, end=4, sparsity=0.5), example_inputs=torch.zeros(1, 3, 16, 16))
        for i in range(6):
            if bad_batch and i == 1:  # before the masks come on: the step refuses it
                loss = model(torch.randn(2, 3, 24, 24)).square().mean()
                loss.backward()
                with pytest.raises(RuntimeError, match="a training forward ran 0 at output size 24x24"):
                    sparsify.step(model, loss.detach())
            loss = model(X32[:, :, :16, :16] + i).square().mean()
            loss.backward()
            sparsify.step(model, loss.detach())
        return model.state_dict()

    clean, caught = run(False), run(True)
    assert int(caught["sparsify_state.step"]) == 6
    assert list(caught) == list(clean)
    for key, value in clean.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(caught[key], value), key
        else:
            assert repr(caught[key]) == repr(value), key


def test_without_example_inputs_the_first_forward_sizes_the_masks():
    """sparsify's own guess (an image at 224²) is no resolution the caller chose: it sizes nothing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    model = sparsify.sparsify(net, "semi-structured", total_steps=3)
    for _ in range(3):
        loss = model(X32).square().mean()
        loss.backward()
        sparsify.step(model, loss.detach())
    assert [tuple(m.mask.shape) for m in masks(model).values()] == [(32, 32), (16, 16)]
    with pytest.raises(RuntimeError, match=r"mask is \(32, 32\) but 0's output is \(24, 24\)"):
        model(torch.randn(1, 3, 24, 24))


@pytest.mark.parametrize("size, sparsity, said, first", [
    (32, 0.2, "masks no output position of 4 maps", "layer4.0.conv1 (1x1)"),  # round(0.2) = 0
    (32, 0.6, "masks every output position of 4 maps", "layer4.0.conv1 (1x1)"),  # round(0.6) = 1 of 1
    (32, 0.9, "masks every output position of 8 maps", "layer3.0.conv1 (2x2)"),  # round(3.6) = 4 of 4
    (64, 0.2, None, None),  # 2x2 maps and up: round(0.8) = 1 of 4
])
def test_masks_that_round_to_all_or_nothing_are_said(size, sparsity, said, first):
    """resnet18 at 32x32 has 2x2 and 1x1 maps: at 0.9 every position of 8 maps was masked (the
    model's output did not depend on its input, max |f(x1) - f(x2)| = 0) and at 0.2 the 1x1 maps
    masked nothing, both without a word."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # said by sparsify() (the example input gives the sizes), and not again by the steps
        m = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "semi-structured", example_inputs=x[:1],
                              sparsity=sparsity, total_steps=4)
        assert [w for w in caught if "output position of" in str(w.message)] or said is None
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for _ in range(2):
            loss = m(x).square().mean()
            opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(m, loss=loss)
    messages = [str(w.message) for w in caught if "output position of" in str(w.message)]
    if said is None:
        assert messages == []
    else:
        assert len(messages) == 1 and said in messages[0] and first in messages[0], messages
        rounds = "rounds to 0 positions there" if "no output" in said else "rounds to all H x W positions there"
        assert f"since {sparsity:g} x H x W {rounds}: " in messages[0], messages  # it read "round(...) of 0 positions"


@pytest.mark.parametrize("sparsity, said", [
    (0.2, "masks no output position of 1 map, since 0.2 x H x W rounds to 0 positions there: 2 (1x1); "
          "that layer stays dense"),
    (0.6, "masks every output position of 1 map, since 0.6 x H x W rounds to all H x W positions there: 2 (1x1); "
          "its layer's output no longer depends on its input"),
])
def test_one_map_that_rounds_to_all_or_nothing_is_said_in_the_singular(sparsity, said):
    """It read "1 map(s)" and "those layers stay dense" for one layer."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(net, "semi-structured", sparsity=sparsity, total_steps=3,
                          example_inputs=torch.zeros(1, 3, 2, 2))  # maps 2x2 and 1x1
    messages = [str(w.message) for w in caught if "output position of" in str(w.message)]
    assert len(messages) == 1 and said in messages[0], messages
