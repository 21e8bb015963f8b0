"""effsr.models: the efficient SR networks, buildable at any width/depth and with re-parameterizable convs.

>>> from effsr import models
>>> models.names()
['rfdn', 'rfdn_pruned', 'rlfn', 'fmen', 'imdn']
>>> net = models.build("rfdn", nf=24)                 # a smaller student
>>> train_net = models.build("rlfn", conv="ecb")       # every 3x3 slot an ECB; reparam.fuse_all -> plain keys
>>> # teacher = models.load("rfdn", "rfdn_aim2020.pth")  # eval mode, strict, weights_only

A user's own network: ``models.open_model("path/to/net.py:MyNet", "net.pth", config={...}, input_range=1.0)``,
or ``models.wrap(module, input_range=1.0)`` for a module built by hand (:mod:`effsr.models.user`).

Every network has ``arch``, ``scale`` (4), ``input_range`` (255.0, or 1.0 for IMDN) and ``config``
(``build(net.arch, **net.config)`` rebuilds it). Input: float NCHW RGB in ``[0, input_range]``.
"""
from ._common import SRNet
from .conv import apply_conv, conv_slots, is_slot, normalize_conv
from .esa import ESA, ESALite
from .fmen import FMEN, HFAB, BasicBlock, RepSlot
from .imdn import IMDN, IMDBlock
from .registry import (LAZY_LOADERS, LOADERS, NETWORKS, CheckpointMismatchError, build, check_state_dict, load,
                       loaders_for, names, read_state_dict, register_loader)
from .rfdn import RFDB, RFDN, RFDNPruned
from .rlfn import RLFB, RLFN
from .naming import open_model
from .user import (NetworkSource, build_network, is_user_spec, measure_scale, open_network, parse_model, source_of,
                   wrap)

__all__ = [
    "build", "load", "names", "read_state_dict", "check_state_dict", "CheckpointMismatchError", "NETWORKS",
    "SRNet", "RFDN", "RFDNPruned", "RFDB", "RLFN", "RLFB", "FMEN", "HFAB", "BasicBlock", "RepSlot", "IMDN",
    "IMDBlock", "ESA", "ESALite", "apply_conv", "conv_slots", "is_slot", "normalize_conv", "LOADERS",
    "LAZY_LOADERS", "loaders_for", "register_loader", "open_model", "wrap", "open_network", "build_network",
    "measure_scale", "source_of", "NetworkSource", "is_user_spec", "parse_model",
]
