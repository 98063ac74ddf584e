"""Entry point of the mount daemon process, started by :func:`snapfs.fs.mount.mount`.

``python -m snapfs.fs.daemon SPEC`` where SPEC is JSON: store, mountpoint, options, log_file,
ready_fd (the write end of the readiness pipe, inherited).
"""

from __future__ import annotations

import json
import sys

from snapfs.fs.mount import daemon_main


def main(argv: list[str] | None = None) -> int:
    """Serve the mount described by the JSON spec in ``argv[0]``; the exit code."""
    args = sys.argv[1:] if argv is None else argv
    return daemon_main(json.loads(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
