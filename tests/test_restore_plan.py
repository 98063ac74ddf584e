"""The pure parts of a restore: the layout plan, the kernel-state comparison and its
before/after bracket, the --hang-up plan, the stream's process description."""

from __future__ import annotations

import json
import os

import pytest

from snapfs.capture import fdtable, procstate
from snapfs.capture.layout import Mapping, plan
from snapfs.errors import StreamError
from snapfs.stream import procdesc

ANON = dict(offset=0, dev="0:0", inode=0)


def m(start, end, perms="rw-p", path="", **kw):
    return Mapping(start, end, perms, **{**ANON, **kw}, path=path)


def test_same_layout_split_or_merged_differently_needs_nothing():
    snap = [m(0x1000, 0x3000), m(0x3000, 0x5000)]
    now = [m(0x1000, 0x5000)]
    assert plan(snap, now).ops == [] and plan(snap, now).problems == []


def test_heap_end_moves_with_brk_and_mappings_come_and_go():
    snap = [m(0x10000, 0x20000, path="[heap]"), m(0x7000000, 0x7001000)]
    now = [m(0x10000, 0x50000, path="[heap]"), m(0x7002000, 0x7004000)]
    p = plan(snap, now)
    assert p.problems == []
    assert [(o.name, o.start, o.length) for o in p.ops] == [
        ("munmap", 0x7002000, 0x2000), ("brk", 0x20000, 0), ("mmap", 0x7000000, 0x1000)]


def test_permissions_only_is_mprotect_and_stack_growth_is_left():
    snap = [m(0x1000, 0x2000, "r--p"), m(0x9000, 0xA000, path="[stack]")]
    now = [m(0x1000, 0x2000, "rw-p"), m(0x8000, 0xA000, path="[stack]")]
    p = plan(snap, now)
    assert [(o.name, o.perms) for o in p.ops] == [("mprotect", "r--p")] and p.problems == []


def test_what_cannot_be_recreated_is_refused():
    snap = [m(0x1000, 0x2000, "rw-s", path="/memfd:x (deleted)", dev="0:1", inode=5),
            m(0x3000, 0x4000, "r--p", path="/nonexistent/lib.so", dev="8:1", inode=77),
            m(0x5000, 0x6000, "r-xp", path="[vdso]")]
    now = [m(0x5000, 0x6000, "r-xp", path="[vdso]")]
    problems = plan(snap, now).problems
    assert any("shared memory /memfd:x" in x for x in problems)
    assert any("/nonexistent/lib.so" in x and "cannot be opened" in x for x in problems)
    assert not any("vdso" in x for x in problems)
    assert any("[vdso] moved" in x for x in plan(snap, [m(0x7000, 0x8000, "r-xp", path="[vdso]")]).problems)


def test_a_file_is_mapped_again_only_if_it_is_the_same_file(tmp_path):
    f = tmp_path / "lib.so"
    f.write_bytes(b"x" * 8192)
    st = os.stat(f)
    dev = f"{os.major(st.st_dev):x}:{os.minor(st.st_dev):x}"
    snap = [m(0x10000, 0x12000, "r--p", path=str(f), dev=dev, inode=st.st_ino, offset=0x1000)]
    p = plan(snap, [])
    assert [(o.name, o.path, o.offset) for o in p.ops] == [("mmap", str(f), 0x1000)]
    other = [m(0x10000, 0x12000, "r--p", path=str(f), dev=dev, inode=st.st_ino + 1)]
    assert "another file now" in plan(other, []).problems[0]


def fd(target, typ, flags=2, ino=1, epoll=None):
    e = {"target": target, "type": typ, "flags": flags, "ino": ino}
    if epoll is not None:
        e["epoll"] = epoll
    return e


def state(fds, **kw):
    return {"boot_id": "b", "start_time": 1, "exe": "/x", "cwd": "/", "signals": {"ignored": 0, "caught": 0},
            "fds": fds, **kw}


def test_bracket_keeps_what_both_reads_agree_on():
    before = state({"3": fd("socket:[1]", "socket"), "4": fd("pipe:[2]", "pipe"), "5": fd("/log", "file")})
    after = state({"3": fd("socket:[1]", "socket"), "4": fd("pipe:[9]", "pipe"),
                   "5": dict(fd("/log", "file"), pos=100)})
    rec = procstate.bracket(before, after)
    assert set(rec["fds"]) == {"3", "5"} and set(rec["fds_uncertain"]) == {"4"}
    diffs = procstate.differences(rec, after)
    assert len(diffs) == 1 and "fd 4 changed while the snapshot was taken" in diffs[0]


def test_differences_name_fds_epoll_signals_identity():
    rec = state({"3": fd("socket:[1]", "socket"), "5": fd("anon_inode:[eventpoll]", "anon:eventpoll",
                                                       epoll=[[3, 0x19, "3", 1, 8]])})
    now = state({"5": fd("anon_inode:[eventpoll]", "anon:eventpoll", epoll=[]), "6": fd("/tmp/f", "file")},
                start_time=2, signals={"ignored": 0, "caught": 1 << 9})
    d = procstate.differences(rec, now)
    text = "\n".join(d)
    assert "not the process the snapshot was taken of" in text
    assert "signals handled differ: SIGUSR1" in text
    assert "fd 3 (socket:[1]) was open at the snapshot and is closed now" in text
    assert "fd 6 (/tmp/f) was opened since the snapshot" in text
    assert "epoll fd 5: fd 3 registered at the snapshot (events 0x19), not now" in text


def test_hang_up_plan_recreates_closed_sockets_and_closes_new_ones():
    ep = "anon_inode:[eventpoll]"
    rec = state({"3": fd("socket:[1]", "socket", flags=0o4002),
                 "5": fd(ep, "anon:eventpoll", epoll=[[3, 0x19, "7f", 1, 8]]),
                 "7": fd("pipe:[4]", "pipe")})
    now = state({"5": fd(ep, "anon:eventpoll", epoll=[]), "8": fd("socket:[3]", "socket")})
    h = fdtable.plan(rec, now["fds"], hang_up=True)
    assert h.recreate == [(3, 0o4002)] and h.close == [8] and h.epoll == [(fdtable.EPOLL_CTL_ADD, 5, 3, 0x19, 0x7F)]
    left = procstate.differences(rec, dict(now, fds=h.applied_to(rec, now["fds"])))
    assert left == ["fd 7 (pipe:[4]) was open at the snapshot and is closed now"]  # not a socket
    # Without --hang-up nothing is re-created, and the closed socket is a difference.
    plain = fdtable.plan(rec, now["fds"])
    assert not plain.recreate and not plain.close and not plain.epoll
    assert len(procstate.differences(rec, dict(now, fds=plain.applied_to(rec, now["fds"])))) == 4


def test_epoll_registrations_of_the_same_files_are_rewound():
    ep = "anon_inode:[eventpoll]"
    rec = state({"4": fd("socket:[1]", "socket", ino=1), "6": fd("socket:[2]", "socket", ino=2),
                 "5": fd(ep, "anon:eventpoll", ino=9, epoll=[[4, 0x19, "4", 1, 8]])})
    now = state({"4": fd("socket:[1]", "socket", ino=1), "6": fd("socket:[2]", "socket", ino=2),
                 "5": fd(ep, "anon:eventpoll", ino=9, epoll=[[4, 0x1d, "4", 1, 8], [6, 0x1, "6", 2, 8]])})
    h = fdtable.plan(rec, now["fds"])
    assert h.epoll == [(fdtable.EPOLL_CTL_MOD, 5, 4, 0x19, 4), (fdtable.EPOLL_CTL_DEL, 5, 6, 0, 0)]
    assert procstate.differences(rec, dict(now, fds=h.applied_to(rec, now["fds"]))) == []


def test_process_description_round_trip_and_validation():
    desc = {"format": 1, "snapshot": "s", "process": {"pid": 1},
            "regions": [{"block": "heap", "start": 4096, "length": 8192, "perms": "rw-p", "offset": 0,
                         "path": "[heap]", "kind": "heap", "holes": [[0, 1]]}],
            "state": {"kernel": {"fds": {}}, "maps": [[4096, 12288, "rw-p", 0, "0:0", 0, "[heap]"]],
                      "threads": [{"tid": 7, "regs": {"rip": 1}, "xstate": "AAAA", "sigmask": 0}]}}
    image = procdesc.parse(json.dumps({"page_size": 4096, "snapfs": desc}).encode())
    assert image.has_state and image.regions[0].end == 12288 and image.threads[0].xstate == b"\0\0\0"
    assert procdesc.parse(b'{"page_size": 4096, "devices": []}') is None  # a QEMU stream
    desc["state"]["threads"][0]["regs"]["rip"] = -1
    with pytest.raises(StreamError, match="register rip"):
        procdesc.parse(json.dumps({"snapfs": desc}).encode())
