"""``import effsr`` and ``effsr --help`` stay light: no torch-pruning, tensorly or ONNX until a command needs them.

One fresh interpreter runs the steps in order and records, after each, the heavy packages loaded so far (a
package loaded by an earlier step would show in every later one, so the first step that names it is the culprit).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch_pruning", "tensorly", "onnx", "onnxruntime", "onnxscript")

PROBE = """
import contextlib, io, json, sys
HEAVY = set(json.loads(sys.argv[1]))
steps = {}

def record(name):
    steps[name] = sorted({m.split(".")[0] for m in sys.modules} & HEAVY)

import effsr
record("import effsr")
steps["effsr submodules after import effsr"] = sorted(m for m in sys.modules if m.startswith("effsr."))
from effsr import cli
cli.build_parser()  # registers every command (its modules must be light too)
for argv in [["--help"], *([name, "--help"] for name in cli.COMMANDS)]:
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    assert code == 0, (argv, code)
    record("effsr " + " ".join(argv))
import torch
from effsr import models
path = sys.argv[2]
torch.save(models.build("rfdn", nf=8, num_blocks=1).state_dict(), path)
models.load("rfdn", path, nf=8, num_blocks=1)
record("effsr.models.load of a zoo checkpoint")
print(json.dumps(steps))
"""


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict[str, list[str]]:
    weights = tmp_path_factory.mktemp("light") / "w.pth"
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY), str(weights)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_effsr_loads_no_heavy_dependency_and_no_submodule(steps):
    assert steps["import effsr"] == []
    assert steps["effsr submodules after import effsr"] == []


def test_cli_help_loads_no_heavy_dependency(steps):
    helps = {k: v for k, v in steps.items() if k.startswith("effsr ") and k.endswith("--help")}
    assert {"effsr --help", "effsr shrink --help", "effsr demo --help", "effsr export --help"} <= set(helps)
    assert {k: v for k, v in helps.items() if v} == {}


def test_loading_a_zoo_checkpoint_does_not_load_the_shrink_pipeline(steps):
    assert steps["effsr.models.load of a zoo checkpoint"] == []


def test_lazy_names_resolve():
    import effsr
    from effsr import export, shrink

    assert effsr.models.build is not None and shrink.ShrinkConfig.__name__ == "ShrinkConfig"
    assert callable(export.verify) and callable(export.session) and export.METHODS
    with pytest.raises(AttributeError):
        effsr.no_such_module  # noqa: B018
    with pytest.raises(AttributeError):
        shrink.no_such_name  # noqa: B018
