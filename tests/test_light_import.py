"""``import effsr`` and ``effsr --help`` stay light: no torch-pruning, tensorly or ONNX until a command needs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch_pruning", "tensorly", "onnx", "onnxruntime", "onnxscript")


def _loaded(code: str) -> list[str]:
    """The heavy top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_effsr_loads_no_heavy_dependency():
    assert _loaded("import effsr") == []


def test_import_effsr_loads_no_submodule():
    probe = "import effsr, sys\nprint(sorted(m for m in sys.modules if m.startswith('effsr.')))"
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.strip() == "[]", (res.stdout, res.stderr)


@pytest.mark.parametrize("argv", [["--help"], ["shrink", "--help"], ["demo", "--help"], ["export", "--help"],
                                  ["eval", "--help"], ["profile", "--help"]])
def test_cli_help_loads_no_heavy_dependency(argv):
    code = ("import contextlib, io\nfrom effsr import cli\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    assert cli.main({argv!r}) == 0")
    assert _loaded(code) == []


def test_loading_a_zoo_checkpoint_does_not_load_the_shrink_pipeline(tmp_path):
    code = ("import torch\nfrom effsr import models\n"
            f"torch.save(models.build('rfdn', nf=8, num_blocks=1).state_dict(), {str(tmp_path / 'w.pth')!r})\n"
            f"models.load('rfdn', {str(tmp_path / 'w.pth')!r}, nf=8, num_blocks=1)")
    assert _loaded(code) == []


def test_lazy_names_resolve():
    import effsr
    from effsr import export, shrink

    assert effsr.models.build is not None and shrink.ShrinkConfig.__name__ == "ShrinkConfig"
    assert callable(export.verify) and callable(export.session) and export.METHODS
    with pytest.raises(AttributeError):
        effsr.no_such_module  # noqa: B018
    with pytest.raises(AttributeError):
        shrink.no_such_name  # noqa: B018
