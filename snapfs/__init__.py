"""snapfs: live memory snapshots with userfaultfd write-protection, a page store, a FUSE view."""

import os as _os

# numpy's bundled OpenBLAS starts a thread per CPU at import, and they spin for a while;
# snapfs never multiplies matrices. Set before anything imports numpy.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
