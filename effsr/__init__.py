"""effsr: efficient super-resolution toolkit.

Submodules are imported on demand, e.g. ``from effsr.quality import psnr`` or
``from effsr.data import open_dataset``.
"""

import effsr.shrink.recipe  # noqa: E402,F401 - registers the reader of shrunk students with effsr.models.load
