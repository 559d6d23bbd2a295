"""Models the ``sparsify`` command can build by name.

* built-ins sized for small images: ``lenet5`` (MNIST-style, ReLU + max-pool), ``lenet300`` (the
  LeNet-300-100 MLP, the classic MNIST pruning benchmark), ``cnn`` (a small
  BatchNorm CNN, the demo's model on 8x8 digits), ``resnet8`` / ``resnet20`` (CIFAR-style ResNets);
  all take a ``width`` multiplier (the "2x-wider dense" baselines);
* any torchvision classification model by name (``resnet18``, ``mobilenet_v2``, ...), built with
  ``weights=None`` (nothing is downloaded);
* ``package.module:factory`` for a user's own model: the factory is called with the keyword
  arguments it accepts among ``num_classes``, ``in_channels``, ``image_size``.

>>> m = build_model("lenet5", num_classes=10, in_channels=1, image_size=28)
>>> m(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

__all__ = ["ModelError", "LeNet5", "LeNet300100", "SmallCNN", "CifarResNet", "BUILTIN_MODELS", "build_model", "model_names",
           "input_channels"]


class ModelError(ValueError):
    """A model name or factory could not be resolved; the message says what to use instead."""


def _w(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling: conv 6@5x5 (padded) - pool - conv 16@5x5 - pool -
    fc 120 - fc 84 - fc classes. ``image_size`` sets the flattened size (28 for MNIST)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0):
        super().__init__()
        c1, c2, f1, f2 = _w(6, width), _w(16, width), _w(120, width), _w(84, width)
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2 if image_size < 20 else 0)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        with torch.no_grad():
            n = self._features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc1 = nn.Linear(n, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(f2, num_classes)
        # LeCun initialisation (std 1/sqrt(fan-in)): PyTorch's default (kaiming-uniform with
        # a = sqrt(5), std 1/sqrt(3 fan-in)) shrinks the signal ~2.4x per ReLU layer, which leaves
        # this BatchNorm-free net on a chance-level plateau for its first epochs, and a sparse run
        # (pruning from 5% of the steps on) never leaves it; He's std sqrt(2/fan-in) makes SAS (no
        # ReLU left, both signs pass) diverge on MNIST even at lr 0.02
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)

    def _features(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        return torch.flatten(self.pool2(self.relu2(self.conv2(x))), 1)

    def forward(self, x):
        x = self._features(x)
        return self.fc3(self.relu4(self.fc2(self.relu3(self.fc1(x)))))


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998; the MNIST benchmark of Han et al. 2015 and most pruning
    papers): the flattened image - fc 300 - ReLU - fc 100 - ReLU - fc classes, ~266k parameters
    on 28x28 digits. LeCun initialisation as :class:`LeNet5` (no BatchNorm here either).

    >>> m = LeNet300100(image_size=28)
    >>> sum(p.numel() for p in m.parameters()), m(torch.zeros(2, 1, 28, 28)).shape
    (266610, torch.Size([2, 10]))
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0):
        super().__init__()
        h1, h2 = _w(300, width), _w(100, width)
        self.fc1 = nn.Linear(in_channels * image_size * image_size, h1)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(h1, h2)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(h2, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU blocks (16, 32, 64 channels, one max-pool), global average pool,
    one Linear: about 24k parameters, a few milliseconds per batch on 8x8 digits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: float = 1.0):
        super().__init__()
        c1, c2, c3 = _w(16, width), _w(32, width), _w(64, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (3 stages of 16/32/64 channels, depth = 6n + 2), with 1x1
    projection shortcuts."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 image_size: int = 32):
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n + 2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        widths = [_w(16, width), _w(32, width), _w(64, width)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


BUILTIN_MODELS = {
    "lenet5": (LeNet5, "LeNet-5 (ReLU, max-pool) for 28x28 digits; ~61k parameters"),
    "lenet300": (LeNet300100, "LeNet-300-100 MLP (784-300-100-10, ReLU) for 28x28 digits; ~266k parameters"),
    "cnn": (SmallCNN, "small 3-conv BatchNorm CNN (the demo model for 8x8 digits); ~24k parameters"),
    "resnet8": (lambda **kw: CifarResNet(8, **kw), "CIFAR-style ResNet-8 (16/32/64 channels)"),
    "resnet20": (lambda **kw: CifarResNet(20, **kw), "CIFAR-style ResNet-20 (16/32/64 channels)"),
}


def _torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> dict[str, str]:
    """Built-in model names with descriptions (torchvision names are accepted as well).

    >>> "lenet5" in model_names()
    True
    """
    return {k: v[1] for k, v in BUILTIN_MODELS.items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _call_with_accepted(factory, kwargs: dict):
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return factory()
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in sig.parameters})


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                width: float = 1.0) -> nn.Module:
    """Build the model called ``name`` (see the module docstring) for ``num_classes`` classes.

    ``in_channels`` and ``image_size`` size the built-ins; torchvision models take 3-channel
    images (the training code repeats a grey channel). ``width`` applies to built-ins only.

    >>> type(build_model("resnet18", num_classes=5)).__name__
    'ResNet'
    """
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name][0](width=width, **kwargs)
    if width != 1.0:
        raise ModelError(f"width={width} applies to the built-in models ({', '.join(BUILTIN_MODELS)}) only")
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        if not mod_name or not attr:
            raise ModelError(f"model {name!r}: name a factory as package.module:function")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ModelError(f"model {name!r}: cannot import module {mod_name!r} ({e}); "
                             "is it installed or on PYTHONPATH?") from None
        except Exception as e:  # the module's own code failed (a syntax error, an exception at import)
            raise ModelError(f"model {name!r}: importing {mod_name!r} raised {_first_line(e)}") from None
        factory = getattr(module, attr, None)
        if factory is None or not callable(factory):
            raise ModelError(f"model {name!r}: module {mod_name!r} has no callable {attr!r}")
        try:
            model = _call_with_accepted(factory, kwargs)
        except Exception as e:  # the factory's own code: one line naming it (run it in Python for the traceback)
            raise ModelError(f"model {name!r}: the factory raised {_first_line(e)}") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"model {name!r}: the factory returned {type(model).__name__}, not an nn.Module")
        return model
    import torchvision
    names = _torchvision_names()
    if name not in names:
        import difflib
        close = difflib.get_close_matches(name, list(BUILTIN_MODELS) + names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}; use a built-in ({', '.join(BUILTIN_MODELS)}), "
                         "a torchvision classification model name (torchvision.models.list_models()), "
                         "or package.module:factory")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def input_channels(model: nn.Module) -> int | None:
    """The input channels of the first convolution (None when the model starts otherwise).

    >>> input_channels(build_model("resnet18"))
    3
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels
        if isinstance(m, nn.Linear):
            return None
    return None
