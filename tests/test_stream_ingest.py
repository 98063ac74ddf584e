"""`snapfs incoming --name`: streams into the store, duplicates resolved, nothing on errors."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from snapfs.errors import NameInUse, StreamError
from snapfs.store import Store
from snapfs.stream import format as F
from snapfs.stream.ingest import ingest_stream
from snapfs.stream.reader import EV_DEVICES, EV_HEADER, read_stream
from snapfs.stream.spool import PipeCapture
from snapfs.stream.vmstate import VmstateView
from tests.conftest import snapfs_cmd
from tests.test_stream_reader import END, header, page, part, start, zero

PAGE = 4096


def pg(tag: int) -> bytes:
    return bytes([tag]) * PAGE


def precopy_stream(with_devices: bool = True) -> tuple[bytes, dict[str, bytes], bytes]:
    """A precopy-shaped stream: pages re-sent (last wins), ZERO<->DATA flips, COMMAND, END."""
    caps = b"\x05" + F.counted(b"configuration/target-page-bits") + struct.pack(">II", 1, 12)
    blocks = [(b"pc.ram", 4 * PAGE, b""), (b"/rom@etc/acpi/tables", 2 * PAGE, b"")]
    dev = (struct.pack(">BI", F.SEC_FULL, 3) + F.counted(b"timer") + struct.pack(">II", 0, 2)
           + b"\x11" * 9 + F.footer(3) + END) if with_devices else END
    stream = (
        header("pc-i440fx-7.2") + caps
        + F.section_start(2, b"ram", 0, 4) + F.mem_size_list(blocks) + F.EOS_RECORD + F.footer(2)
        + part(page(0, pg(1), b"pc.ram"), page(PAGE, pg(2)), page(2 * PAGE, pg(3)), zero(3 * PAGE),
               page(0, pg(9), b"/rom@etc/acpi/tables"))
        + part(page(PAGE, pg(4), b"pc.ram"), zero(2 * PAGE), page(3 * PAGE, pg(5)))  # re-sent
        + b"\x08" + struct.pack(">HH", 11, 0)
        + struct.pack(">BI", F.SEC_END, 2) + page(0, pg(6)) + F.EOS_RECORD + F.footer(2)
        + dev
    )
    # The END's CONTINUE record means pc.ram: the current block carries across sections.
    expect = {
        "pc.ram": pg(6) + pg(4) + bytes(PAGE) + pg(5),
        "/rom@etc/acpi/tables": pg(9) + bytes(PAGE),
    }
    return stream, expect, dev


def test_precopy_duplicates_last_copy_wins_and_vm_blobs_kept(store_dir):
    stream, expect, dev = precopy_stream()
    with Store.open(store_dir, create=True) as store:
        info = ingest_stream(io.BytesIO(stream), store, "vm1")
        assert info.kind == "vm" and info.region_count == 2
        stats = info.meta["qemu_stream"]
        assert stats["duplicate_records"] == 4 and stats["machine"] == "pc-i440fx-7.2"
        reader = store.open_snapshot("vm1")
        assert [(r.name, r.kind) for r in reader.regions] == [("pc.ram", "ramblock"), ("/rom@etc/acpi/tables", "ramblock")]
        for r in reader.regions:
            assert reader.read(r.index, 0, r.length) == expect[r.name]
        # Page 1 of the ROM was never sent: a hole; pages sent as ZERO are zero pages.
        assert list(reader.runs(1)) == [(0, 1, 2), (1, 1, 0)]

        # The vmstate view re-emits QEMU's configuration and device state verbatim.
        view = VmstateView(reader)
        out = view.read(0, view.size)
        events = list(read_stream(io.BytesIO(out)))
        assert events[0][0] == EV_HEADER and events[0][1].raw == stream[8 : stream.index(b"\x01\x00\x00\x00\x02\x03ram")]
        assert events[-1] == (EV_DEVICES, dev)
        again = store.open_snapshot("vm1")
        assert VmstateView(again).read(0, view.size) == out


def _resend_stream() -> tuple[bytes, bytes]:
    """1200 pages sent in order (zero records among pages 768-1023), then pages 10-19 sent
    again ~5 MB later, then 40000 zero pages (a 128 MiB chunk with no data at all): every
    way the spool finds a page in the stream's own file."""
    n = 1200
    img = bytearray(n * PAGE)
    recs = [page(0, pg(1), b"pc.ram")]
    img[0:PAGE] = pg(1)
    for p in range(1, n):
        if 768 <= p < 1024 and p % 3 == 0:
            recs.append(zero(p * PAGE))
        else:
            data = bytes([p % 251 + 1]) * 100 + bytes(range(256)) * 15 + bytes(156)
            recs.append(page(p * PAGE, data))
            img[p * PAGE:(p + 1) * PAGE] = data
    again = [page(p * PAGE, pg(200 + p)) for p in range(10, 20)]
    for p in range(10, 20):
        img[p * PAGE:(p + 1) * PAGE] = pg(200 + p)
    zeros = [zero(p * PAGE) for p in range(n, n + 40000)]
    img += bytes(40000 * PAGE)
    stream = (header() + start(((b"pc.ram", (n + 40000) * PAGE),)) + part(*recs) + part(*again)
              + part(*zeros) + END)
    return stream, bytes(img)


@pytest.mark.parametrize("kind", ["memory", "file", "pipe"])
def test_pages_read_back_from_where_the_stream_holds_them(store_dir, tmp_path, kind):
    """From a file or a pipe's capture, pages are referenced in the stream, not copied: the
    image is the same as from an in-memory stream, resent pages included."""
    stream, img = _resend_stream()
    with Store.open(store_dir, create=True) as store:
        if kind == "memory":
            info = ingest_stream(io.BytesIO(stream), store, "s")
        elif kind == "file":
            path = tmp_path / "stream.bin"
            path.write_bytes(b"junk" + stream)
            with open(path, "rb") as f:
                assert f.read(4) == b"junk"  # the stream starts further in: offsets follow
                info = ingest_stream(f, store, "s")
        else:
            r, w = os.pipe()
            feeder = threading.Thread(target=lambda: (os.write(w, stream), os.close(w)))
            feeder.start()
            try:
                info = ingest_stream(PipeCapture(r, tmp_path), store, "s")
            finally:
                feeder.join()
                os.close(r)
        assert info.meta["qemu_stream"]["duplicate_records"] == 10
        reader = store.open_snapshot("s")
        assert reader.read(0, 0, len(img)) == img


def test_ram_only_stream_becomes_process_kind(store_dir):
    stream, expect, _ = precopy_stream(with_devices=False)
    with Store.open(store_dir, create=True) as store:
        info = ingest_stream(io.BytesIO(stream), store, "r1")
        assert info.kind == "process"
        reader = store.open_snapshot("r1")
        assert reader.read(0, 0, 4 * PAGE) == expect["pc.ram"]


@pytest.mark.parametrize("cut", [10, 200, 5000, 20000, -3])
def test_bad_stream_publishes_nothing(store_dir, cut):
    stream, _, _ = precopy_stream()
    with Store.open(store_dir, create=True) as store:
        with pytest.raises(StreamError):
            ingest_stream(io.BytesIO(stream[:cut]), store, "bad")
        assert store.list_snapshots() == []
        # The name is free again, and a good stream under it works.
        ingest_stream(io.BytesIO(stream), store, "bad")
        assert [s.name for s in store.list_snapshots()] == ["bad"]
        with pytest.raises(NameInUse):
            ingest_stream(io.BytesIO(stream), store, "bad")


def test_cli_incoming_name_and_errors(store_dir, snapfs_env):
    stream, expect, _ = precopy_stream()
    ok = subprocess.run([*snapfs_cmd(), "incoming", "--name", "c1", "--json"], input=stream,
                        env=snapfs_env, capture_output=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == "c1"
    bad = subprocess.run([*snapfs_cmd(), "incoming", "--name", "c2"], input=stream[:-40] + b"garbage",
                         env=snapfs_env, capture_output=True)
    assert bad.returncode == 9
    err = bad.stderr.decode()
    assert err.startswith("snapfs: ") and err.count("\n") == 1 and "byte" in err
    listing = subprocess.run([*snapfs_cmd(), "list", "--json"], env=snapfs_env, capture_output=True)
    assert "c2" not in listing.stdout.decode()
    cat = subprocess.run([*snapfs_cmd(), "cat", "c1", "vmstate"], env=snapfs_env, capture_output=True)
    assert cat.returncode == 0
    ram = [e for e in read_stream(io.BytesIO(cat.stdout)) if e[0] == "page" and e[1] == 0]
    assert b"".join(e[3] for e in sorted(ram, key=lambda e: e[2])) == b"".join(
        expect["pc.ram"][i * PAGE : (i + 1) * PAGE] for i in (0, 1, 3))


# --- The pipe is drained by a separate process: a writer (QEMU) never waits for ingest. ---

def big_stream(pages: int, seed: int = 5) -> tuple[bytes, bytes]:
    """A RAM-only stream of one block of ``pages`` random data pages; (stream, the block's bytes)."""
    ram = np.random.default_rng(seed).integers(0, 256, pages * PAGE, dtype=np.uint8).tobytes()
    records = [page(0, ram[:PAGE], b"pc.ram")]
    records += [page(i * PAGE, ram[i * PAGE : (i + 1) * PAGE]) for i in range(1, pages)]
    return header() + start(blocks=((b"pc.ram", pages * PAGE),)) + part(*records) + END, ram


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd`` and close it (runs in a thread: the part that must never block)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]
    finally:
        os.close(fd)


def test_cli_incoming_accepts_the_whole_stream_while_stopped(store_dir, snapfs_env):
    """`snapfs incoming --name` stopped (SIGSTOP) once its drainer runs: a stream 3x the pipe's
    capacity is still accepted in full (nothing waits for parsing); resumed, it publishes it."""
    stream, ram = big_stream(12288)  # 48 MiB; the pipe holds 16 MiB
    r, w = os.pipe()
    proc = subprocess.Popen([*snapfs_cmd(), "incoming", "--name", "s1", "--json"], env=snapfs_env,
                            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(r)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 30
        while not children.read_text().split():
            assert time.monotonic() < deadline, "no drainer process appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)
        writer = threading.Thread(target=write_all, args=(w, stream))
        writer.start()
        writer.join(30)
        assert not writer.is_alive(), "the writer blocked while snapfs incoming was stopped"
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["name"] == "s1"
    with Store.open(store_dir) as store:
        reader = store.open_snapshot("s1")
        assert reader.read(0, 0, len(ram)) == ram


def test_ingest_parses_at_idle_priority_while_the_writer_sends(store_dir):
    """While the stream is still arriving the parsing thread runs SCHED_IDLE; afterwards its
    policy is back to normal, and the snapshot is exact."""
    stream, ram = big_stream(512)
    r, w = os.pipe()
    policies: list[int] = []
    parsing = threading.Event()

    def progress(_: int) -> None:
        policies.append(os.sched_getscheduler(0))
        parsing.set()

    def writer() -> None:
        half = len(stream) // 2
        os.write(w, stream[:half])
        parsing.wait(30)  # the rest only once parsing has begun: part of it surely overlaps
        time.sleep(0.05)
        write_all(w, stream[half:])

    t = threading.Thread(target=writer)
    t.start()
    with open(r, "rb", buffering=0) as src, Store.open(store_dir, create=True) as store:
        info = ingest_stream(src, store, "idle", progress=progress)
        t.join()
        assert policies[0] == os.SCHED_IDLE
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        assert info.resident_bytes == len(ram)
        assert store.open_snapshot("idle").read(0, 0, len(ram)) == ram


_SPARSE_INGEST = """
import sys
from snapfs.store import Store
from snapfs.stream.ingest import ingest_stream

def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) << 10

before = hwm()
with Store.open(sys.argv[2], create=True) as store, open(sys.argv[1], "rb") as src:
    info = ingest_stream(src, store, "sparse")
print(info.resident_bytes, hwm() - before)
"""


def test_memory_follows_what_the_stream_carries_not_what_it_claims(tmp_path, snapfs_env):
    """An 8 MiB stream claiming a 1 TiB block (one data page per 512 MiB): the ingest's
    memory grows by about 100 MiB (zstd contexts, the commit's buffers), not by GiB
    (per-128 MiB spool arrays and 8 MiB store hash chunks per page touched: 2 GiB)."""
    pages = 2048
    stride = (1 << 40) // pages
    records = [page(0, pg(1), b"big")] + [page(i * stride, pg(i % 251)) for i in range(1, pages)]
    stream = tmp_path / "sparse.mig"
    stream.write_bytes(header() + start(blocks=((b"big", 1 << 40),)) + part(*records) + END)
    out = subprocess.run([sys.executable, "-c", _SPARSE_INGEST, str(stream), str(tmp_path / "store")],
                         env=snapfs_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    resident, grown = map(int, out.stdout.split())
    assert resident == pages * PAGE
    assert grown < 192 << 20, f"ingest grew by {grown >> 20} MiB"


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_parsing_returns_to_normal_priority_once_the_writer_is_done(store_dir, tmp_path):
    """Once the writer has closed the pipe (QEMU is done), the parser leaves SCHED_IDLE at
    once, not only when it reaches the end: on a busy machine that end can be many seconds
    of idle-priority parsing away."""
    stream, ram = big_stream(4096)  # 16 MiB: many reads after the writer is done
    r, w = os.pipe()
    capture = PipeCapture(r, tmp_path)
    os.close(r)
    policies: list[tuple[int, int]] = []
    first = 1 << 20
    os.write(w, stream[:first])
    writer = threading.Thread(target=write_all, args=(w, stream[first:]))

    def progress(count: int) -> None:
        policies.append((count, os.sched_getscheduler(0)))
        if len(policies) == 1:  # the first read: let the writer finish and the drainer exit
            writer.start()
            writer.join(30)
            deadline = time.monotonic() + 30
            while capture.pid is not None and _state(capture.pid) != "Z":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.2)  # the watcher thread's turn

    with Store.open(store_dir, create=True) as store:
        info = ingest_stream(capture, store, "prio", progress=progress)
        assert store.open_snapshot("prio").read(0, 0, len(ram)) == ram
    assert info.resident_bytes == len(ram)
    assert policies[0][1] == os.SCHED_IDLE
    later = [policy for count, policy in policies[1:] if count < len(stream)]
    assert later and all(p == os.SCHED_OTHER for p in later), policies


def test_capture_close_drains_the_rest_and_reaps_the_drainer(tmp_path):
    """A reader that gives up early (bad stream, Ctrl-C) still lets the writer finish."""
    r, w = os.pipe()
    data = bytes(range(256)) * (40 << 12)  # 40 MiB
    t = threading.Thread(target=write_all, args=(w, data))
    t.start()
    capture = PipeCapture(r, tmp_path)
    buf = bytearray(1 << 20)
    got = capture.readinto(buf)
    assert 0 < got and buf[:got] == data[:got]
    pid = capture.pid
    capture.close()
    t.join(30)
    assert not t.is_alive()
    assert capture.pid is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    os.close(r)


def test_capture_out_of_space_is_one_error_and_the_writer_still_finishes(tmp_path):
    """The spool's filesystem fills up: reading says so (naming the directory); the writer is
    drained to its end all the same (QEMU < 8.1 must not see its stream fail)."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        r, w = os.pipe()
        t = threading.Thread(target=write_all, args=(w, b"\x01" * (24 << 20)))
        t.start()
        capture = PipeCapture(r, small)
        buf = bytearray(1 << 20)
        with pytest.raises(StreamError, match=f"{small}.*No space left on device"):
            while capture.readinto(buf):
                pass
        t.join(30)
        assert not t.is_alive()
        capture.close()
        os.close(r)
    finally:
        subprocess.run(["umount", str(small)], check=True)
