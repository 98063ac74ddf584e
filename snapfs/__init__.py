"""snapfs: live memory snapshots with userfaultfd write-protection, a page store, a FUSE view."""

__version__ = "0.1.0"
