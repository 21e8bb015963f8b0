"""effsr.shrink: the end-to-end compression pipeline behind ``effsr shrink`` and ``effsr demo``.

teacher -> [repify to rep blocks, distil online] -> [iterative L2 pruning + distillation] -> fuse + numerical
verification -> [Tucker-2 + distillation] -> report (report.json, report.md, frontier.png) and a student
that reloads without pickles (:func:`load_student`). See docs/shrink.md.

>>> from effsr.shrink import ShrinkConfig, run_shrink, load_student
>>> # run_shrink(ShrinkConfig(model="rfdn", weights="rfdn_aim2020.pth", train_data="t91",
>>> #                         eval_data=["set5"], out="runs/x", prune=0.33, steps=100))
>>> # net = load_student("runs/x/student.safetensors")
"""
from .config import ShrinkConfig, find_peers_dir
from .runner import StageRunner, run_shrink
from .stages import STAGES, Stage
from .state import RunState
from .verify import VerificationError, verify_same
from .recipe import build_from_recipe, has_recipe, load_student, read_recipe, save_student

__all__ = [
    "ShrinkConfig", "find_peers_dir", "run_shrink", "STAGES", "Stage", "RunState", "StageRunner", "VerificationError",
    "verify_same", "build_from_recipe", "load_student", "save_student", "read_recipe", "has_recipe",
]
