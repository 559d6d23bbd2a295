"""What defines a ``sparsify train`` run: :class:`TrainConfig` (saved as ``config.json`` in the
output folder), made from the command line's arguments or from the run folder being resumed, and the
optimizer settings it resolves to.

Optimizer defaults: SGD (momentum 0.9, cosine learning rate over the run) with lr 0.05 and weight
decay 5e-4; a method can need other settings (:data:`METHOD_DEFAULTS`, e.g. STR sparsifies only
through weight decay), and a recipe can carry its own under ``options.train``. Explicit arguments
always win.
"""
from __future__ import annotations

import json
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from sparsify.app.checkpoint import CHECKPOINT, CheckpointError
from sparsify.app.resume import CONFIG, load_run, saved_recipe
from sparsify.core.load_check import what_runs
from sparsify.prepare.recipe import Recipe, builtin_recipes, load_recipe
from sparsify.prepare.validate import RecipeError

__all__ = ["TrainConfig", "config_from_args", "METHOD_DEFAULTS", "BASE_DEFAULTS", "resolve_optimizer", "run_recipe",
           "saved_config"]

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
    workers: int | None = None  # DataLoader workers for image folders (None: 0, or a resumed run's)
    resume: str | None = None
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    overwrite: bool = False  # replace the run already in ``out`` (else such an ``out`` is refused)
    ema: float | None = None  # decay of an EMA of the weights, evaluated and saved beside the model
    device: str | None = None  # None / "auto": the GPU when torch sees one, else the CPU (sparsify.app.device)
    amp: str | None = None  # "bf16": forward and loss under bfloat16 autocast
    compile: str | None = None  # a torch.compile backend for the training forward ("inductor"), or None: eager

    @property
    def dense(self) -> bool:
        return self.recipe in (None, "", "dense")


def config_from_args(args) -> TrainConfig:
    """A :class:`TrainConfig` from the ``sparsify train`` arguments."""
    from sparsify.app.overrides import parse_overrides
    # --resume: None unless given, so a model factory saved in the run folder is imported only
    # when the user names it again
    model = args.model if args.resume else (args.model or "cnn")
    return TrainConfig(model=model, recipe=_absolute_recipe(args.recipe), overrides=parse_overrides(args.set),
                       data=_absolute_data(args.data),
                       image_size=args.image_size, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                       optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                       momentum=args.momentum, seed=args.seed, out=args.out, progress=not args.no_progress,
                       workers=args.workers, resume=args.resume, threads=args.threads,
                       overwrite=getattr(args, "overwrite", False), ema=getattr(args, "ema", None),
                       device=getattr(args, "device", None), amp=getattr(args, "amp", None),
                       compile=getattr(args, "compile", None))


# config.json keeps the paths a run reads as absolute paths: `--resume` works from any folder
def _absolute_recipe(recipe: str | None) -> str | None:
    if recipe in (None, "", "dense"):
        return recipe
    read_as_path = recipe.endswith(".json") or "/" in recipe or recipe not in builtin_recipes()  # as load_recipe
    return os.path.abspath(recipe) if read_as_path and os.path.isfile(recipe) else recipe


def _absolute_data(data: str) -> str:
    kind, _, path = data.partition(":")
    return f"{kind}:{os.path.abspath(os.path.expanduser(path))}" if kind == "imagefolder" and path else data


def resolve_optimizer(cfg: TrainConfig, recipe=None) -> dict:
    """The optimizer name, lr and weight decay for ``cfg``: explicit values, else the recipe's
    ``options.train``, else :data:`METHOD_DEFAULTS` of its methods, else :data:`BASE_DEFAULTS`.
    ``recipe``: the one to read instead of ``cfg.recipe`` and its overrides (a resumed run's own,
    :func:`run_recipe`).

    >>> resolve_optimizer(TrainConfig(recipe="st3"))
    {'optimizer': 'sgd', 'lr': 0.05, 'weight_decay': 0.0005}
    >>> resolve_optimizer(TrainConfig(recipe="sas", optimizer="adam"))["lr"]  # SAS's lower lr is SGD's
    0.001

    A recipe's ``options.train`` lr and weight decay hold for its optimizer (SGD when it names
    none): ``--optimizer`` naming another one takes that one's defaults.
    """
    hints: dict = {}
    options: dict = {}
    if not cfg.dense:
        recipe = load_recipe(cfg.recipe, **cfg.overrides) if recipe is None else load_recipe(recipe)
        for rule in recipe.rules:
            hints.update(METHOD_DEFAULTS.get(rule.method or "", {}))
        options = recipe.options.get("train", {}) if isinstance(recipe.options, dict) else {}
    name = cfg.optimizer or options.get("optimizer", "sgd")
    if name != "sgd":  # the methods' learning rates are SGD's (SAS's 0.02 is 20x Adam's default)
        hints.pop("lr", None)
    if name != options.get("optimizer", "sgd"):  # the recipe's lr and decay were tuned for its own optimizer
        options = {k: v for k, v in options.items() if k not in ("lr", "weight_decay")}
    hints.update(options)
    base = BASE_DEFAULTS[name]
    pick = lambda key, given: given if given is not None else hints.get(key, base[key])  # noqa: E731
    return {"optimizer": name, "lr": float(pick("lr", cfg.lr)), "weight_decay": float(pick("weight_decay",
                                                                                           cfg.weight_decay))}


def run_recipe(cfg: TrainConfig, tensors: dict) -> tuple:
    """``(recipe, note)`` for a resumed sparse run: the recipe its checkpoint ``tensors`` saved (resolved,
    ``cfg.overrides`` applied) and, when the file or built-in ``cfg.recipe`` now resolves to another
    recipe or to none, one line saying the run goes on with its own. A checkpoint that holds no
    recipe: ``(None, None)``, ``cfg.recipe`` is read again as the run first read it."""
    saved = saved_recipe(tensors)
    if saved is None:
        return None, None
    # named after the file or built-in it came from, as when it was read from there (a recipe without a "name")
    own = load_recipe(Recipe(name="", description="", source=str(cfg.recipe), data=saved, rules=()))
    try:
        # as a checkpoint load compares them: an edited comment or description changes nothing that runs
        now = json.loads(load_recipe(cfg.recipe, **cfg.overrides).to_json())
        changed = json.dumps(what_runs(now), sort_keys=True) != json.dumps(what_runs(saved), sort_keys=True)
    except RecipeError:  # moved, deleted, or no longer loading with the run's overrides
        changed = True
    if not changed:
        return own, None
    is_file = cfg.recipe.endswith(".json") or "/" in cfg.recipe or cfg.recipe not in builtin_recipes()
    what = f"recipe file {cfg.recipe}" if is_file else f"built-in recipe {cfg.recipe!r}"
    since = "no longer exists" if is_file and not os.path.exists(cfg.recipe) else "changed since the run started"
    return own, (f"{what} {since}; resuming with the run's own recipe (saved in "
                 f"{os.path.join(str(cfg.resume), CHECKPOINT)})")


def _default_out(cfg: TrainConfig) -> str:
    return os.path.join("runs", f"{cfg.model.replace(':', '_')}-{Path(str(cfg.recipe or 'dense')).stem}-s{cfg.seed}")


def _type_problem(saved: dict) -> str | None:
    """The first saved setting whose JSON type is not its field's (``config.json`` edited), or None.

    >>> _type_problem({"epochs": "3"})
    "epochs='3'"
    """
    hints = typing.get_type_hints(TrainConfig)
    for key, value in saved.items():
        if key not in hints:
            continue
        allowed = typing.get_args(hints[key]) or (hints[key],)
        allowed = tuple(type(None) if a is None else a for a in allowed)
        if float in allowed:
            allowed += (int,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            return f"{key}={value!r}"
    return None


def saved_config(saved: dict) -> TrainConfig:
    """The :class:`TrainConfig` a run folder's ``config.json`` (read as ``saved``) holds; keys of
    other versions are left out.

    >>> saved_config({"model": "cnn", "epochs": 3, "gone": 1}).epochs
    3
    """
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def _load_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict, dict]:
    saved, tensors, meta = load_run(Path(cfg.resume), cfg.model, TrainConfig.model)
    if (bad := _type_problem(saved)) is not None:
        raise CheckpointError(f"--resume {cfg.resume}: {CONFIG} holds {bad}, not a value of that setting (edited or "
                              "damaged); the run cannot be resumed from it")
    new = saved_config(saved)
    new.out, new.resume, new.progress, new.overwrite = str(cfg.resume), str(cfg.resume), cfg.progress, False
    if cfg.threads is not None:  # else the saved run's: the thread count changes float reductions
        new.threads = cfg.threads
    if cfg.device is not None:  # a run continues on another machine's device (the checkpoint is read to the CPU)
        new.device = cfg.device
    if cfg.compile is not None:  # compiling changes no result: another backend may continue the run
        new.compile = cfg.compile
    if cfg.workers is not None:  # workers load the same batches in the same order: a machine setting
        new.workers = cfg.workers
    from sparsify.app.settings import check_settings
    try:  # an edited value the command line refuses (threads -1, an unknown backend) crashed, or worse
        check_settings(new)
    except ValueError as e:
        raise CheckpointError(f"--resume {cfg.resume}: {CONFIG} holds a setting the command line refuses ({e}; "
                              "edited or damaged); the run cannot be resumed from it") from None
    return new, tensors, meta
