"""What the user sees: divergence stops ``sparsify train``; warnings that say what went wrong, once."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import sparsify
from sparsify.app.cli import main
from sparsify.app.train import TrainConfig, TrainingDiverged, train




@pytest.mark.parametrize("recipe", ["st3", "sas", "tl1", "dense"])
def test_cli_stops_at_the_first_nonfinite_loss_with_one_line_and_status_2(recipe, tmp_path, capsys):
    rc = main(["train", "--model", "lenet5", "--recipe", recipe, "--epochs", "1", "--lr", "1e6", "--threads", "1",
               "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "training diverged at step" in err and "Traceback" not in err
    assert "--lr, now 1e+06" in err
    assert not (tmp_path / "report.json").exists()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Weights turned NaN in epoch 2: the run stops at once, the epoch-1 checkpoint stays."""
    import sparsify.app.train as app_train
    holder = {}
    real = app_train.sp.sparsify

    def keep(model, *a, **k):
        holder["model"] = real(model, *a, **k)
        return holder["model"]
    monkeypatch.setattr(app_train.sp, "sparsify", keep)
    on_step = lambda s: s == 30 and [p.data.fill_(float("nan")) for p in holder["model"].parameters()]  # noqa: E731
    with pytest.raises(TrainingDiverged, match=r"step 31 \(epoch 2\).*checkpoint.pt, is kept"):
        train(TrainConfig(model="lenet5", recipe="st3", epochs=2, threads=1, out=str(tmp_path), progress=False),
              on_step=on_step, quiet=True)
    from sparsify.app.checkpoint import load_checkpoint
    ckpt, meta = load_checkpoint(tmp_path)
    assert meta["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values()
                                   if isinstance(t, torch.Tensor) and t.is_floating_point())


def small():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_step_past_total_steps_warns_once():
    m = sparsify.sparsify(small(), "st3", total_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            sparsify.step(m)
    past = [str(w.message) for w in caught if "past total_steps" in str(w.message)]
    assert len(past) == 1 and "step 3 is past total_steps=2" in past[0]


@pytest.mark.parametrize("recipe", sorted(sparsify.builtin_recipes()))
def test_finalize_says_when_the_schedule_is_unfinished_or_step_was_never_called(recipe):
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 12 * 12, 4))
    m = sparsify.sparsify(net, recipe, total_steps=20, example_inputs=x[:1])
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(3):  # the classic slip: the optimizer steps, sparsify.step is forgotten
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with pytest.warns(UserWarning, match=r"sparsify.finalize: .*(is at sparsity 0 of its final|never called)"):
        sparsify.finalize(m)
    for _ in range(20):
        sparsify.step(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*past total_steps")  # (20 steps without the 3 forgotten)
        sparsify.finalize(m)  # at the schedule's end: nothing to say


def _lagging(m, opts, iterations, step_every):
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(iterations):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
            if (i + 1) % step_every == 0:
                sparsify.step(m)
    return [str(w.message) for w in caught if "since the last sparsify.step" in str(w.message)]


def test_optimizer_steps_outrunning_sparsify_step_warn_once():
    from sparsify.core.pace import LAG
    m = sparsify.sparsify(small(), "gmp", total_steps=100)
    said = _lagging(m, [torch.optim.SGD(m.parameters(), lr=0.01)], 2 * LAG + 5, step_every=LAG + 5)  # "per epoch"
    assert len(said) == 1 and f"SGD stepped {LAG} times" in said[0] and "not once per epoch" in said[0]


@pytest.mark.parametrize("recipe", ["tl1", "activation-l1", "activation-hoyer"])
def test_an_activation_recipe_without_sparsify_step_warns_and_keeps_no_graphs(recipe):
    """With no sparse layer to watch, the steps updating any of the model's parameters count
    (transformers' Trainer without the callback trained tl1 as a dense model, silently); the
    terms recorded by each forward, never collected, held their autograd graphs (activations)
    alive until a sparsify.step that never came: they are dropped after the next optimizer step."""
    from sparsify.core.pace import LAG
    m = sparsify.sparsify(small(), recipe, total_steps=100)
    said = _lagging(m, [torch.optim.SGD(m.parameters(), lr=0.01)], LAG + 2, step_every=10 ** 9)
    assert len(said) == 1 and "penalty recorded meanwhile was never added to a loss" in said[0]
    held = [len(l.records) for l in m.modules() if hasattr(l, "records")]
    assert held and max(held) <= 2  # the last forward's terms (a module called twice records twice)


def test_the_contract_kept_two_optimizers_or_frozen_sparse_layers_do_not_warn():
    from sparsify.core.pace import LAG
    m = sparsify.sparsify(small(), "str", total_steps=100)
    assert _lagging(m, [torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.01)], 2 * LAG, step_every=1) == []
    # weights and thresholds in two optimizers, one sparsify.step per iteration
    s = [p for n, p in m.named_parameters() if n.endswith(".s")]
    w = [p for n, p in m.named_parameters() if not n.endswith(".s")]
    opts = [torch.optim.SGD(w, lr=0.01), torch.optim.SGD(s, lr=0.01, weight_decay=1e-4)]
    assert _lagging(m, opts, 2 * LAG, step_every=1) == []
    # only the (dense) head of a model whose sparse layers are frozen: nothing to count
    only_first = {"version": 1, "rules": [{"match": {"name": "0"}, "method": "magnitude", "params": {"sparsity": 0.5}}]}
    m = sparsify.sparsify(small(), only_first, total_steps=100)
    head = [p for n, p in m.named_parameters() if n.startswith("3.")]
    assert _lagging(m, [torch.optim.SGD(head, lr=0.01)], 2 * LAG, step_every=10 ** 9) == []


def test_nonfinite_weights_warn_once_and_keep_the_thresholds():
    m = sparsify.sparsify(small(), "st3", total_steps=10, begin=0, end=0, fix=None)
    sparsify.step(m)
    masks = [l.mask.clone() for l in m.modules() if hasattr(l, "mask")]
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.step(m, loss=float("nan"))
        sparsify.step(m, loss=float("nan"))
    said = [str(w.message) for w in caught]
    assert len([s for s in said if "non-finite weights" in s]) == 1
    assert len([s for s in said if "the loss is nan" in s]) == 1
    assert all(torch.equal(a, l.mask) for a, l in zip(masks, [l for l in m.modules() if hasattr(l, "mask")]))


def test_semistructured_step_without_loss_warns_once():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    m = sparsify.sparsify(net, "semi-structured", total_steps=10, begin=0, end=5,
                          example_inputs=(torch.zeros(1, 1, 8, 8),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            m(torch.randn(2, 1, 8, 8))
            sparsify.step(m)
    said = [str(w.message) for w in caught if "semi-structured got no loss" in str(w.message)]
    assert len(said) == 1 and "sparsify.step(model, loss=loss)" in said[0]
    with warnings.catch_warnings(record=True) as caught:  # with a loss: silent
        warnings.simplefilter("always")
        m2 = sparsify.sparsify(net, "semi-structured", total_steps=10, begin=0, end=5,
                               example_inputs=(torch.zeros(1, 1, 8, 8),))
        for _ in range(4):
            sparsify.step(m2, loss=1.0)
    assert not [w for w in caught if "no loss" in str(w.message)]


@pytest.mark.parametrize("recipe, kind, shown, lo, hi", [
    ("sas", "input slots", "input slots", 0.5, 0.5),
    ("semi-structured", "output positions", "output positions", 0.1, 0.3),
    # not "activations sparsity" beside the "activation sparsity" of the layer inputs: two measures, two names
    ("tl1", "activations", "regularized-activation", 0.01, 1.0)])
def test_each_method_reports_what_it_sparsifies(recipe, kind, shown, lo, hi, tmp_path, capsys):
    """Report table, report.json, the epoch lines, history and the plots all carry the method's own
    sparsity (not a 0.0% weight sparsity), under the MAC names of docs/macs.md; the epoch line names
    the layer inputs' zeros and a regularizer's apart."""
    rc = main(["train", "--model", "cnn", "--recipe", recipe, "--epochs", "1", "--threads", "1",
               "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    achieved = report["report"]["totals"]["achieved"][kind]
    assert lo <= achieved <= hi
    epoch_line = out.splitlines()[0]
    assert f"  {shown} sparsity {achieved:.3f}" in epoch_line and "layer-input sparsity 0." in epoch_line
    assert " activation sparsity" not in epoch_line and " activations sparsity" not in epoch_line, epoch_line
    assert {r["sparsifies"] for r in report["report"]["layers"]} == {kind}
    assert "non-zero-weight MACs" in out and "MACs per sample (docs/macs.md): dense" in out
    assert report["history"][-1]["achieved"][kind] == pytest.approx(achieved, abs=0.05)  # 2 test batches there
    if recipe == "sas":  # the epoch line's activation sparsity counts the slots
        assert report["history"][-1]["activation_sparsity"] >= 0.5
        # M = 2: every SAS layer runs twice its narrow layer's MACs
        assert report["executed_macs"] == report["dense_macs"] + sum(r["macs"] for r in report["report"]["layers"])
    assert (tmp_path / "layers.png").stat().st_size > 0 and (tmp_path / "training.png").stat().st_size > 0


def test_transformers_model_gives_one_tracing_line_and_plan_keeps_the_reasons():
    """An activation recipe is told in one line; a weight recipe, which module-by-module rewriting
    serves fully, in none (it warned on every transformers model); the plan keeps the reasons."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg)
    ids = torch.zeros(1, 8, dtype=torch.long)
    for recipe, lines in (("activation-l1", 1), ("st3", 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = sparsify.sparsify(model, recipe, total_steps=10, example_inputs=(ids,), capture="fx")
        said = [str(w.message) for w in caught if "jsonschema is not installed" not in str(w.message)]
        assert len(said) == lines, (recipe, said)
        assert all("torch.fx could not trace" in s and "see sparsify.plan" in s for s in said)
    plan = sparsify.core.state.find_state(m).plan
    assert plan.fallbacks and all(f["reason"] for f in plan.fallbacks)
    assert "untraceable, kept as a leaf" in str(plan)


def test_demo_table_shows_what_sas_does(tmp_path, capsys):
    """The SAS row shows its slot sparsity and 2x executed MACs, not 0.0% / 0.0%."""
    from sparsify.app.demo import run_demo
    rows = run_demo(str(tmp_path), epochs=1, recipes=["sas"], quiet=True)
    sas = {r["name"]: r for r in rows}["sas"]
    assert sas["achieved"] == {"input slots": 0.5} and sas["activation_sparsity"] >= 0.5
    assert sas["dense_macs"] < sas["executed_macs"] <= 2 * sas["dense_macs"]
    table = (tmp_path / "comparison.md").read_text()
    for column in ("dense MACs", "non-zero-weight MACs", "effective MACs", "executed MACs"):
        assert column in table
    assert "input slots 50.0%" in table and "measured MACs" not in table
