"""effsr: efficient super-resolution toolkit.

Submodules are imported on demand, e.g. ``from effsr.quality import psnr`` or
``from effsr.data import open_dataset``.
"""
