"""What a capture records for the ``core`` view: registers and register sets at the freeze,
the auxv, the process status, every mapping, and the private pages of read-only file mappings
(the dynamic linker's relocations)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import trio

from snapfs.capture import CaptureOptions, capture_process, stopped
from snapfs.capture import kernel as k
from snapfs.capture.maps import read_maps
from snapfs.elfcore import x86_64
from snapfs.elfcore.state import BLOB, CoreState
from snapfs.store import HOLE, Store
from tests.support.capture import Target

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 register layout")


async def test_freeze_records_what_the_core_needs(store_dir):
    with Target("coretarget") as t:
        tids = sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
        auxv = Path(f"/proc/{t.pid}/auxv").read_bytes()
        with Store.open(store_dir, create=True) as store:
            await capture_process(t.pid, store, "s", CaptureOptions())
            reader = store.open_snapshot("s")
            blob = reader.blob(BLOB)
            state = CoreState.from_snapshot(reader.info, blob)
            meta_threads = reader.info.meta["threads"]

            # Registers stay in the metadata (with names read after the resume); the XSAVE
            # areas and the rest are in the blob, not in the catalog's info row.
            assert sorted(map(int, meta_threads)) == tids
            assert all(set(t_) == {"comm", "regs", "fpregs"} for t_ in meta_threads.values())
            assert meta_threads[str(t.pid)]["comm"] == "coretarget"
            assert "regsets" not in json.dumps(reader.info.meta)
            assert json.loads(blob)["format"] == 1

            assert state.arch == "x86_64" and state.pid == t.pid
            assert [th.tid for th in state.threads] == [t.pid] + [x for x in tids if x != t.pid]
            assert state.auxv == auxv
            assert state.status.ppid == os.getpid() and state.status.uid == os.getuid()
            for th in state.threads:
                xstate = th.regsets[x86_64.NT_X86_XSTATE]
                assert len(xstate) >= 576  # legacy area + XSAVE header
                # the XSAVE area holds the FXSAVE area: fpregs are derived, not read again
                assert th.fpregs == x86_64.fpregs_from_regsets(th.regsets)
                xcr0 = int.from_bytes(xstate[464:472], "little")
                assert xcr0 & 3 == 3  # XCR0: x87 | SSE
                assert th.siginfo is None  # no signal was being delivered
                # The CPU's XSAVE layout (CPUID 0xD) covers every enabled component, all
                # within the kernel's area (equal ends here): the view moves them by it.
                layout = {f: (size, off) for f, size, off in state.arch_state[x86_64.XSAVE_LAYOUT_KEY]}
                enabled = [f for f in range(2, 64) if xcr0 >> f & 1]
                assert set(enabled) <= set(layout)
                assert all(layout[f][1] + layout[f][0] <= len(xstate) for f in enabled)
                if xcr0 & 4:
                    assert layout[2] == (256, 576)  # AVX: the same on every CPU

            # Every mapping at the instant, code included (NT_FILE names it for gdb).
            libc_code = [m for m in state.mappings if "libc.so" in m.path and m.perms.startswith("r-x")]
            assert len(libc_code) == 1 and libc_code[0].is_file
            assert {m.start for m in state.mappings} >= {r.start for r in reader.regions}

            # The private pages of read-only file mappings (RELRO: the GOT, .dynamic) are
            # saved; their holes are the file's bytes.
            relro = [r for r in reader.regions if r.meta.get("holes") == "file"]
            assert any("libc.so" in r.path for r in relro)
            for r in relro:
                assert r.perms[1] == "-" and r.kind == "file" and r.data_pages + r.zero_pages > 0
            # ... and the first page of each mapped ELF file (its header and build-id).
            headers = [r for r in relro if r.offset == 0 and "libc.so" in r.path]
            assert len(headers) == 1 and reader.read(headers[0].index, 0, 4) == b"\x7fELF"
            assert any(r.offset == 0 and r.path == os.readlink(f"/proc/{t.pid}/exe") for r in relro)


async def test_xstate_fx_part_is_what_getfpregs_returns():
    """The derivation of NT_PRFPREG from the XSAVE area matches PTRACE_GETFPREGS byte for byte."""
    with Target("coretarget") as t:
        with stopped(t.pid) as proc:
            for tid in proc.tids:
                derived = x86_64.fpregs_from_regsets(proc.get_regsets(tid))
                assert derived == proc.get_fpregs(tid)


async def test_relro_pages_are_the_relocated_bytes(store_dir):
    """What is saved of a read-only library mapping is what the process sees there."""
    from snapfs.capture import read_memory

    with Target("coretarget") as t:
        with Store.open(store_dir, create=True) as store:
            await capture_process(t.pid, store, "s", CaptureOptions())
            reader = store.open_snapshot("s")
            for r in [r for r in reader.regions if r.meta.get("holes") == "file"]:
                for first, n, kind in reader.runs(r.index):
                    if kind == HOLE:
                        continue
                    addr = r.start + first * 4096
                    assert reader.read(r.index, first * 4096, n * 4096) == read_memory(t.pid, addr, n * 4096)


async def test_their_blocks_round_trip_through_incoming_name_which_has_no_core(store_dir, tmp_path):
    """In the vmstate only their saved pages are sent (the rest are the file's); a stream
    ingested as a snapshot keeps that, so its own vmstate is the same stream."""
    from snapfs.fs.loaded import LoadedSnapshot
    from snapfs.fs.views import PROVIDERS
    from snapfs.stream.ingest import ingest_stream
    from snapfs.stream.vmstate import VmstateView

    with Target("coretarget") as t:
        with Store.open(store_dir, create=True) as store:
            await capture_process(t.pid, store, "s1", CaptureOptions())
    with Store.open(store_dir) as store:
        reader = store.open_snapshot("s1")
        assert any(r.meta.get("holes") == "file" for r in reader.regions)
        stream = tmp_path / "vmstate"
        stream.write_bytes(VmstateView(reader).read(0, VmstateView(reader).size))
        with open(stream, "rb") as src:
            ingest_stream(src, store, "s2")
        again = VmstateView(store.open_snapshot("s2"))
        assert again.read(0, again.size) == stream.read_bytes().replace(b'"snapshot": "s1"', b'"snapshot": "s2"')
        # The ingested one has RAMBlocks at no real address and no recorded threads: no core.
        providers = list(enumerate(PROVIDERS))
        assert "core" in LoadedSnapshot(store.open_snapshot("s1"), providers).extra_names().values()
        assert "core" not in LoadedSnapshot(store.open_snapshot("s2"), providers).extra_names().values()


async def test_vdso_is_saved_whole_even_pages_the_target_never_ran(store_dir):
    """A vdso page is mapped on first use: one never run is not present but not zero
    (gdb reads the vdso's symbols from the core and finds a corrupt image otherwise)."""
    import subprocess

    from snapfs.capture import read_memory

    sleeper = subprocess.Popen(["sleep", "60"])  # runs no vdso code
    try:
        while Path(f"/proc/{sleeper.pid}/wchan").read_text() != "hrtimer_nanosleep":
            await trio.sleep(0.01)  # past the dynamic loader, asleep
        vdso = next(v for v in read_maps(sleeper.pid) if v.path == "[vdso]")
        with Store.open(store_dir, create=True) as store:
            await capture_process(sleeper.pid, store, "s", CaptureOptions())
            reader = store.open_snapshot("s")
            r = next(r for r in reader.regions if r.kind == "vdso")
            assert r.data_pages == r.length // 4096
            assert reader.read(r.index, 0, r.length) == read_memory(sleeper.pid, vdso.start, vdso.length)
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_continuous_children_record_it_too(store_dir):
    from snapfs.capture.continuous import capture_next

    with Target("coretarget") as t:
        with Store.open(store_dir, create=True) as store:
            first = await capture_process(t.pid, store, "s0", CaptureOptions(continuous=True))
            try:
                await capture_next(first.tracking, store, "s1")
            finally:
                first.tracking.close()
            reader = store.open_snapshot("s1")
            state = CoreState.from_snapshot(reader.info, reader.blob(BLOB))
            assert state.auxv and state.mappings and len(state.threads) == 5
            assert all(x86_64.NT_X86_XSTATE in th.regsets for th in state.threads)
            assert x86_64.XSAVE_LAYOUT_KEY in state.arch_state
            assert any(r.meta.get("holes") == "file" for r in reader.regions)


def test_vmas_read_only_file_mappings_have_private_pages():
    """The premise: a dynamically linked process has RELRO pages that differ from the file
    (the kernel's PAGEMAP_SCAN reports them as not file pages)."""
    from snapfs.capture.pagemap import PagemapScanner

    with Target("coretarget") as t:
        scanner = PagemapScanner(t.pid)
        try:
            found = 0
            for v in read_maps(t.pid):
                if v.is_file and not v.writable and not v.shared:
                    found += len(scanner.scan(v.start, v.end, require=0,
                                              exclude=k.PAGE_IS_FILE | k.PAGE_IS_PFNZERO,
                                              anyof=k.PAGE_IS_PRESENT))
        finally:
            scanner.close()
        assert found > 0


def test_a_signal_sent_during_the_stop_is_delivered_after_it_never_held():
    """The stop never leaves a thread in the middle of a signal delivery (snapfs would hold
    the signal, lost if it died): queued signals sent while the target is stopped stay
    pending in the kernel and are all delivered at the release; no thread is recorded with
    a siginfo."""
    import signal
    import time

    from snapfs.capture.freeze import stopped
    from tests.support.capture import Target as Checked

    with Checked("regcheck", "spin", "2") as t:
        with stopped(t.pid) as proc:
            for _ in range(10):
                os.kill(t.pid, signal.SIGRTMIN + 1)  # counted by regcheck's handler
            threads = proc.record_threads()
        assert threads and all("siginfo" not in v for v in threads.values())
        time.sleep(0.2)
        assert t.send("s") == "ok s 10"
        assert t.send("c").startswith("ok c")
