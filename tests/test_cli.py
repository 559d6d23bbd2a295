"""The ``sparsify`` command: recipes, plan, train, demo (small runs on digits)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import sparsify
from sparsify.app.cli import main
from sparsify.app.overrides import parse_overrides


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_recipes_lists_every_builtin_with_its_description(capsys):
    rc, out, _ = run_cli(capsys, "recipes")
    assert rc == 0
    for name, desc in sparsify.builtin_recipes().items():
        line = next(line for line in out.splitlines() if line.split() and line.split()[0] == name)
        assert desc[:30] in line


def test_recipes_json_and_show(capsys):
    rc, out, _ = run_cli(capsys, "recipes", "--json")
    assert rc == 0 and json.loads(out) == sparsify.builtin_recipes()
    rc, out, _ = run_cli(capsys, "recipes", "--show", "st3")
    assert rc == 0 and json.loads(out)["rules"][0]["method"] == "st3"


def test_plan_torchvision_model_table_and_json(capsys):
    rc, out, _ = run_cli(capsys, "plan", "--model", "resnet18", "--recipe", "st3", "--input-shape", "1,3,64,64")
    assert rc == 0
    assert "layer1.0.conv1" in out and "21 sites rewritten" in out
    rc, out, _ = run_cli(capsys, "plan", "--model", "resnet18", "--recipe", "st3", "--json",
                         "--input-shape", "1,3,64,64")
    plan = json.loads(out)
    assert len([e for e in plan["entries"] if e["method"] == "st3"]) == 21
    assert plan["input_shapes"] == [[1, 3, 64, 64]]


def test_plan_builtin_model_and_override(capsys):
    rc, out, _ = run_cli(capsys, "plan", "--model", "lenet5", "--recipe", "st3", "--set", "sparsity=0.5", "--json")
    assert rc == 0
    plan = json.loads(out)
    assert {e["name"] for e in plan["entries"]} == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    assert next(e for e in plan["entries"] if e["name"] == "conv1")["macs"] == 6 * 25 * 28 * 28


def test_plan_flat_input_shape(capsys):
    """1,784 (the shape --input-shape's own message suggests) built LeNet-300-100 for 784 channels of
    784x784 pixels: 578 GB."""
    rc, out, _ = run_cli(capsys, "plan", "--model", "lenet300", "--recipe", "st3", "--input-shape", "1,784", "--json")
    plan = json.loads(out)
    assert rc == 0 and plan["input_shapes"] == [[1, 784]]
    assert {e["name"]: e["macs"] for e in plan["entries"]} == {"fc1": 784 * 300, "fc2": 300 * 100, "fc3": 100 * 10}


def test_plan_capture_option(capsys):
    rc, out, _ = run_cli(capsys, "plan", "--model", "cnn", "--recipe", "st3", "--capture", "export", "--json")
    plan = json.loads(out)
    assert rc == 0 and [c["capture"] for c in plan["captures"]] == ["torch.export"]
    assert len([e for e in plan["entries"] if e["method"] == "st3"]) == 4


def test_plan_factory_model(capsys, tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes=3):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def small():\n"
        "    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, out, _ = run_cli(capsys, "plan", "--model", "mynets:small", "--recipe", "st3", "--json")
    assert rc == 0
    assert [e["name"] for e in json.loads(out)["entries"]] == ["0", "2"]


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--model", "resnt18", "--recipe", "st3"], "did you mean resnet18"),
    (["plan", "--model", "nosuchpkg.mod:f", "--recipe", "st3"], "cannot import module 'nosuchpkg.mod'"),
    (["plan", "--model", "cnn", "--recipe", "nosuch"], "unknown recipe 'nosuch'"),
    (["plan", "--model", "cnn", "--recipe", "st3", "--set", "spars=0.9"], "'spars' is not a parameter"),
    (["plan", "--model", "cnn", "--recipe", "st3", "--set", "sparsity"], "--set takes key=value"),
    (["train", "--data", "cifar", "--epochs", "1"], "unknown dataset 'cifar'"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert needle in err and "Traceback" not in err


def test_parse_overrides_json_values():
    assert parse_overrides(["a=1", "b=[1, 2]", "c=true", "d=st3"]) == {"a": 1, "b": [1, 2], "c": True, "d": "st3"}


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "sparsify.app.cli", "recipes", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert "st3" in json.loads(out)


def test_python_dash_m_sparsify_is_the_command():
    """``python -m sparsify`` takes the same arguments and gives the same output and exit status."""
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True)  # noqa: E731
    as_module, as_cli = run("sparsify", "recipes", "--json"), run("sparsify.app.cli", "recipes", "--json")
    assert as_module.returncode == 0 and json.loads(as_module.stdout) == json.loads(as_cli.stdout)
    bad = run("sparsify", "plan", "--model", "cnn", "--recipe", "nosuch")
    assert bad.returncode == 2 and "unknown recipe 'nosuch'" in bad.stderr
    # what a command line can pass instead; the dict only from Python
    assert "(or a path to a .json file; from Python, also a dict)" in bad.stderr
    assert run("sparsify", "--help").stdout.startswith("usage: sparsify")


def test_the_command_starts_without_torch_and_a_ctrl_c_while_torch_loads_is_one_line():
    """``import sparsify`` is lazy: ``--help`` needs no torch, and a Ctrl-C during torch's seconds-long
    import (here: raised by an import hook when torch is first imported) is "interrupted", exit 130."""
    code = ("import sys, sparsify, sparsify.app.cli; print('torch' in sys.modules); "
            "print(sorted(set(sparsify.__all__) - set(dir(sparsify))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "[]"]
    hook = ("import sys\n"
            "class Stop:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch': raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Stop())\n"
            "from sparsify.app.cli import main\n"
            "sys.exit(main(['plan', '--model', 'cnn', '--recipe', 'st3']))\n")
    run = subprocess.run([sys.executable, "-c", hook], capture_output=True, text=True)
    assert (run.returncode, run.stderr, run.stdout) == (130, "sparsify plan: interrupted\n", "")


@pytest.mark.parametrize("command", ["recipes", "plan", "train", "demo"])
def test_an_unknown_option_is_named_with_its_command(capsys, command):
    with pytest.raises(SystemExit) as stop:
        main([command, *(["--model", "cnn"] if command == "plan" else []), "--bogus"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err == f"sparsify {command}: error: unrecognized arguments: --bogus (see sparsify {command} --help)\n"


def test_train_command_end_to_end(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "train", "--model", "cnn", "--recipe", "st3", "--epochs", "1", "--threads", "1",
                         "--out", str(tmp_path / "r"), "--no-progress", "--set", "sparsity=0.5", "--seed", "3",
                         "--ema", "0.5")
    assert rc == 0
    assert "epoch 1/1" in out and "non-zero-weight MACs" in out and "features.3" in out  # progress line + report table
    assert "ema test acc" in out and "EMA (decay 0.5): test accuracy" in out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["weight_sparsity"] == pytest.approx(0.5, abs=0.005)
    assert rep["config"]["seed"] == 3 and rep["config"]["overrides"] == {"sparsity": 0.5}
    assert rep["config"]["ema"] == 0.5 and rep["ema"]["finalize"] == "ok"
