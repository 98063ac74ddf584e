"""The fd-table changes a restore makes so the kernel agrees with the restored memory.

**Epoll registrations are rewound** (always): where an epoll instance is the same one as at
the snapshot and a watched fd is the same open file, its registration is put back as
recorded (``epoll_ctl`` ADD, MOD or DEL): an event loop restored to the snapshot believes
exactly those registrations.

**Connections that came and went** (``incoming --pid --hang-up``): a server restored after
its clients left believes their sockets are still open; one restored after new clients
arrived does not know theirs. A connection cannot be rewound, but both sides can be told
the truth of a rewind, that it ended:

- a socket open at the snapshot and closed (or replaced by another socket) now is re-created
  at the same fd number as one end of a fresh socket pair whose other end is closed at once
  (reads return end-of-file, epoll reports EPOLLIN|EPOLLHUP|EPOLLRDHUP), with its fd and
  file status flags and its epoll registrations as recorded: the server sees the peer hang
  up and closes it itself;
- a socket opened since the snapshot (the restored memory never heard of it) is closed: its
  peer sees the server hang up.

Only where the snapshot's record is certain. :func:`plan` decides; :meth:`FdChanges.applied_to`
says what the fd table will look like after them, which is what the restore compares with
the snapshot. Everything runs in the parked target through the syscall injector.
"""

from __future__ import annotations

import copy
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from snapfs.capture.procstate import same_fd

EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD = 1, 2, 3
_EPOLLEXCLUSIVE = 1 << 28  # cannot be modified: such a registration is left to the check
_STATUS_FLAGS = os.O_NONBLOCK | os.O_APPEND  # what F_SETFL can set back on a socket
_F_SETFD, _F_SETFL = 2, 4
_OPS = {EPOLL_CTL_ADD: "re-registered", EPOLL_CTL_DEL: "unregistered", EPOLL_CTL_MOD: "registration put back"}


@dataclass
class FdChanges:
    """Sockets to re-create hung up, sockets to close, epoll registrations to rewind."""

    recreate: list[tuple[int, int]] = field(default_factory=list)  # (fd, recorded flags)
    close: list[int] = field(default_factory=list)
    epoll: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # (op, epfd, fd, events, data)

    def __bool__(self) -> bool:
        return bool(self.recreate or self.close or self.epoll)

    def describe(self) -> list[str]:
        return ([f"fd {fd}: re-created as a socket whose peer hung up" for fd, _ in self.recreate]
                + [f"fd {fd}: closed (a connection the snapshot never had)" for fd in self.close]
                + [f"epoll fd {ep}: fd {fd} {_OPS[op]} (events 0x{ev:x})" for op, ep, fd, ev, _ in self.epoll])

    def applied_to(self, recorded: dict[str, Any], current: dict[str, dict]) -> dict[str, dict]:
        """The fd table ``current`` as it will be once these changes ran."""
        out = copy.deepcopy(current)
        for fd in self.close:
            out.pop(str(fd), None)
        for fd, _ in self.recreate:
            out[str(fd)] = copy.deepcopy(recorded["fds"][str(fd)])
        for op, epfd, fd, _events, _data in self.epoll:
            regs = {e[0]: e for e in out[str(epfd)].get("epoll", [])}
            if op == EPOLL_CTL_DEL:
                regs.pop(fd, None)
            else:
                regs[fd] = next(e for e in recorded["fds"][str(epfd)]["epoll"] if e[0] == fd)
            out[str(epfd)]["epoll"] = sorted(regs.values())
        for entry in out.values():  # closing a file drops its registrations
            if "epoll" in entry:
                entry["epoll"] = [e for e in entry["epoll"] if str(e[0]) in out]
        return out


def plan(recorded: dict[str, Any], current: dict[str, dict], hang_up: bool = False) -> FdChanges:
    """The changes that make ``current`` (an fd table, :func:`procstate.read_fds`) agree with
    ``recorded`` (the snapshot's :mod:`procstate` record) as far as they can."""
    then, uncertain = recorded.get("fds", {}), recorded.get("fds_uncertain", {})
    out = FdChanges()
    for fd in sorted(set(then) | set(current), key=int) if hang_up else ():
        old, cur = then.get(fd), current.get(fd)
        if fd in uncertain or same_fd(old, cur):
            continue
        old_sock = old is not None and old["type"] == "socket"
        cur_sock = cur is not None and cur["type"] == "socket"
        if old_sock and (cur is None or cur_sock):
            out.recreate.append((int(fd), int(old.get("flags", 0))))
        elif old is None and cur_sock:
            out.close.append(int(fd))
    redo = {str(fd) for fd, _ in out.recreate}
    gone = redo | {str(fd) for fd in out.close}
    for epfd, old in then.items():
        cur = current.get(epfd)
        if "epoll" not in old or epfd in uncertain or not _same_file(old, cur):
            continue
        a = {str(e[0]): e for e in old["epoll"]}
        b = {str(e[0]): e for e in cur.get("epoll", [])}
        for tfd in sorted(set(a) | set(b), key=int):
            x, y = a.get(tfd), b.get(tfd)
            if x == y or (x and x[1] & _EPOLLEXCLUSIVE) or (y and y[1] & _EPOLLEXCLUSIVE):
                continue
            same_file = tfd not in gone and tfd not in uncertain and _same_file(then.get(tfd), current.get(tfd))
            if x is not None and tfd in redo:
                out.epoll.append((EPOLL_CTL_ADD, int(epfd), int(tfd), x[1], int(x[2], 16)))
            elif same_file and x is not None:
                op = EPOLL_CTL_MOD if y is not None else EPOLL_CTL_ADD
                out.epoll.append((op, int(epfd), int(tfd), x[1], int(x[2], 16)))
            elif same_file and y is not None:
                out.epoll.append((EPOLL_CTL_DEL, int(epfd), int(tfd), 0, 0))
    return out


def _same_file(a: dict | None, b: dict | None) -> bool:
    """The same open file (an fd's flags or position may differ)."""
    return a is not None and b is not None and (a["target"], a.get("ino")) == (b["target"], b.get("ino"))


def apply(h: FdChanges, inject, read_memory, write_memory, pid: int) -> None:
    """Run the changes in the stopped target (``inject``: the syscall injector)."""
    if not h:
        return
    scratch = inject.scratch_address(64)
    for fd in h.close:
        _check(inject("close", fd), f"close({fd})", pid)
    for fd, flags in h.recreate:
        _check(inject("socketpair", socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC, 0, scratch),
               "socketpair", pid)
        a, b = struct.unpack("<ii", read_memory(pid, scratch, 8))
        if fd not in (a, b):  # either end will do: the other one is closed
            try:
                _check(inject("dup3", a, fd, 0), f"dup3 to fd {fd}", pid)
            finally:
                inject("close", a)
        inject("close", b if b != fd else a)
        _check(inject("fcntl", fd, _F_SETFD, 1 if flags & os.O_CLOEXEC else 0), f"fcntl({fd})", pid)
        _check(inject("fcntl", fd, _F_SETFL, flags & _STATUS_FLAGS), f"fcntl({fd})", pid)
    for op, epfd, fd, events, data in h.epoll:
        write_memory(pid, scratch, struct.pack("<IQ", events, data))  # packed struct epoll_event
        _check(inject("epoll_ctl", epfd, op, fd, scratch), f"epoll_ctl({_OPS[op]} fd {fd})", pid)


class FdChangeError(Exception):
    """An injected fd change failed (the process stays parked)."""


def _check(r: int, what: str, pid: int) -> int:
    if r < 0:
        raise FdChangeError(f"{what} failed in process {pid}: {os.strerror(-r)}")
    return r
