"""prune: structured L2 filter pruning for super-resolution networks (torch-pruning DepGraph inside).

>>> import torch, prune
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
...                           torch.nn.Conv2d(16, 48, 3, padding=1), torch.nn.PixelShuffle(4))
>>> small = prune.l2_filter_prune(net, torch.rand(1, 3, 8, 8), ratio=0.25, progress=False)
>>> small[0].out_channels, small[2].out_channels     # the output (3 x 16 channels) is never pruned
(12, 48)

See docs/prune.md.
"""
from .core import HISTORY_ATTR, REPORT_ATTR, l2_filter_prune
from .finetune import fresh_optimizer
from .graph import PixelShuffleIndexError, SRDependencyGraph, build_graph
from .importance import ActivationImportance, L2FilterImportance
from .io import load, read_history, save
from .rep import RepSlicer, branch_slicer, get_slicer, register_rep_block
from .report import PruneReport, StepReport, channels_per_layer
from .schedule import agp, linear
from .calibration import Calibration, ConvStats, im2col
from .reconstruct import ReconstructionReport, kept_channels, reconstruct
from .budget import BudgetReport, mac_count, prune_to_budget
from .importance import ReconstructionImportance

__all__ = [
    "l2_filter_prune", "save", "load", "read_history", "L2FilterImportance", "ActivationImportance", "PruneReport",
    "StepReport", "channels_per_layer", "register_rep_block", "branch_slicer", "get_slicer", "RepSlicer", "build_graph",
    "SRDependencyGraph", "PixelShuffleIndexError",
    "fresh_optimizer", "agp", "linear", "HISTORY_ATTR", "REPORT_ATTR",
    "Calibration", "ConvStats", "im2col", "reconstruct", "kept_channels", "ReconstructionReport",
    "prune_to_budget", "BudgetReport", "mac_count", "ReconstructionImportance",
]
