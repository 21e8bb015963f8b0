"""The shrink pipeline: teacher -> [repify] -> [prune + distill] -> fuse + verify -> [Tucker + distill] -> report.

This module gathers the pipeline's public names; each lives in the module of its one job:

* :mod:`.state` -- :class:`RunState`, what the stages share;
* :mod:`.stages` -- one :class:`Stage` declaration per stage (:data:`STAGES`) and the stage functions;
* :mod:`.runner` -- :class:`StageRunner` (seeds, checkpoints, resume) and :func:`run_shrink`;
* :mod:`.finetune` -- the distillation fine-tune the stages run;
* :mod:`.verify` -- :func:`verify_same` and :class:`VerificationError`;
* :mod:`.inputs` -- opening the training pairs and evaluation sets;
* :mod:`.seeds` -- every seed of a run, derived from ``--seed`` in one place.
"""
from __future__ import annotations

from .finetune import distill_finetune
from .inputs import open_eval_sets, open_train_pairs
from .runner import STOP_ENV, StageRunner, run_shrink
from .seeds import seed_everything
from .stages import STAGES, Stage
from .state import RunState
from .verify import VerificationError, verify_same

__all__ = [
    "RunState", "StageRunner", "run_shrink", "STAGES", "Stage", "VerificationError", "verify_same",
    "seed_everything", "distill_finetune", "STOP_ENV", "open_eval_sets", "open_train_pairs",
]
