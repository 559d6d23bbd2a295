"""``sparsify plan``: the model it builds from ``--model``, ``--num-classes``, ``--width`` and
``--input-shape`` (a built-in model sized to the example input), and the plan it prints.

Apart from :mod:`sparsify.app.cli`, which parses and dispatches the commands; like it, this
module imports torch and the library only when the command runs (``--help`` needs neither).
"""
from __future__ import annotations

import sys

from sparsify.app.overrides import parse_overrides


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--input-shape takes comma-separated integers (e.g. 1,3,224,224), got {text!r}") from None
    if not shape or any(v <= 0 for v in shape):
        raise ValueError(f"--input-shape must be positive integers, got {text!r}")
    if len(shape) < 2:
        raise ValueError(f"--input-shape is batch first (e.g. 1,3,224,224 or 1,784), got {text!r}")
    return shape


def _image_of(model: str, shape: tuple[int, ...]) -> dict:
    """The ``in_channels`` and ``image_size`` a model is built for from an example input's shape.

    >>> _image_of("resnet8", (1, 3, 32, 32)), _image_of("lenet300", (1, 784))
    ({'in_channels': 3, 'image_size': 32}, {'in_channels': 784, 'image_size': 1})
    """
    from sparsify.app.models import BUILTIN_MODELS
    if len(shape) > 2:
        return {"in_channels": shape[1], "image_size": shape[-1]}
    if model in BUILTIN_MODELS and model != "lenet300":
        raise ValueError(f"--input-shape {','.join(map(str, shape))}: {model} takes images, batch first (e.g. "
                         "1,1,28,28); a flat shape fits lenet300 or a package.module:factory model")
    # flat features (1,784): a model that flattens its input sees in_channels * image_size**2 of them
    return {"in_channels": shape[1], "image_size": 1}


def _plan_model(args):
    import torch

    from sparsify.app.models import BUILTIN_MODELS, build_model
    shape = _parse_shape(args.input_shape)
    if args.model in BUILTIN_MODELS:
        defaults = {"lenet5": (1, 1, 28, 28), "lenet300": (1, 1, 28, 28), "cnn": (1, 1, 8, 8)}.get(args.model, (1, 3, 32, 32))
        shape = shape or defaults
        model = build_model(args.model, num_classes=args.num_classes or 10, width=args.width,
                            **_image_of(args.model, shape))
    elif shape is not None:  # a factory or torchvision model at the input it is planned for
        model = build_model(args.model, num_classes=args.num_classes or 1000, width=args.width,
                            **_image_of(args.model, shape))
    else:
        model = build_model(args.model, num_classes=args.num_classes or 1000, width=args.width)
    return model, (torch.zeros(shape),) if shape else None


def _cmd_plan(args) -> int:
    import warnings

    import sparsify
    model, example = _plan_model(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = sparsify.plan(model, args.recipe, example_inputs=example, capture=args.capture,
                             **parse_overrides(args.set))
    if args.json:
        print(plan.to_json())
    else:
        print(plan)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    return 0
