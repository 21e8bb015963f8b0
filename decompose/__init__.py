"""decompose: Tucker-2 decomposition of convolutions (and its exact inverse) for any conv network.

>>> import torch
>>> from torch import nn
>>> from decompose import tucker_conv, recompose
>>> conv = nn.Conv2d(32, 32, 3, padding=1)
>>> seq = tucker_conv(conv, 0.5)            # 1x1 32->r_in, 3x3 r_in->r_out, 1x1 r_out->32
>>> fused = recompose(seq)                  # one Conv2d equal to the sequence
"""
from .model import eligible_convs, recompose_model, tucker_model
from .ranks import RankError, conv_params, ranks_for_energy, ranks_for_fraction, ranks_vbmf, tucker_params
from .report import LayerReport, TuckerReport
from .tucker import TuckerConv, recompose, tucker_conv
from .vbmf import evbmf_rank
from .budget import LayerChoices, allocate, conv_macs
from .data_aware import TuckerFit, data_aware_tucker, rank_curves
from .data_aware_model import data_aware_tucker_model
from .merge import MergeReport, MergeRow, merge_factors

__all__ = [
    "tucker_conv", "tucker_model", "recompose", "recompose_model", "TuckerConv", "TuckerReport", "LayerReport",
    "RankError", "eligible_convs", "conv_params", "tucker_params", "ranks_for_fraction", "ranks_for_energy",
    "ranks_vbmf", "evbmf_rank",
    "data_aware_tucker_model", "data_aware_tucker", "rank_curves", "TuckerFit", "LayerChoices", "allocate", "conv_macs",
    "merge_factors", "MergeReport", "MergeRow",
]
