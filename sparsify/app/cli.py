"""The ``sparsify`` command.

    sparsify recipes                         list the built-in recipes
    sparsify plan --model resnet18 --recipe st3 [--json]
    sparsify train --model cnn --recipe st3 --data digits --epochs 10 --out runs/st3
    sparsify train --resume runs/st3        continue an interrupted run exactly
    sparsify demo --out demo-out            dense + every built-in recipe on digits, one table

Every user error (bad recipe, unknown model, missing dataset) ends with a one-line message on
stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from sparsify.app.overrides import parse_overrides
from sparsify.app.plan_command import _cmd_plan
from sparsify.app.settings import AMP_CHOICES, DEMO_EPOCHS, OPTIMIZERS, check_settings

__all__ = ["main", "parse_overrides"]


#: ``train`` options a resumed run takes from its folder, not from the command line
RESUME_FIXED = ("recipe", "set", "data", "image_size", "width", "epochs", "batch_size", "optimizer", "lr",
                "weight_decay", "momentum", "seed", "out", "overwrite", "ema", "amp")


def _given(argv: list[str] | None) -> set[str]:
    """The ``train`` options named on the command line: one given with its default value is given too
    (``--resume RUN --epochs 10`` must be compared with the run's epochs, not taken for no flag)."""
    parser = build_parser(defaults=False)
    return set(vars(parser.parse_args(argv)))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _resume_conflicts(args, given: set[str]) -> list[tuple[str, str]]:
    """``(--flag, what differs)`` for the options given with ``--resume`` whose value is not the run's.
    A run folder whose ``config.json`` cannot be read has none here: resuming it says what is wrong."""
    from pathlib import Path

    from sparsify.app.config import _absolute_data, _absolute_recipe
    try:
        saved = json.loads((Path(args.resume) / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    if not isinstance(saved, dict):
        return []
    dense = (None, "", "dense")
    conflicts = []
    resolved = _run_optimizer(saved)
    for key in (k for k in RESUME_FIXED if k in given):
        value, run = getattr(args, key), saved.get(key)
        if key in resolved and run is None:  # left to the defaults: the run trained with what they resolved to
            run = resolved[key]
        if key == "set":
            value, run = parse_overrides(value), saved.get("overrides")
        elif key == "recipe":
            value = None if value in dense else _absolute_recipe(value)
            run = None if run in dense else run
        elif key == "data":
            value = _absolute_data(value)
        elif key == "out":  # the run goes on in the --resume folder, wherever it was first written
            run = args.resume
            if os.path.realpath(value) == os.path.realpath(run):
                continue
        elif key == "overwrite":
            if value:
                conflicts.append(("--overwrite", "a resumed run keeps its files"))
            continue
        if value != run:
            conflicts.append((_flag(key), f"the run's {_flag(key)} is {_shown(run)}, not {_shown(value)}"))
    return conflicts


def _run_optimizer(saved: dict) -> dict:
    """The optimizer, lr and weight decay the saved run trained with (its config stores None for a
    default, resolved from its recipe); ``{}`` when they cannot be worked out (its recipe file gone)."""
    from sparsify.app.config import resolve_optimizer, saved_config
    try:
        return resolve_optimizer(saved_config(saved))
    except Exception:  # an edited or moved run: compared as stored, and resuming says what is wrong
        return {}


def _shown(value) -> str:
    return "the default" if value is None else json.dumps(value) if isinstance(value, dict) else str(value)


def _check_args(args, given: set[str]) -> None:
    """The command line's settings (:func:`check_settings`) and the options that go together; ``given``:
    the options named on the command line (:func:`_given`)."""
    check_settings(args)
    if args.command == "train" and args.resume is not None:
        if not args.resume.strip():
            raise ValueError("--resume needs the folder of the run to continue")
        conflicts = _resume_conflicts(args, given)
        if conflicts:
            flags, said = ", ".join(f for f, _ in conflicts), "; ".join(d for _, d in conflicts)
            raise ValueError(f"--resume continues the run with the settings it was started with; {flags} cannot "
                             f"change them ({said}; only --threads, --device, --compile, --workers "
                             "and --no-progress can): start a new run for other settings")
    dense = getattr(args, "recipe", None) in (None, "", "dense")
    if args.command == "train" and getattr(args, "set", None) and dense and not args.resume:
        raise ValueError("--set changes recipe parameters: give the recipe too (--recipe NAME_OR_PATH)")
    if args.command == "train" and "momentum" in given and not args.resume:
        from sparsify.app.config import config_from_args, resolve_optimizer
        name = resolve_optimizer(config_from_args(args))["optimizer"]  # a recipe's options.train may name it
        if name != "sgd":
            raise ValueError(f"--momentum is SGD's; the run's optimizer is {name}, which has none (its betas are "
                             "fixed): leave --momentum out, or use --optimizer sgd")
    # a resumed run's image size is its own (checked above), whatever --data defaults to
    if (args.command == "train" and args.image_size is not None and not args.resume
            and not args.data.startswith("imagefolder:")):
        raise ValueError(f"--image-size resizes imagefolder images; --data {args.data} has its own size "
                         "(digits 8x8, mnist 28x28)")
    if args.command == "demo" and args.recipes is not None:
        from sparsify.prepare.recipe import builtin_recipes
        if not all(r.strip() for r in args.recipes.split(",")):
            raise ValueError(f"--recipes takes comma-separated recipe names, got {args.recipes!r} (leave it out "
                             "for every built-in recipe)")
        unknown = [r for r in args.recipes.split(",") if r not in builtin_recipes() and r != "dense"]
        if unknown:
            raise ValueError(f"--recipes: unknown recipe {unknown[0]!r}; built-in recipes: "
                             f"{', '.join(builtin_recipes())}")


def _cmd_recipes(args) -> int:
    from sparsify.prepare.recipe import builtin_recipes
    recipes = builtin_recipes()
    if args.json:
        print(json.dumps(recipes, indent=2))
        return 0
    width = max(len(n) for n in recipes)
    for name, desc in recipes.items():
        print(f"{name.ljust(width)}  {desc}")
    print("\nUse a name with --recipe, or copy its JSON (sparsify recipes --show NAME) and pass the path.")
    return 0


def _cmd_show(name: str) -> int:
    from sparsify.prepare.recipe import load_recipe
    r = load_recipe(name)
    print(r.to_json())
    return 0


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="built-in recipe name (sparsify recipes) or path to a JSON recipe")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe parameter (value parsed as JSON), repeatable: --set sparsity=0.95")


def _add_model_args(p: argparse.ArgumentParser, default: str | None, train: bool = False) -> None:
    p.add_argument("--model", default=default, required=default is None and not train,
                   help="lenet5, lenet300, cnn, resnet8, resnet20, a torchvision model name, or package.module:factory"
                   + (" (default cnn; with --resume: the run's, and a package.module:factory model must be "
                      "named again to be imported)" if train else ""))
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the built-in models (default 1)")


class _Parser(argparse.ArgumentParser):
    """argparse with the command's one-line errors: the usage block argparse prints before its
    message buried the message; ``--help`` still shows it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse leaves a command's unknown options to the top parser ("sparsify: error: ... see
        # sparsify --help"): the command's parser names itself and its own --help
        found, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            (commands.get(getattr(found, "command", None)) or self).error(
                f"unrecognized arguments: {' '.join(extras)}")
        return found


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the ``sparsify`` command (``defaults=False``: ``train`` sets only the
    options given, see :func:`_given`)."""
    parser = _Parser(prog="sparsify", description="Sparse training for PyTorch models via torch.fx.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.add_argument("--json", action="store_true", help="print {name: description} as JSON")
    p.add_argument("--show", metavar="NAME", help="print one recipe's resolved JSON (a starting point to edit)")

    p = sub.add_parser("plan", help="dry run: what a recipe would rewrite in a model")
    _add_model_args(p, None)
    _add_recipe_args(p)
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the model's head (default 10 for built-ins, 1000 for torchvision)")
    p.add_argument("--input-shape", help="example input for MAC counts, e.g. 1,3,224,224 (default: guessed)")
    p.add_argument("--capture", choices=["auto", "fx", "export"], default=None,
                   help="how the forward is captured: torch.fx, torch.export (uses --input-shape), or auto "
                        "(default: the recipe's options.capture, else auto; docs/capture.md)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("train", help="train a model with a recipe (checkpoints, report, plots)")
    _add_model_args(p, None, train=True)
    _add_recipe_args(p)
    p.add_argument("--data", default="digits", help="digits (default), mnist, or imagefolder:PATH")
    p.add_argument("--image-size", type=int, default=None, help="resize imagefolder images to this size (default 64)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training data (default 10)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per optimizer step (default 64)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="default: the recipe's method default (sgd with momentum 0.9 for most)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per optimizer and method)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: per method (STR needs more)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the data order (default 0)")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<recipe>-s<seed>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its settings are reused)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (else refused); it is kept aside until the "
                   "new run's first checkpoint")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.999), with the model's "
                        "sparsity (sparsify.sync); it is evaluated every epoch and saved beside the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for imagefolder data (default 0)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps... (default auto: the GPU when torch sees one, else the CPU)")
    p.add_argument("--amp", choices=AMP_CHOICES, default=None,
                   help="bf16: forward and loss under bfloat16 autocast (weights and optimizer stay float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest for the small built-in models)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="train through torch.compile (default backend inductor; a GPU gains, the CPU rarely: "
                        "docs/compile.md); evaluation and checkpoints use the model itself")
    if not defaults:  # set_defaults(x=SUPPRESS) would set the string "==SUPPRESS==": the actions' own
        for action in p._actions:
            action.default = argparse.SUPPRESS

    p = sub.add_parser("demo", help="dense + every built-in recipe on digits, one comparison table")
    p.add_argument("--out", default="demo-out", help="folder for the table, the plot and each run (default: demo-out)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {DEMO_EPOCHS})")
    p.add_argument("--recipes", default=None, help="comma-separated recipes to run after dense, which always runs (default: every built-in one)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--progress", action="store_true", help="show per-run progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sparsify`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    given = _given(argv) if args.command == "train" else set()
    try:
        from sparsify.app.data import DataError
        from sparsify.app.models import ModelError
        from sparsify.core.schedules import ScheduleError
        from sparsify.prepare.recipe import RecipeError
    except KeyboardInterrupt:  # torch's import takes seconds: a Ctrl-C then is no traceback either
        print(f"sparsify {args.command}: interrupted", file=sys.stderr)
        return 130
    # OSError: a folder that cannot be written or read (permissions, a file in the path);
    # OverflowError: a number too large for the field that takes it
    user_errors = (RecipeError, ScheduleError, ModelError, DataError, OSError, ValueError, OverflowError)
    try:
        _check_args(args, given)
        if args.command == "recipes":
            return _cmd_show(args.show) if args.show else _cmd_recipes(args)
        if args.command == "plan":
            if not args.recipe:
                raise ValueError("plan needs --recipe NAME_OR_PATH")
            return _cmd_plan(args)
        if args.command == "train":
            from sparsify.app.train import config_from_args, train
            result = train(config_from_args(args))
            return 130 if result.get("interrupted") or result.get("sigint") else 0
        if args.command == "demo":
            from sparsify.app.demo import run_demo
            rows = run_demo(args.out, epochs=args.epochs, seed=args.seed, progress=args.progress,
                            recipes=args.recipes.split(",") if args.recipes else None)
            return 130 if rows and rows[-1].get("interrupted") else 0
    except BrokenPipeError:  # `sparsify recipes | head -1`: the reader left, nothing to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter flushes stdout at exit)
        return 0
    except user_errors as e:
        print(f"sparsify {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a run saves anything (startup), or a second Ctrl-C
        print(f"sparsify {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
