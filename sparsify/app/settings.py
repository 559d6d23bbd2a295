"""The values a training run's settings may take, checked alike on the command line and in a
``config.json`` being resumed."""
from __future__ import annotations


#: ``--optimizer`` choices (the parser's, and what a resumed ``config.json`` may hold)
OPTIMIZERS = ("sgd", "adam", "adamw")
#: ``--amp`` choices
AMP_CHOICES = ("bf16",)

#: the demo's epochs: 8 of 23 steps, so that ST-3's cubic ramp (5%..50% of the run) and its
#: fine-tuning after the fix (90%) both get a few dozen steps; every run takes a few seconds on one core
DEMO_EPOCHS = 8
#: ``--threads`` above this is refused: torch segfaults creating 100,000 threads; a fixed bound, not
#: the CPU count, so a run saved on a large machine resumes on a small one
MAX_THREADS = 1024


def check_settings(args) -> None:
    """Numbers the parser accepts but a run cannot use: one line each, before anything runs (the
    command line's, and the settings of a ``config.json`` being resumed)."""
    import math
    positive = ("epochs", "batch_size", "threads", "image_size", "num_classes")
    for key in positive:
        v = getattr(args, key, None)
        if v is not None and v < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {v}")
    if (getattr(args, "threads", None) or 0) > MAX_THREADS:
        raise ValueError(f"--threads must be at most {MAX_THREADS}, got {args.threads}")
    for key in ("workers", "seed"):
        v = getattr(args, key, None)
        if v is not None and v < 0:
            raise ValueError(f"--{key} must be 0 or more, got {v}")
    if (getattr(args, "seed", None) or 0) >= 2**32:  # torch's epoch generators take seed * 100_003 + epoch in 64 bits
        raise ValueError(f"--seed must be below 2**32 (4294967296), got {args.seed}")
    for key, low, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("momentum", 0.0, False),
                             ("width", 0.0, True)):
        v = getattr(args, key, None)
        if v is None:
            continue
        if not math.isfinite(v) or v < low or (strict and v == low):
            bound = "a positive" if strict else "a non-negative"
            raise ValueError(f"--{key.replace('_', '-')} must be {bound} finite number, got {v}")
    if getattr(args, "momentum", None) is not None and args.momentum >= 1:
        raise ValueError(f"--momentum must be below 1, got {args.momentum}")
    if getattr(args, "optimizer", None) not in (None, *OPTIMIZERS):
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {args.optimizer!r}")
    if getattr(args, "compile", None) is not None:
        import torch._dynamo
        if args.compile not in torch._dynamo.list_backends(exclude_tags=()):
            usual = sorted({*torch._dynamo.list_backends(), "eager", "aot_eager"})
            raise ValueError(f"--compile {args.compile}: not a torch.compile backend of this torch; one of "
                             f"{', '.join(usual)}")
