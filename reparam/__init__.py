"""reparam: training-time re-parameterization blocks that fuse exactly into plain convolutions.

>>> from reparam import ECB, fuse_all
>>> block = ECB(16, 16).eval()
>>> conv = block.fuse()            # one nn.Conv2d computing the same function
"""
from . import kernels
from .base import MODES, Branch, ChannelVector, ConvBN, FuseModeWarning, RepBlock
from .convert import BLOCKS, fuse_all, get_block, register, rep_blocks, repify, set_mode
from .acb import ACB
from .dbb import DBB
from .ecb import ECB
from .edbb import EDBB
from .foreign import ForeignReport, fuse_foreign
from .mobileone import MobileOneBlock
from .repconv import RepConv
from .replk import RepLKConv
from .repvgg import RepVGGBlock
from .rrrb import ERB, RRRB

for _cls in (ECB, RRRB, ERB, DBB, RepConv, ACB, RepVGGBlock, MobileOneBlock, RepLKConv, EDBB):
    register(_cls)

__all__ = [
    "kernels", "MODES", "Branch", "ChannelVector", "ConvBN", "FuseModeWarning", "RepBlock", "BLOCKS", "fuse_all",
    "get_block", "rep_blocks", "repify",
    "set_mode", "ECB", "RRRB", "ERB", "DBB", "RepConv", "ACB", "RepVGGBlock", "MobileOneBlock", "RepLKConv", "EDBB",
    "fuse_foreign", "ForeignReport",
]
