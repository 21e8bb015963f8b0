"""Each ``effsr shrink`` / ``effsr frontier`` option is declared once, on its settings field
(:mod:`effsr.shrink.options`): the parser, the settings it builds and the names in the errors all come from there."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from effsr import cli
from effsr.cli_model import ARG_FLAGS
from effsr.shrink.config import ShrinkConfig
from effsr.shrink.frontier import FrontierConfig
from effsr.shrink.options import (SettingError, SettingTypeError, add_options, arg, either, flags, from_args, like,
                                  marked, option_of, setting)

CONFIGS = {"shrink": ShrinkConfig, "frontier": FrontierConfig}
#: Arguments of the command itself, not a setting of the run.
COMMAND_OWN = {"--help", "--threads"}


def _parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _required(command: str, tmp_path) -> list[str]:
    data = "--train-data" if command == "shrink" else "--calib-data"
    return ["--model", "rfdn", "--weights", str(tmp_path / "w.pth"), data, "default", "--eval-data", "default",
            "--out", str(tmp_path / "o")]


@pytest.mark.parametrize("command", CONFIGS)
def test_every_option_of_the_command_is_a_declared_setting(command):
    parser = _parser(command)
    declared = set(flags(CONFIGS[command]).values())
    options = {next(s for s in a.option_strings if s.startswith("--")) for a in parser._actions if a.option_strings}
    assert options - COMMAND_OWN == declared


@pytest.mark.parametrize("command", CONFIGS)
def test_the_network_options_are_named_as_every_command_names_them(command):
    cls = CONFIGS[command]
    shared = {f.name: option_of(f).flag for f in dataclasses.fields(cls)
              if option_of(f) is not None and option_of(f).added_by == "effsr.cli_model.add_model_args"}
    assert set(shared) == {"model", "weights", "model_config", "input_range", "scale", "weights_key"}
    for name, flag in shared.items():
        assert ARG_FLAGS[{"model_config": "config"}.get(name, name)] == flag


@pytest.mark.parametrize("command", CONFIGS)
def test_the_command_lines_defaults_are_the_apis(command, tmp_path):
    """Parsed with only the required options, the command line gives the settings the API's defaults give; the
    one difference is deliberate: the command line picks CUDA when there is one (``--device auto``)."""
    cls = CONFIGS[command]
    cfg = from_args(cls, _parser(command).parse_args(_required(command, tmp_path)), model_config={})
    data = "train_data" if command == "shrink" else "calib_data"
    api = cls(model="rfdn", weights=str(tmp_path / "w.pth"), eval_data=["default"], out=str(tmp_path / "o"),
              **{data: "default"})
    differ = {f.name for f in dataclasses.fields(cls) if getattr(cfg, f.name) != getattr(api, f.name)}
    assert differ == ({"device"} if command == "shrink" else set())
    assert cfg.device == ("auto" if command == "shrink" else "cpu")


def test_frontier_shares_the_calibration_options_of_shrink():
    for name in ("calib_images", "calib_patch", "calib_rows", "tucker_refine", "peers", "progress"):
        fields = [next(f for f in dataclasses.fields(c) if f.name == name) for c in (ShrinkConfig, FrontierConfig)]
        assert fields[0].default == fields[1].default and option_of(fields[0]) is option_of(fields[1])


def test_conversions_of_the_command_line(tmp_path):
    argv = ["shrink", *_required("shrink", tmp_path), "--y-float", "--no-progress", "--calib-rows", "0",
            "--runtime-size", "32", "40", "--feature-layers", "B1, B2", "--patch-size", "auto"]
    cfg = from_args(ShrinkConfig, cli.build_parser().parse_args(argv), model_config={})
    assert (cfg.y_round, cfg.progress, cfg.calib_rows, cfg.runtime_size, cfg.feature_layers, cfg.patch_size) == \
        (False, False, None, [32, 40], ["B1", "B2"], None)
    argv = ["frontier", *_required("frontier", tmp_path), "--budgets", "0.5,0.25", "--method", "tucker"]
    cfg = from_args(FrontierConfig, cli.build_parser().parse_args(argv), model_config={})
    assert (cfg.budgets, cfg.methods) == ([0.5, 0.25], ["tucker"])
    with pytest.raises(TypeError, match="no field nope"):
        from_args(FrontierConfig, cli.build_parser().parse_args(argv), nope=1)


@pytest.mark.parametrize("kw, api, flag", [
    ({"prune": 1.5}, "prune: the ratio", "--prune: the ratio"),
    ({"calib_images": 0}, "calib_images must be an int >= 1", "--calib-images must be an int >= 1"),
    ({"calib_rows": -1}, "calib_rows must be an int >= 1 (None: all)",
     "--calib-rows must be an int >= 1 (0 on the command line: all)"),
    ({"patch_size": 8}, "patch_size must be None (auto) or", "--patch-size must be 'auto' or"),
    ({"y_round": "yes"}, "y_round must be a bool", "y_round must be a bool"),
    ({"target_speedup": 1.0}, "target_speedup must be a finite number > 1",
     "--target-speedup must be a finite number > 1"),
    ({"target_speedup": 2.0, "method": "tucker"}, "use method prune or auto", "use --method prune or auto"),
    ({"target_params": 10, "prune": 0.5}, "target_params/target_flops/target_speedup/target_runtime: the data-aware "
     "path replaces prune and tucker", "--target-params/--target-flops/--target-speedup/--target-runtime: the "
     "data-aware path replaces --prune and --tucker"),
    ({"lr_schedule": "cosine", "train_minutes": 1}, "lr_schedule cosine decays over a known number of steps; with "
     "train_minutes", "--lr-schedule cosine decays over a known number of steps; with --train-minutes"),
    ({"device": "tpu"}, "device: unknown device 'tpu'", "--device: unknown device 'tpu'"),
])
def test_api_errors_name_the_argument_and_the_command_line_the_flag(tmp_path, kw, api, flag):
    base = dict(model="rfdn", weights=str(tmp_path / "w.pth"), train_data="default", eval_data=["default"],
                out=str(tmp_path / "o"))
    with pytest.raises((SettingError, SettingTypeError)) as err:
        ShrinkConfig(**{**base, **kw}).validate(check_files=False)
    assert str(err.value).startswith(api) or api in str(err.value), str(err.value)
    assert flag in err.value.with_flags(flags(ShrinkConfig))


def test_frontier_errors_name_its_own_arguments(tmp_path):
    base = dict(model="rfdn", weights=str(tmp_path / "w.pth"), calib_data=str(tmp_path / "none"),
                eval_data=["default"], out=str(tmp_path / "o"))
    (tmp_path / "w.pth").write_bytes(b"")
    for kw, api, flag in [({"methods": ["x"]}, "methods: a list from prune, tucker",
                           "--method: a comma-separated list from prune, tucker"),
                          ({}, "calib_data: data folder not found", "--calib-data: data folder not found"),
                          ({"max_eval_images": 0}, "max_eval_images must be", "--max-eval-images must be")]:
        with pytest.raises(SettingError) as err:
            FrontierConfig(**{**base, **kw}).validate()
        assert str(err.value).startswith(api) and err.value.with_flags(flags(FrontierConfig)).startswith(flag)


def test_setting_error_templates():
    table = {"prune": "--prune", "prune_steps": "--prune-steps", "y_round": "--y-float"}
    err = SettingError(f"{arg('prune')} and {arg('prune_steps')}: {either('None', '0')}; got {'a' + chr(0)!r}")
    assert str(err) == r"prune and prune_steps: None; got 'a\x00'" and isinstance(err, ValueError)
    assert err.with_flags(table) == r"--prune and --prune-steps: 0; got 'a\x00'"
    assert err.with_flags({}) == r"prune and prune_steps: 0; got 'a\x00'"  # a name without a flag stays the name
    assert str(err.renamed({"prune": "tucker"})).startswith("tucker and prune_steps")
    assert isinstance(SettingTypeError(arg("y_round")), TypeError)
    # a message worded for the command line: its flags become names (--prune-steps is not --prune)
    assert str(SettingError(marked("--prune-steps and --prune: x --no-progress", table))) == \
        "prune_steps and prune: x --no-progress"


@dataclasses.dataclass
class Cfg0:
    k: int = setting(7, flag="--k", type=int)


def test_setting_declares_the_field_and_its_argument():
    @dataclasses.dataclass
    class Cfg:
        name: str = setting(flag="--name", required=True, help="a name")
        n: int = setting(3, flag="--n", type=int, help="a count")
        rows: int | None = setting(5, flag="--rows", type=int, cli_default=5, convert=lambda v: v or None)
        quiet: bool = setting(False, flag="--no-quiet", action="store_true", convert=lambda v: not v,
                              added_by="the test")
        copy: int = like(Cfg0, "k")

    p = argparse.ArgumentParser()
    add_options(p, Cfg, before={"n": lambda q: q.add_argument("--first")})
    assert [a.dest for a in p._actions][1:] == ["name", "first", "n", "rows", "k"]  # "quiet" is added by "the test"
    p.add_argument("--no-quiet", action="store_true")
    cfg = from_args(Cfg, p.parse_args(["--name", "x", "--rows", "0"]))
    assert (cfg.name, cfg.n, cfg.rows, cfg.quiet, cfg.copy) == ("x", 3, None, True, 7)
    assert Cfg(name="y").rows == 5 and flags(Cfg) == {"name": "--name", "n": "--n", "rows": "--rows",
                                                      "quiet": "--no-quiet", "copy": "--k"}
