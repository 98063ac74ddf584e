"""A VM snapshot through QEMU's own background-snapshot (``snapfs snapshot --qmp SOCK``;
the command line side is :mod:`snapfs.commands.vm`).

Sequence: check the VM's run state and migration state, enable the ``background-snapshot``
(+ ``events``) capability, hand QEMU the write end of a pipe (``getfd`` over SCM_RIGHTS, then
``migrate fd:NAME``), drain the pipe in a forked process and parse the stream in a worker
thread at idle priority as it arrives, then store it
(:mod:`snapfs.stream.ingest`) and restore the capabilities to what they were.

QEMU 7.2 traps, and what snapfs does about them:

- a *paused* VM is resumed by 7.2's background snapshot (fixed in 9.0): snapfs refuses on
  QEMU < 9.0 and asks to ``cont`` first — it never changes the VM's run state behind the
  user's back;
- a VM that never ran (``prelaunch``, ``-S`` without ``cont``) makes QEMU abort: refused;
- a cancelled or failed background snapshot leaves guest RAM write-protected on QEMU < 8.1
  (writes then hang): snapfs never cancels — once QEMU has started, the stream is read to its
  end even when snapfs is interrupted or the store fails — and it refuses to start when a
  previous background snapshot of that QEMU was cancelled or failed, saying the VM needs a
  restart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from snapfs.errors import QemuError
from snapfs.store import Store
from snapfs.stream.ingest import commit_spooled, spool_capture
from snapfs.stream.qmp import QmpClient
from snapfs.stream.spool import PipeCapture, spool_dir

_ACTIVE = {"setup", "active", "cancelling", "pre-switchover", "device", "wait-unplug",
           "postcopy-active", "postcopy-paused", "postcopy-recover", "colo"}
_DONE = ("completed", "failed", "cancelled")
_PROGRESS_INTERVAL = 0.5


@dataclass(frozen=True)
class VmProgress:
    """What :func:`snapshot_vm` reports about twice a second while QEMU sends (from
    ``query-migrate``), then once when QEMU is done and the stream goes into the store."""

    done_bytes: int  # guest RAM QEMU has saved so far
    total_bytes: int  # guest RAM in all
    transferred_bytes: int  # stream bytes QEMU has sent
    elapsed_s: float
    storing: bool = False  # QEMU is done; the stream is being written into the store


ProgressCallback = Callable[[VmProgress], None]


async def snapshot_vm(qmp_path: str, store_dir: str | os.PathLike, name: str,
                      progress: ProgressCallback | None = None, *, number_if_taken: bool = False) -> dict:
    """Take a background snapshot of the VM behind ``qmp_path`` into the store as ``name``.

    Returns ``{"info": SnapshotInfo, "qemu": {...timings...}}``; ``progress`` (if given)
    receives :class:`VmProgress` reports. Raises QemuError when QEMU
    refuses or the VM is in a state where a snapshot would harm it, NameInUse if ``name`` is
    taken (with ``number_if_taken``, a made-up name: the first free ``<name>-N`` instead),
    StreamError if QEMU's stream is malformed. Nothing is published on any error.
    """
    store: Store | None = None
    try:
        async with await QmpClient.connect(qmp_path) as qmp:
            caps_before = await _preflight(qmp, qmp_path)
            store = Store.open(store_dir, create=True)
            writer = store.begin_snapshot(name, {}, number_if_taken=number_if_taken)
            try:
                spooled, timings = await _run_migration(qmp, caps_before, store, progress)
            except BaseException:
                writer.abort()
                raise
        # QMP is released (one client at a time) before the slow part: compressing into the store.
        meta = {"kind": "vm", "pause_ms": timings["downtime_ms"], "qemu": timings}
        info = await trio.to_thread.run_sync(commit_spooled, writer, spooled, meta)
    finally:
        if store is not None:
            store.close()
    return {"info": info, "qemu": timings}


async def _preflight(qmp: QmpClient, path: str) -> dict[str, bool]:
    """Refuse the states in which QEMU's background snapshot would harm the VM."""
    version = qmp.version
    vtext = ".".join(map(str, version))
    status = (await qmp.execute("query-status"))["status"]
    if status == "prelaunch":
        raise QemuError(
            f"the VM at {path} was never started (state prelaunch: -S without cont); QEMU aborts "
            "on a background snapshot in this state: run `cont` first"
        )
    if status == "paused" and version < (9, 0, 0):
        raise QemuError(
            f"the VM at {path} is paused, and QEMU {vtext}'s background snapshot would resume it: "
            "`cont` it first (or use QEMU >= 9.0, which keeps it paused)"
        )
    if status not in ("running", "paused"):
        raise QemuError(f"the VM at {path} is in state {status!r}: a snapshot needs a running VM")

    caps = {c["capability"]: c["state"] for c in await qmp.execute("query-migrate-capabilities")}
    if "background-snapshot" not in caps:
        raise QemuError(f"QEMU {vtext} has no background-snapshot capability (needs QEMU >= 6.0)")
    mig = (await qmp.execute("query-migrate")).get("status", "none")
    if mig in _ACTIVE:
        raise QemuError(f"a migration of the VM at {path} is in progress ({mig}): wait for it to finish")
    if mig in ("cancelled", "failed") and caps["background-snapshot"] and version < (8, 1, 0):
        raise QemuError(
            f"a previous background snapshot of the VM at {path} was {mig}; QEMU {vtext} then leaves "
            "guest RAM write-protected (a new snapshot fails and the guest can hang): restart the VM"
        )
    return {"background-snapshot": caps["background-snapshot"], "events": caps.get("events", False)}


async def _set_caps(qmp: QmpClient, caps: dict[str, bool]) -> None:
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
    )


async def _run_migration(qmp: QmpClient, caps_before: dict[str, bool], store: Store,
                         progress: ProgressCallback | None) -> tuple[Any, dict]:
    """Start the background snapshot into a pipe and spool the stream until QEMU is done."""
    fdname = f"snapfs-{os.getpid()}"
    await _set_caps(qmp, {"background-snapshot": True, "events": True})
    try:
        rfd, wfd = os.pipe()
        try:
            # A forked drainer reads the pipe from now on, whatever this process does.
            capture = PipeCapture(rfd, spool_dir(store.path))
        except BaseException:
            os.close(wfd)
            raise
        finally:
            os.close(rfd)
        try:
            try:
                await qmp.execute("getfd", {"fdname": fdname}, fds=(wfd,))
            finally:
                os.close(wfd)
            # On success the spool owns the capture: its file holds the pages until commit.
            return await _migrate_and_spool(qmp, fdname, capture, store, progress)
        except BaseException:
            capture.close()
            raise
    finally:
        with trio.CancelScope(shield=True):
            try:
                await _set_caps(qmp, caps_before)
            except QemuError:
                pass  # QEMU busy or gone: the capability state is not worth failing for


async def _migrate_and_spool(qmp: QmpClient, fdname: str, capture: PipeCapture, store: Store,
                             progress: ProgressCallback | None) -> tuple[Any, dict]:
    outcome: dict[str, Any] = {}

    async def parser() -> None:
        # The stream is parsed as it arrives, at idle priority while QEMU is still sending
        # (QEMU itself never waits: the drainer process keeps the pipe empty). The thread is
        # not abandoned on cancellation; it ends when QEMU closes the pipe.
        try:
            outcome["spooled"] = await trio.to_thread.run_sync(spool_capture, capture, store)
        except Exception as exc:  # reported after QEMU's own verdict, which explains more
            outcome["stream_error"] = exc

    started = time.monotonic()
    final: dict = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(parser)
        try:
            await qmp.execute("migrate", {"uri": f"fd:{fdname}"})
            final = await _wait_done(qmp, progress, started)
            if progress is not None and final.get("status") == "completed":
                progress(_progress_of(final, time.monotonic() - started, storing=True))
        except QemuError as exc:
            outcome["qemu_error"] = exc
            with trio.CancelScope(shield=True):
                try:
                    await qmp.execute("closefd", {"fdname": fdname})  # EOF for the reader
                except QemuError:
                    pass
    spooled = outcome.get("spooled")
    error = outcome.get("qemu_error") or (
        QemuError(_failure_message(final)) if final.get("status") != "completed" else None
    ) or outcome.get("stream_error")
    if error is not None:
        if spooled is not None:
            spooled.close()
        raise error
    timings = {
        "downtime_ms": final.get("downtime"),
        "total_time_ms": final.get("total-time"),
        "setup_time_ms": final.get("setup-time"),
        "transferred_bytes": final.get("ram", {}).get("transferred"),
        "version": ".".join(map(str, qmp.version)),
    }
    return spooled, timings


async def _wait_done(qmp: QmpClient, progress: ProgressCallback | None, started: float) -> dict:
    """Wait for the MIGRATION event that ends the snapshot; show query-migrate progress."""
    while True:
        with trio.move_on_after(_PROGRESS_INTERVAL):
            await qmp.wait_event("MIGRATION", lambda d: d.get("status") in _DONE)
        info = await qmp.execute("query-migrate")
        if info.get("status") in _DONE:
            return await _final_info(qmp, info)
        if progress is not None:
            progress(_progress_of(info, time.monotonic() - started))


async def _final_info(qmp: QmpClient, info: dict) -> dict:
    """QEMU announces completion a moment before it fills in total-time: wait for it (<1 s)."""
    for _ in range(50):
        if info.get("status") != "completed" or info.get("total-time"):
            break
        await trio.sleep(0.02)
        info = await qmp.execute("query-migrate")
    return info


def _progress_of(info: dict, elapsed: float, storing: bool = False) -> VmProgress:
    ram = info.get("ram", {})
    total = ram.get("total", 0)
    return VmProgress(total - ram.get("remaining", 0), total, ram.get("transferred", 0), elapsed, storing)


def _failure_message(final: dict) -> str:
    desc = final.get("error-desc", "no reason given")
    msg = f"QEMU's background snapshot {final.get('status')}: {desc}"
    if "ram_write_tracking_start" in desc:
        msg += ("; a previous cancelled or failed background snapshot left guest RAM write-protected "
                "(QEMU < 8.1): restart the VM")
    return msg
