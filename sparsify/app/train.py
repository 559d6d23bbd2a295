"""The training loop behind ``sparsify train`` and ``sparsify demo``.

The loop is the one the README asks users to write (loss = task loss + ``sparsify.penalty``;
``optimizer.step()`` then ``sparsify.step(model, loss=...)``; optimizer groups from
``sparsify.param_groups``), plus what a command-line run needs:

* determinism: the seed fixes the model initialisation, every epoch's shuffling (drawn from
  ``seed`` and the epoch number, not from a running generator) and the global RNG state, which is
  saved in checkpoints, so ``--resume`` continues bit-exactly, also from the middle of an epoch;
* checkpoints (``checkpoint.pt``) written atomically (temporary file + ``os.replace``) after every
  epoch and when Ctrl-C is pressed: the first Ctrl-C finishes the current step, saves and exits
  (status 130); a second one aborts at once;
* at the end: the report table, ``report.json``, ``history.json``, ``layers.png`` and
  ``training.png`` in the output folder.

Optimizer defaults: SGD (momentum 0.9, cosine learning rate over the run) with lr 0.05 and weight
decay 5e-4; a method can need other settings (:data:`METHOD_DEFAULTS`, e.g. STR sparsifies only
through weight decay), and a recipe can carry its own under ``options.train``. Explicit arguments
always win.
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sparsify as sp

from sparsify.app.checkpoint import CHECKPOINT, StopOnSigint, remove_stale_temporaries, write_json
from sparsify.app.resume import CONFIG, RUN_KEYS, claim_out, load_run, restore, save_run
from sparsify.app.data import load_data
from sparsify.app.summary import dead_inputs, dead_message, evaluate, library_measurement, summarize, weight_sparsity
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.app.models import build_model, input_channels
from sparsify.prepare.recipe import load_recipe
from sparsify.stats.runstats import activation_stats

__all__ = ["TrainConfig", "TrainingDiverged", "train", "config_from_args", "METHOD_DEFAULTS", "resolve_optimizer", "summarize"]

#: Optimizer settings a method needs to work in a short run (applied unless given explicitly).
#: STR sparsifies only through weight decay on its threshold parameters; with the library's
#: default threshold init (s_init = -10) the usual 5e-4 barely moves them in a short run: 2e-2 gives
#: 45% sparsity at 99.4% accuracy in the 184-step demo (lower it for long runs).
#: SAS removes the ReLUs its layers read through (both signs pass, each to its own weights): on
#: LeNet-5 / MNIST at lr 0.05 the logits grow from ~10 to NaN within 30 steps while dense trains;
#: at 0.02 it trains (docs/methods/sas.md, "Training it").
METHOD_DEFAULTS: dict[str, dict] = {
    "str": {"weight_decay": 2e-2},
    "sas": {"lr": 0.02},
}
BASE_DEFAULTS = {"sgd": {"lr": 0.05, "weight_decay": 5e-4}, "adam": {"lr": 1e-3, "weight_decay": 0.0},
                 "adamw": {"lr": 1e-3, "weight_decay": 1e-2}}


@dataclass
class TrainConfig:
    """Everything that defines a run (saved as ``config.json`` in the output folder)."""

    model: str = "cnn"
    recipe: str | None = None  # None or "dense": no sparsification
    overrides: dict = field(default_factory=dict)
    data: str = "digits"
    image_size: int | None = None
    width: float = 1.0
    epochs: int = 10
    batch_size: int = 64
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    seed: int = 0
    out: str | None = None
    progress: bool = True
    workers: int = 0
    resume: str | None = None
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    overwrite: bool = False  # replace the run already in ``out`` (else such an ``out`` is refused)

    @property
    def dense(self) -> bool:
        return self.recipe in (None, "", "dense")


def config_from_args(args) -> TrainConfig:
    """A :class:`TrainConfig` from the ``sparsify train`` arguments."""
    from sparsify.app.overrides import parse_overrides
    # --resume: None unless given, so a model factory saved in the run folder is imported only
    # when the user names it again
    model = args.model if args.resume else (args.model or "cnn")
    return TrainConfig(model=model, recipe=args.recipe, overrides=parse_overrides(args.set), data=args.data,
                       image_size=args.image_size, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                       optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                       momentum=args.momentum, seed=args.seed, out=args.out, progress=not args.no_progress,
                       workers=args.workers, resume=args.resume, threads=args.threads,
                       overwrite=getattr(args, "overwrite", False))


def resolve_optimizer(cfg: TrainConfig) -> dict:
    """The optimizer name, lr and weight decay for ``cfg``: explicit values, else the recipe's
    ``options.train``, else :data:`METHOD_DEFAULTS` of its methods, else :data:`BASE_DEFAULTS`.

    >>> resolve_optimizer(TrainConfig(recipe="st3"))
    {'optimizer': 'sgd', 'lr': 0.05, 'weight_decay': 0.0005}
    """
    hints: dict = {}
    if not cfg.dense:
        recipe = load_recipe(cfg.recipe, **cfg.overrides)
        for rule in recipe.rules:
            hints.update(METHOD_DEFAULTS.get(rule.method or "", {}))
        hints.update(recipe.options.get("train", {}) if isinstance(recipe.options, dict) else {})
    name = cfg.optimizer or hints.get("optimizer", "sgd")
    base = BASE_DEFAULTS[name]
    pick = lambda key, given: given if given is not None else hints.get(key, base[key])  # noqa: E731
    return {"optimizer": name, "lr": float(pick("lr", cfg.lr)), "weight_decay": float(pick("weight_decay",
                                                                                           cfg.weight_decay))}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _batches(dataset, indices: torch.Tensor, batch_size: int, workers: int = 0, fix_channels=None):
    """Batches of ``dataset`` in the order ``indices``; tensors are sliced, other datasets go
    through a DataLoader over exactly those indices."""
    fix = fix_channels or (lambda x: x)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        x_all, y_all = dataset.tensors
        for i in range(0, len(indices), batch_size):
            idx = indices[i:i + batch_size]
            yield fix(x_all[idx]), y_all[idx]
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices.tolist()), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    for x, y in loader:
        yield fix(x), y


def _channel_fixer(model_channels: int | None, data_channels: int):
    if model_channels is None or model_channels == data_channels:
        return None
    if data_channels == 1:
        return lambda x: x.expand(-1, model_channels, *x.shape[2:])
    if model_channels == 1:
        return lambda x: x.mean(1, keepdim=True)
    raise ValueError(f"the model takes {model_channels}-channel images and the data has {data_channels} channels")


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _default_out(cfg: TrainConfig) -> str:
    return os.path.join("runs", f"{cfg.model.replace(':', '_')}-{Path(str(cfg.recipe or 'dense')).stem}-s{cfg.seed}")


def _load_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict, dict]:
    saved, tensors, meta = load_run(Path(cfg.resume), cfg.model, TrainConfig.model)
    known = {f.name for f in fields(TrainConfig)}
    new = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    new.out, new.resume, new.progress, new.overwrite = str(cfg.resume), str(cfg.resume), cfg.progress, False
    if cfg.threads is not None:  # else the saved run's: the thread count changes float reductions
        new.threads = cfg.threads
    return new, tensors, meta


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: the run stops there (``sparsify train``: one line on stderr,
    exit status 2); the checkpoint of the last finished epoch is left as it was."""


def _diverged(opt: dict, out: Path, epoch: int, step: int, task_value: float, loss) -> str:
    what = (f"the loss is {task_value}" if not math.isfinite(task_value) else
            f"the loss is {float(loss.detach())} (the task loss is {task_value}: the penalty is not finite)")
    kept = (f"the last checkpoint, {out / CHECKPOINT}, is kept" if (out / CHECKPOINT).is_file()
            else "no checkpoint was written yet")
    return (f"training diverged at step {step} (epoch {epoch + 1}): {what}; stopped there, {kept}; "
            f"lower the learning rate (--lr, now {opt['lr']:g})")


def _make_optimizer(model, cfg: TrainConfig, opt: dict, total_steps: int):
    groups = (sp.param_groups(model, opt["weight_decay"]) if not cfg.dense
              else [{"params": list(model.parameters()), "weight_decay": opt["weight_decay"]}])
    if opt["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(groups, lr=opt["lr"], momentum=cfg.momentum)
    elif opt["optimizer"] == "adam":
        optimizer = torch.optim.Adam(groups, lr=opt["lr"])
    else:
        optimizer = torch.optim.AdamW(groups, lr=opt["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    return optimizer, sched


def train(cfg: TrainConfig, *, on_step=None, quiet: bool = False) -> dict:
    """Run ``cfg`` and return the result written to ``report.json`` (``interrupted`` is True
    when Ctrl-C stopped it; the checkpoint then lets ``TrainConfig(resume=out)`` continue).

    ``on_step(step)`` is called after every optimizer step (tests use it to interrupt a run).

    >>> r = train(TrainConfig(model="cnn", recipe="st3", epochs=1, out=tempfile.mkdtemp(), progress=False),
    ...           quiet=True)  # doctest: +SKIP
    """
    previous = torch.get_num_threads()
    try:
        return _train(cfg, on_step=on_step, quiet=quiet)
    finally:  # --threads is for this run: a caller's later work keeps its own setting
        torch.set_num_threads(previous)


def _train(cfg: TrainConfig, *, on_step=None, quiet: bool = False) -> dict:
    ckpt = None
    if cfg.resume:
        cfg, ckpt, meta = _load_resume(cfg)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be at least 1")
    out = Path(cfg.out or _default_out(cfg))
    cfg.out = str(out)
    say = (lambda *a: None) if quiet else print
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    data = load_data(cfg.data, image_size=cfg.image_size, workers=cfg.workers)
    _seed_all(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size, width=cfg.width)
    fix = _channel_fixer(input_channels(model), data.in_channels)
    n_train = len(data.train)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    example = (next(_batches(data.test, torch.arange(min(2, len(data.test))), 2, fix_channels=fix))[0],)
    if not cfg.dense:
        model = sp.sparsify(model, cfg.recipe, total_steps=total_steps, example_inputs=example, **cfg.overrides)
    opt_settings = resolve_optimizer(cfg)
    optimizer, sched = _make_optimizer(model, cfg, opt_settings, total_steps)

    history: list[dict] = []
    start_epoch, start_batch, running = 0, 0, {"loss": 0.0, "correct": 0, "seen": 0}
    if ckpt is not None:
        restore(model, optimizer, sched, ckpt, meta, cfg.resume)
        history, running = meta["history"], meta["running"]
        start_epoch, start_batch = meta["epoch"], meta["batch"]
        remove_stale_temporaries(out)  # of a writer that was killed
        say(f"resuming {out} at epoch {start_epoch + 1}, batch {start_batch} (step {start_epoch * steps_per_epoch + start_batch})")
    else:
        claim_out(out, cfg.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        write_json({**asdict(cfg), "resume": None, "overwrite": False}, out / CONFIG)
    run_settings = {k: asdict(cfg)[k] for k in RUN_KEYS}

    def checkpoint(epoch: int, batch: int) -> None:
        save_run(model, optimizer, sched, out, epoch=epoch, batch=batch, history=history, running=running,
                 total_steps=total_steps, run=run_settings)

    test_batches = lambda: _batches(data.test, torch.arange(len(data.test)), 500, cfg.workers, fix)  # noqa: E731
    interrupted = False
    warned_dead = False
    from tqdm import tqdm
    with StopOnSigint() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            order = _epoch_order(cfg.seed, epoch, n_train)[start_batch * cfg.batch_size:]
            bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not cfg.progress or quiet, leave=False, dynamic_ncols=True)
            model.train()
            refresh = max(1, steps_per_epoch // 10)
            sparsity_now = weight_sparsity(model, cfg.dense)
            for b, (x, y) in enumerate(_batches(data.train, order, cfg.batch_size, cfg.workers, fix), start_batch):
                logits = model(x)
                task = F.cross_entropy(logits, y)
                loss = task + sp.penalty(model) if not cfg.dense else task
                task_value = float(task.detach())
                if not math.isfinite(task_value if loss is task else float(loss.detach())):
                    bar.close()
                    raise TrainingDiverged(_diverged(opt_settings, out, epoch, epoch * steps_per_epoch + b + 1,
                                                     task_value, loss))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sched.step()
                if not cfg.dense:
                    sp.step(model, loss=task)
                running["loss"] += task_value * len(y)
                running["correct"] += int((logits.argmax(1) == y).sum())
                running["seen"] += len(y)
                bar.update(1)
                if (b + 1) % refresh == 0 or b + 1 == steps_per_epoch:
                    sparsity_now = weight_sparsity(model, cfg.dense)
                    bar.set_postfix(loss=f"{running['loss'] / running['seen']:.3f}",
                                    acc=f"{running['correct'] / running['seen']:.3f}",
                                    sparsity=f"{sparsity_now or 0:.3f}")
                if on_step is not None:
                    on_step(epoch * steps_per_epoch + b + 1)
                if stop.requested and b + 1 < steps_per_epoch:
                    checkpoint(epoch, b + 1)
                    interrupted = True
                    break
            bar.close()
            if interrupted:
                break
            start_batch = 0
            act = activation_stats(model, test_batches(), max_batches=2)
            target, achieved = None, {}
            if not cfg.dense:
                totals = sp.report(model).totals
                target, achieved = totals.get("target"), totals.get("achieved") or {}
            history.append({"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                            "train_loss": running["loss"] / max(running["seen"], 1),
                            "train_acc": running["correct"] / max(running["seen"], 1),
                            "test_acc": evaluate(model, test_batches()),
                            "weight_sparsity": weight_sparsity(model, cfg.dense), "target": target,
                            "activation_sparsity": act["activation_sparsity"], "achieved": achieved})
            running = {"loss": 0.0, "correct": 0, "seen": 0}
            h = history[-1]
            checkpoint(epoch + 1, 0)
            say(f"epoch {h['epoch']}/{cfg.epochs}: loss {h['train_loss']:.4f}  train acc {h['train_acc']:.4f}  "
                f"test acc {h['test_acc']:.4f}  weight sparsity {h['weight_sparsity'] or 0:.3f}  "
                f"activation sparsity {h['activation_sparsity']:.3f}"
                # what the recipe's own methods sparsify besides weights (SAS slots, masked positions, ...)
                + "".join(f"  {kind} sparsity {v:.3f}" for kind, v in achieved.items() if kind != "weights"))
            if (dead := dead_inputs(act)) and not warned_dead:
                warned_dead = True
                say(dead_message(dead, f"after epoch {h['epoch']}"))
            if stop.requested:  # Ctrl-C during the last step of an epoch: the epoch checkpoint is it
                interrupted = epoch + 1 < cfg.epochs
                break
    if interrupted:
        say(f"interrupted: checkpoint saved in {out / CHECKPOINT}; continue with: sparsify train --resume {out}")
        return {"interrupted": True, "out": str(out)}
    return _finish(model, cfg, data, out, history, opt_settings, total_steps, test_batches, example,
                   time.time() - t_start, say)


def _finish(model, cfg, data, out, history, opt_settings, total_steps, test_batches, example, seconds, say) -> dict:
    from sparsify.app.plots import plot_history, plot_layers
    act = activation_stats(model, test_batches())
    if dead := dead_inputs(act):
        say(dead_message(dead, "at the end of training"))
    summary = summarize(model, cfg.dense, example, act)
    result = {"config": {**asdict(cfg), "resume": None}, "optimizer": opt_settings, "total_steps": total_steps,
              "data": {"name": data.name, "train": len(data.train), "test": len(data.test)},
              "accuracy": history[-1]["test_acc"] if history else None, **summary,
              "history": history, "activation": act, "measure": library_measurement(model, test_batches()),
              "seconds": seconds}
    weights = {}
    if not cfg.dense:
        rep = sp.report(model)
        result["report"] = rep.to_dict()
        # per layer: what its method sparsifies (weights, SAS slots, masked positions, ...)
        weights = {r.name: r.achieved for r in rep.layers if r.achieved is not None}
        targets = {r.name: r.target for r in rep.layers}
        kinds = sorted({"weight" if r.sparsifies == "weights" else r.sparsifies for r in rep.layers})
        say(str(rep))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                final = sp.finalize(model, example)
            torch.save(final.state_dict(), out / "final_state_dict.pt")
            result["finalize"] = "ok"
        except Exception as e:  # reported, not fatal: the trained checkpoint is still there
            result["finalize"] = f"failed: {type(e).__name__}: {e}"
            say(f"warning: finalize failed: {e}")
    else:
        targets, kinds = {}, ["weight"]
        weights = {n: 1 - int(torch.count_nonzero(m.weight)) / m.weight.numel()
                   for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)}
    title = f"{cfg.model} / {cfg.recipe or 'dense'} / {data.name}"
    plot_layers(weights, {n: v["input_sparsity"] for n, v in act["layers"].items()}, out / "layers.png", title,
                targets=targets, label=" / ".join(kinds) + " sparsity")
    plot_history(history, out / "training.png", title)
    write_json(history, out / "history.json")
    write_json(result, out / "report.json")
    num = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
    say(f"test accuracy {result['accuracy']:.4f}; weight sparsity {summary['weight_sparsity'] or 0:.3f}; "
        f"activation sparsity {summary['activation_sparsity']:.3f}; MACs per sample (docs/macs.md): dense "
        f"{num(summary['dense_macs'])}, non-zero-weight {num(summary['nonzero_macs'])}, effective "
        f"{num(summary['effective_macs'])}, executed {num(summary['executed_macs'])}; results in {out}")
    return result
