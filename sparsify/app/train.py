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
* warnings as one ``warning: ...`` line each above the progress bar, kept in ``report.json``;
* at the end: the report table, ``report.json``, ``history.json``, ``layers.png`` and
  ``training.png`` in the output folder.

Optimizer defaults (lr, weight decay; a method's own, a recipe's ``options.train``) and the run's
settings: :mod:`sparsify.app.config`; the epochs' batches: :mod:`sparsify.app.batches`; what a
finished run writes: :mod:`sparsify.app.results`; what a resumed run is checked for:
:mod:`sparsify.app.resume_checks`.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sparsify as sp

from sparsify.app.checkpoint import CHECKPOINT, StopOnSigint, remove_stale_temporaries, write_json
from sparsify.app.resume import (CONFIG, REPORT, RUN_KEYS, check_out, meta_edited, restore, resume_command,
                                 save_run)
from sparsify.app.resume_checks import check_position, check_same_data
from sparsify.app.config import (BASE_DEFAULTS, METHOD_DEFAULTS, TrainConfig, _default_out, _load_resume,
                                 config_from_args, resolve_optimizer, run_recipe)
from sparsify.app.batches import _batches, _channel_fixer, _epoch_order, _train_size
from sparsify.app.data import fingerprint, load_data
from sparsify.app.device import autocast, on_device, resolve_device
from sparsify.app.replace import Replacing
from sparsify.app.results import _finish, counted
from sparsify.app.warning_lines import warning_lines
from sparsify.app.summary import dead_inputs, dead_message, evaluate, shown_kind, summarize, weight_sparsity
from sparsify.app.models import build_model, input_channels
from sparsify.app.outputs import check_output, logits_of
from sparsify.stats.runstats import activation_stats

__all__ = ["TrainConfig", "TrainingDiverged", "train", "config_from_args", "METHOD_DEFAULTS", "resolve_optimizer",
           "summarize", "BASE_DEFAULTS"]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def _check_ema(decay: float | None) -> None:
    if decay is not None and not 0.0 <= decay < 1.0:
        raise ValueError(f"--ema {decay}: the decay is a number in [0, 1), e.g. 0.999")


def _make_ema(model, decay: float | None):
    """``--ema``: torch's ``AveragedModel`` with an EMA of parameters and buffers (BatchNorm
    statistics too), or None."""
    if decay is None:
        return None
    _check_ema(decay)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train(cfg: TrainConfig, *, on_step=None, quiet: bool = False) -> dict:
    """Run ``cfg`` and return the result written to ``report.json`` (``interrupted`` is True
    when Ctrl-C stopped it; the checkpoint then lets ``TrainConfig(resume=out)`` continue).

    ``on_step(step)`` is called after every optimizer step (tests use it to interrupt a run).

    >>> r = train(TrainConfig(model="cnn", recipe="st3", epochs=1, out=tempfile.mkdtemp(), progress=False),
    ...           quiet=True)  # doctest: +SKIP
    """
    previous = torch.get_num_threads()
    try:
        with warning_lines(quiet) as warned, Replacing() as replacing:
            return _train(cfg, on_step=on_step, quiet=quiet, warned=warned, replacing=replacing)
    finally:  # --threads is for this run: a caller's later work keeps its own setting
        torch.set_num_threads(previous)


def _train(cfg: TrainConfig, *, on_step=None, quiet: bool = False, warned: list[str] | None = None,
           replacing: Replacing) -> dict:
    ckpt, meta, edited = None, {}, False
    if cfg.resume:
        cfg, ckpt, meta = _load_resume(cfg)
        edited = meta_edited(ckpt, meta)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be at least 1")
    out = Path(cfg.out or _default_out(cfg))
    cfg.out = str(out)
    say = (lambda *a: None) if quiet else print
    t_start = time.time()
    # the run's time over all its sessions (checkpoints written before it was kept: this session's)
    elapsed = lambda: meta.get("seconds", 0.0) + time.time() - t_start  # noqa: E731
    if ckpt is None:  # before the data loads and the model is sparsified: the user hears it at once
        check_out(out, cfg.overwrite)
        _check_ema(cfg.ema)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    autocast(device, cfg.amp)  # an unknown amp fails here, before anything is written
    if device.type != "cpu" or cfg.amp:
        say(f"training on {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + (f", {cfg.amp} autocast" if cfg.amp else ""))

    workers = cfg.workers or 0  # None: a new run's default
    data = load_data(cfg.data, image_size=cfg.image_size, workers=workers, progress=cfg.progress and not quiet)
    dataset = fingerprint(data)
    if ckpt is not None and not edited:
        check_same_data(cfg, meta, dataset)
    _seed_all(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size, width=cfg.width).to(device)
    fix = _channel_fixer(input_channels(model), data.in_channels)
    n_train = _train_size(len(data.train), cfg.batch_size)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    example = (next(_batches(data.test, torch.arange(min(2, len(data.test))), 2, fix_channels=fix))[0].to(device),)
    size_hint = (f"--image-size sets the images' size (now {data.image_size})" if cfg.data.startswith("imagefolder:")
                 else f"--data {cfg.data} has {data.image_size}x{data.image_size} images: pick a model that takes "
                      "them (the built-ins lenet5, lenet300, cnn, resnet8, resnet20 do), or imagefolder data with "
                      "--image-size")
    check_output(model, example, data.num_classes, cfg.model, size_hint)  # before anything is sparsified or written
    # a resumed run rebuilds from the recipe its checkpoint saved: the file may have been edited or moved since
    recipe, note = run_recipe(cfg, ckpt) if ckpt is not None and not cfg.dense else (None, None)
    if note is not None:
        warnings.warn(note, stacklevel=1)
    if not cfg.dense:
        model = sp.sparsify(model, cfg.recipe if recipe is None else recipe, total_steps=total_steps,
                            example_inputs=example, **(cfg.overrides if recipe is None else {}))
    opt_settings = resolve_optimizer(cfg, recipe)
    optimizer, sched = _make_optimizer(model, cfg, opt_settings, total_steps)
    ema = _make_ema(model, cfg.ema)
    # the training forward only: evaluation, EMA and checkpoints use the model itself
    forward = torch.compile(model, backend=cfg.compile) if cfg.compile else model

    history: list[dict] = []
    start_epoch, start_batch, running = 0, 0, {"loss": 0.0, "correct": 0, "seen": 0}
    if ckpt is not None:
        check_position(cfg, ckpt, meta, steps_per_epoch, edited)
        restore(model, optimizer, sched, ckpt, meta, cfg.resume, ema=ema, device=device)
        history, running = meta["history"], meta["running"]
        start_epoch, start_batch = meta["epoch"], meta["batch"]
        remove_stale_temporaries(out)  # of a writer that was killed: not the run's files
        finished = start_epoch == cfg.epochs
        # only after the checks of any resume: a damaged or edited finished run is reported, not called complete
        if finished and (out / REPORT).is_file():
            say(f"{out}: the run is complete ({counted(cfg.epochs, 'epoch')}, results in {out / REPORT}); "
                "nothing to do")
            return {"complete": True, "out": str(out)}
        if finished:
            say(f"{out}: the run finished training but not its write-up (no {REPORT}); writing it now")
        else:
            say(f"resuming {out} at epoch {start_epoch + 1}, batch {start_batch} "
                f"(step {start_epoch * steps_per_epoch + start_batch})")
    else:
        replacing.claim(out, cfg.overwrite)  # a replaced run waits aside until the first checkpoint
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        write_json({**asdict(cfg), "resume": None, "overwrite": False}, out / CONFIG)
    run_settings = {k: asdict(cfg)[k] for k in RUN_KEYS}

    def checkpoint(epoch: int, batch: int) -> None:
        save_run(model, optimizer, sched, out, ema=ema, device=device, epoch=epoch, batch=batch, history=history,
                 running=running, total_steps=total_steps, run=run_settings, dataset=dataset, seconds=elapsed())
        replacing.saved()

    test_batches = lambda: on_device(_batches(data.test, torch.arange(len(data.test)), 500, workers, fix),  # noqa: E731
                                     device)
    interrupted = False
    warned_dead = False
    from tqdm import tqdm
    with StopOnSigint() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            order = _epoch_order(cfg.seed, epoch, len(data.train))[start_batch * cfg.batch_size:n_train]
            bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not cfg.progress or quiet, leave=False, dynamic_ncols=True)
            model.train()
            refresh = max(1, steps_per_epoch // 10)
            sparsity_now = weight_sparsity(model, cfg.dense)
            batches = on_device(_batches(data.train, order, cfg.batch_size, workers, fix), device)
            for b, (x, y) in enumerate(batches, start_batch):
                with autocast(device, cfg.amp):
                    logits = logits_of(forward(x))
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
                if ema is not None:
                    ema.update_parameters(model)
                    if not cfg.dense:
                        sp.sync(ema, model)  # the model's masks and thresholds, not their average
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
            test_acc = evaluate(model, test_batches())  # the evaluation whose activations the report measures
            target, achieved = None, {}
            if not cfg.dense:
                totals = sp.report(model).totals
                target, achieved = totals.get("target"), totals.get("achieved") or {}
            history.append({"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                            "train_loss": running["loss"] / max(running["seen"], 1),
                            "train_acc": running["correct"] / max(running["seen"], 1),
                            "test_acc": test_acc,
                            "weight_sparsity": weight_sparsity(model, cfg.dense), "target": target,
                            "activation_sparsity": act["activation_sparsity"], "achieved": achieved})
            if ema is not None:
                history[-1]["ema_test_acc"] = evaluate(ema.module, test_batches())
            running = {"loss": 0.0, "correct": 0, "seen": 0}
            h = history[-1]
            checkpoint(epoch + 1, 0)
            say(f"epoch {h['epoch']}/{cfg.epochs}: loss {h['train_loss']:.4f}  train acc {h['train_acc']:.4f}  "
                f"test acc {h['test_acc']:.4f}  weight sparsity {h['weight_sparsity'] or 0:.3f}  "
                f"layer-input sparsity {h['activation_sparsity']:.3f}"
                + (f"  ema test acc {h['ema_test_acc']:.4f}" if ema is not None else "")
                # what the recipe's own methods sparsify besides weights (SAS slots, masked positions, ...)
                + "".join(f"  {shown_kind(kind)} sparsity {v:.3f}" for kind, v in achieved.items()
                          if kind != "weights"))
            if (dead := dead_inputs(act)) and not warned_dead:
                warned_dead = True
                say(dead_message(dead, f"after epoch {h['epoch']}"))
            if stop.requested:  # Ctrl-C during the last step of an epoch: the epoch checkpoint is it
                interrupted = epoch + 1 < cfg.epochs
                break
    if interrupted:
        say(f"interrupted: checkpoint saved in {out / CHECKPOINT}; continue with: {resume_command(out, cfg.model)}")
        return {"interrupted": True, "out": str(out)}
    with StopOnSigint() as late:  # a Ctrl-C now would leave a run without its report: the seconds left finish it
        result = _finish(model, cfg, data, out, history, opt_settings, total_steps, test_batches, example,
                         elapsed(), say, ema=ema, warned=warned)
    # a Ctrl-C in the last epoch or the write-up: the run is finished, and its caller (the demo) stops
    return {**result, "sigint": True} if stop.requested or late.requested else result
