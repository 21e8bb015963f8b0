"""effsr.shrink: the end-to-end compression pipeline behind ``effsr shrink`` and ``effsr demo``.

teacher -> [repify to rep blocks, distil online] -> [iterative L2 pruning + distillation] -> fuse + numerical
verification -> [Tucker-2 + distillation] -> report (report.json, report.md, frontier.png) and a student
that reloads without pickles (:func:`load_student`). See docs/shrink.md.

>>> from effsr.shrink import ShrinkConfig, run_shrink, load_student
>>> # run_shrink(ShrinkConfig(model="rfdn", weights="rfdn_aim2020.pth", train_data="t91",
>>> #                         eval_data=["set5"], out="runs/x", prune=0.33, steps=100))
>>> # net = load_student("runs/x/student.safetensors")

The names below are imported from their modules on first use, so ``import effsr.shrink.commands`` (the
CLI's parser) or ``effsr.shrink.recipe`` (reading a student) does not load the whole pipeline.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from effsr.lazy import lazy_exports

#: public name -> the submodule that defines it.
_EXPORTS = {
    "ShrinkConfig": "config", "find_peers_dir": "config",
    "StageRunner": "runner", "run_shrink": "runner",
    "STAGES": "stages", "Stage": "stages",
    "RunState": "state",
    "VerificationError": "verify", "verify_same": "verify",
    "build_from_recipe": "recipe", "has_recipe": "recipe", "load_student": "recipe", "read_recipe": "recipe",
    "save_student": "recipe",
}

__all__ = [
    "ShrinkConfig", "find_peers_dir", "run_shrink", "STAGES", "Stage", "RunState", "StageRunner", "VerificationError",
    "verify_same", "build_from_recipe", "load_student", "save_student", "read_recipe", "has_recipe",
]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on demand
    from .config import ShrinkConfig, find_peers_dir
    from .recipe import build_from_recipe, has_recipe, load_student, read_recipe, save_student
    from .runner import StageRunner, run_shrink
    from .stages import STAGES, Stage
    from .state import RunState
    from .verify import VerificationError, verify_same


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
