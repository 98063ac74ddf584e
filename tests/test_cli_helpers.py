"""The small helpers the commands share: which error to report, where a stream spools,
a closed stdout."""

from __future__ import annotations

import os
import subprocess
import sys

from snapfs.errors import SnapfsError, StreamError, TargetError, reported_error
from snapfs.stream.spool import spool_dir
from tests.conftest import ROOT


def test_reported_error_prefers_ctrl_c_then_expected_failures():
    target, stream = TargetError("gone"), StreamError("bad")
    group = BaseExceptionGroup("g", [ValueError("bug"), ExceptionGroup("inner", [target, stream])])
    assert reported_error(group) is target
    interrupt = KeyboardInterrupt()
    assert reported_error(BaseExceptionGroup("g", [stream, interrupt])) is interrupt
    bug = ExceptionGroup("g", [ValueError("bug")])
    assert reported_error(bug) is bug  # not expected: the whole group, with its traceback
    assert isinstance(reported_error(ExceptionGroup("g", [SnapfsError("x")])), SnapfsError)


def test_spool_dir_is_on_the_stores_disk(tmp_path):
    store = tmp_path / "store"
    assert spool_dir(store) == str(tmp_path)  # not created yet: its parent
    store.mkdir()
    assert spool_dir(store) == str(store)
    assert spool_dir(tmp_path / "no" / "such" / "store") is None  # the default temp dir
    assert spool_dir(None) is None


def _run(code: str, stdout_reader_gone: bool) -> subprocess.CompletedProcess:
    """Run ``code``; its stdout a pipe whose reader is already gone, or one that is read."""
    r, w = os.pipe()
    if stdout_reader_gone:
        os.close(r)
    try:
        return subprocess.run([sys.executable, "-c", code], stdout=w, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    finally:
        os.close(w)
        if not stdout_reader_gone:
            os.close(r)


def test_a_closed_stdout_ends_quietly_other_broken_pipes_do_not():
    writer = ("import argparse, sys\nfrom snapfs import cli\n"
              "def write(args):\n    sys.stdout.buffer.write(b'x' * (1 << 20))\n"
              "    sys.stdout.flush()\n    return 5\n"
              "p = argparse.ArgumentParser(); p.set_defaults(func=write)\n"
              "cli.build_parser = lambda: p\nsys.exit(cli.main([]))\n")
    quiet = _run(writer, True)
    assert quiet.returncode == 0 and quiet.stderr == b""
    other_pipe = ("import os, sys\nfrom snapfs.commands.common import stdout_closed\n"
                  "r, w = os.pipe(); os.close(r)\n"
                  "try:\n    os.write(w, b'x')\nexcept BrokenPipeError as e:\n"
                  "    sys.exit(4 if stdout_closed(e) else 3)\n")
    assert _run(other_pipe, False).returncode == 3  # not our stdout: a real error
    assert _run(other_pipe, True).returncode == 4
