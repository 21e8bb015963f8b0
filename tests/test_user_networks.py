"""Users' own networks: naming (file.py:Class, module:factory), building, checkpoint keys, wrap, student reload,
and one clear error line with nothing written for every bad input."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from effsr import cli, models
from effsr.shrink.recipe import add_op, recipe_for, save_student

NET_CODE = textwrap.dedent('''
    import torch
    from torch import nn


    class TinySR(nn.Module):
        """x`upscale` SR net taking [0, 1] images."""

        def __init__(self, nf=8, upscale=2):
            super().__init__()
            self.head = nn.Conv2d(3, nf, 3, padding=1)
            self.body = nn.Conv2d(nf, nf, 3, padding=1)
            self.tail = nn.Conv2d(nf, 3 * upscale * upscale, 3, padding=1)
            self.up = nn.PixelShuffle(upscale)

        def forward(self, x):
            f = torch.relu(self.head(x))
            return self.up(self.tail(f + torch.relu(self.body(f))))


    def make_tiny(width=8):
        return TinySR(nf=width, upscale=2)


    class NotANet:
        pass


    class Declared(TinySR):
        input_range = 255.0


    class Collides(TinySR):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
''')


@pytest.fixture()
def netfile(tmp_path: Path) -> Path:
    path = tmp_path / "code" / "tiny_net.py"
    path.parent.mkdir()
    path.write_text(NET_CODE)
    return path


@pytest.fixture()
def weights(netfile: Path, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = models.build_network(f"{netfile}:TinySR", {"nf": 8})
    path = tmp_path / "tiny.pth"
    torch.save({"params": net.state_dict()}, path)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ API
def test_open_file_network_measures_scale_and_records_source(netfile, weights):
    net = models.open_model(f"{netfile}:TinySR", weights, config={"nf": 8}, input_range=1.0)
    assert (net.scale, net.input_range, net.arch, net.config) == (2, 1.0, "TinySR", {"nf": 8})
    assert net.weights_key == "params" and not net.training
    src = models.source_of(net)
    assert src.kind == "file" and src.location == str(netfile.resolve()) and src.attr == "TinySR"
    assert src.sha256 and len(src.sha256) == 64 and src.kwargs == {"nf": 8}
    ref = torch.load(weights, weights_only=True)["params"]
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
    # the state_dict keys are the user's own: nothing is wrapped around the module
    assert list(net.state_dict()) == list(ref)


def test_module_factory_spec(netfile, monkeypatch):
    monkeypatch.syspath_prepend(str(netfile.parent))
    net = models.open_model("tiny_net:make_tiny", config={"width": 4}, input_range=1.0)
    assert net.scale == 2 and net.head.out_channels == 4
    assert models.source_of(net).kind == "module"


def test_wrapper_key_found_and_chosen(netfile, tmp_path):
    torch.manual_seed(1)
    a = models.build_network(f"{netfile}:TinySR").state_dict()
    b = {k: v + 1 for k, v in a.items()}
    path = tmp_path / "two.pth"
    torch.save({"params": b, "params_ema": a, "iter": 5}, path)
    auto = models.open_model(f"{netfile}:TinySR", path, input_range=1.0)
    assert auto.weights_key == "params_ema" and torch.equal(auto.head.weight, a["head.weight"])
    chosen = models.open_model(f"{netfile}:TinySR", path, input_range=1.0, weights_key="params")
    assert torch.equal(chosen.head.weight, b["head.weight"])
    with pytest.raises(ValueError, match="key: .* no state_dict under 'ema'"):
        models.open_model(f"{netfile}:TinySR", path, input_range=1.0, weights_key="ema")


def test_wrap_any_module():
    net = models.wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 48, 3, padding=1), torch.nn.PixelShuffle(4)),
                      input_range=255)
    assert (net.scale, net.input_range) == (4, 255.0)
    with pytest.raises(ValueError, match="upscales x4, not x2"):
        models.wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 48, 3, padding=1), torch.nn.PixelShuffle(4)),
                    input_range=1.0, scale=2)
    with pytest.raises(ValueError, match="input_range: .*declares no input range"):
        models.wrap(torch.nn.Upsample(scale_factor=2))
    with pytest.raises(ValueError, match="input_range must be a finite number > 0"):
        models.wrap(torch.nn.Upsample(scale_factor=2), input_range=0)
    with pytest.raises(ValueError, match="N x 3 x sH x sW"):
        models.wrap(torch.nn.Conv2d(3, 5, 1), input_range=1.0)
    with pytest.raises(ValueError, match="cannot run a forward"):
        models.wrap(torch.nn.Conv2d(4, 3, 1), input_range=1.0)


def test_declared_range_must_agree(netfile):
    net = models.open_model(f"{netfile}:Declared")
    assert net.input_range == 255.0
    with pytest.raises(ValueError, match="declares input_range=255.0, not 1"):
        models.open_model(f"{netfile}:Declared", input_range=1)


def test_zoo_checks_given_range_and_scale():
    assert models.open_model("rfdn", input_range=255, scale=4).arch == "rfdn"
    with pytest.raises(ValueError, match=r"takes \[0, 255\], not \[0, 1\]"):
        models.open_model("rfdn", input_range=1)
    with pytest.raises(ValueError, match="upscales x4, not x3"):
        models.open_model("rfdn", scale=3)


def test_evaluation_refuses_an_unknown_range():
    from effsr.inference import upscale

    with pytest.raises(ValueError, match="declares no input_range"):
        upscale(torch.nn.Upsample(scale_factor=2), np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("spec,config,exc,needle", [
    (":TinySR", None, ValueError, "neither a zoo name"),
    ("missing.py:TinySR", None, ValueError, "no Python file"),
    ("{file}:Nope", None, ValueError, "defines no 'Nope' (nn.Module classes there: Collides, Declared, TinySR)"),
    ("{file}:NotANet", None, TypeError, "is a class but not a torch.nn.Module"),
    ("{file}:TinySR", {"width": 3}, TypeError, "config: tiny_net.py:TinySR rejects the arguments ['width']"),
    ("{file}:Collides", None, ValueError, "Collides.scale is a submodule/parameter/buffer"),
    ("no_such_module_xyz:Net", None, ValueError, "cannot import module 'no_such_module_xyz'"),
])
def test_bad_specs(netfile, spec, config, exc, needle):
    with pytest.raises(exc) as info:
        models.open_model(spec.format(file=netfile), config=config, input_range=1.0)
    assert needle in str(info.value)


# -------------------------------------------------------------------------------------------- students
def _student(netfile: Path, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(2)
    net = models.open_model(f"{netfile}:TinySR", config={"nf": 8}, input_range=1.0)
    recipe = add_op(recipe_for(net), {"op": "fuse"})
    path = save_student(net, recipe, tmp_path / "out" / "student.safetensors")
    return net, path


def test_student_reloads_without_model(netfile, tmp_path):
    net, path = _student(netfile, tmp_path)
    back = models.open_model(None, path)
    x = torch.rand(1, 3, 9, 11)
    assert torch.equal(back(x), net(x))
    assert (back.scale, back.input_range, back.arch) == (2, 1.0, "TinySR")


def test_student_source_moved_or_changed(netfile, tmp_path):
    net, path = _student(netfile, tmp_path)
    moved = tmp_path / "elsewhere.py"
    netfile.rename(moved)
    with pytest.raises(ValueError, match="is not there any more; name where it is now with --model"):
        models.open_model(None, path)
    back = models.open_model(f"{moved}:TinySR", path)  # named at its new place: same file content
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(back(x), net(x))
    moved.write_text(NET_CODE + "\n# edited\n")
    with pytest.raises(ValueError, match="changed since the network was saved"):
        models.open_model(f"{moved}:TinySR", path)


def test_cli_student_without_model(netfile, tmp_path, capsys):
    net, path = _student(netfile, tmp_path)
    code, out, _ = _run(capsys, "profile", "--weights", str(path))
    assert code == 0 and "TinySR" in out and f"{sum(p.numel() for p in net.parameters()):,}" in out
    code, out, _ = _run(capsys, "eval", "--weights", str(path), "--no-progress", "--json", str(tmp_path / "e.json"))
    assert code == 0 and json.loads((tmp_path / "e.json").read_text())["images"] > 0


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_eval_profile_runtime_user_network(netfile, weights, tmp_path, capsys):
    spec = f"{netfile}:TinySR"
    code, out, _ = _run(capsys, "profile", "--model", spec, "--model-config", '{"nf": 8}')
    assert code == 0 and "TinySR" in out
    out_json = tmp_path / "eval.json"
    code, out, err = _run(capsys, "eval", "--model", spec, "--model-config", '{"nf": 8}', "--weights", str(weights),
                          "--input-range", "1", "--no-progress", "--json", str(out_json))
    assert code == 0, err
    res = json.loads(out_json.read_text())
    ref = models.open_model(spec, weights, config={"nf": 8}, input_range=1.0)
    from effsr.data import open_dataset
    from effsr.inference import evaluate

    assert res["psnr_y"] == pytest.approx(evaluate(ref, open_dataset("default", scale=2), progress=False)["psnr_y"],
                                          abs=1e-9)
    code, out, err = _run(capsys, "runtime", "--model", spec, "--model-config", '{"nf": 8}', "--input-range", "1",
                          "--trials", "1", "--warmup", "0")
    assert code == 0 and "TinySR:" in out, err


@pytest.mark.parametrize("extra,needle", [
    (["--model", "{file}:Nope", "--input-range", "1"], "--model: "),
    (["--model", "{file}:NotANet", "--input-range", "1"], "--model: "),
    (["--model", "{file}:TinySR", "--model-config", '{"width": 2}', "--input-range", "1"], "--model-config: "),
    (["--model", "{file}:TinySR", "--model-config", "[1]", "--input-range", "1"], "--model-config: expected a JSON"),
    (["--model", "{file}:TinySR", "--input-range", "0"], "--input-range must be a finite number > 0"),
    (["--model", "{file}:TinySR"], "--input-range: TinySR declares no input range"),
    (["--model", "{file}:TinySR", "--input-range", "1", "--scale", "3"], "--scale: TinySR upscales x2, not x3"),
    (["--model", "{file}:TinySR", "--input-range", "1", "--weights-key", "ema"], "--weights-key: "),
    (["--model", "{file}:TinySR", "--input-range", "1", "--model-config", '{"nf": 4}'], "does not match 'TinySR'"),
    ([], "--model: name the network"),
])
def test_cli_bad_input_one_line_nothing_written(netfile, weights, tmp_path, capsys, extra, needle):
    extra = [e.replace("{file}", str(netfile)) for e in extra]
    out_json = tmp_path / "res" / "eval.json"
    code, _, err = _run(capsys, "eval", *extra, "--weights", str(weights), "--no-progress", "--json", str(out_json))
    assert code == 2
    assert needle in _one_line(err)
    assert not out_json.exists() and not out_json.parent.exists()
