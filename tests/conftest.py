"""Shared test configuration: hypothesis profiles and the optional real-data fixture."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles. The strategies draw shapes and values themselves; the profile only decides how
# many examples and whether the run is reproducible.
# * "effsr" (default, CI and developer runs): deterministic (derandomize=True: the same examples on every
#   run and machine) and bounded.
# * "thorough": `pytest --hypothesis-profile=thorough`: random (a fresh search every run, failures are
#   stored in .hypothesis/ and replayed), 10x the examples. Use it before merging changes to reparam.
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "effsr",
    max_examples=int(os.environ.get("EFFSR_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    derandomize=True,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=int(os.environ.get("EFFSR_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    derandomize=False,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
settings.load_profile("effsr")  # hypothesis' own --hypothesis-profile option overrides this

# One intra-op thread per test process: the suite runs as 2 xdist workers on 2 cores, and oversubscribed
# BLAS threads were measured 50-100x slower on this class of machine.
torch.set_num_threads(1)


def shared_data_dir() -> Path | None:
    """``$EFFSR_DATA`` if set (a missing path means "no data"), else ``../shared/data`` beside the project."""
    env = os.environ.get("EFFSR_DATA")
    candidate = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real test data; skips the test cleanly when it is not on this machine."""
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data not found (set EFFSR_DATA or place it at ../shared/data)")
    return d


@pytest.fixture(scope="session")
def checkpoints(shared_data: Path) -> Path:
    d = shared_data / "checkpoints"
    if not d.is_dir():
        pytest.skip("checkpoints not found in shared data")
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's real-network or tiny-network runs (with pytest -n 2 on two cores more
    threads only thrash); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_benchmark_folder(root: Path, crops) -> Path:
    """The benchmark layout for ``[(name, hr_uint8), ...]``: ``HR/<name>.png`` and ``LR_bicubic/X4/<name>x4.png``
    (MATLAB-style bicubic)."""
    from effsr import data
    from effsr.imresize import imresize

    for name, hr in crops:
        data.write_image(root / "HR" / f"{name}.png", hr)
        data.write_image(root / "LR_bicubic" / "X4" / f"{name}x4.png", imresize(hr, scale=0.25))
    return root
