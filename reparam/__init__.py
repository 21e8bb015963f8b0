"""reparam: training-time re-parameterization blocks that fuse exactly into plain convolutions.

>>> from reparam import ECB, fuse_all
>>> block = ECB(16, 16).eval()
>>> conv = block.fuse()            # one nn.Conv2d computing the same function
"""
from . import kernels
from .base import MODES, ConvBN, RepBlock
from .convert import BLOCKS, fuse_all, get_block, register, rep_blocks, repify, set_mode
from .ecb import ECB
from .rrrb import ERB, RRRB

for _cls in (ECB, RRRB, ERB):
    register(_cls)

__all__ = [
    "kernels", "MODES", "ConvBN", "RepBlock", "BLOCKS", "fuse_all", "get_block", "rep_blocks", "repify",
    "set_mode", "ECB", "RRRB", "ERB",
]
