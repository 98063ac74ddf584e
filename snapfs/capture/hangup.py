"""``incoming --pid --hang-up``: make the fd table agree with a restored server's memory where
its connections came and went since the snapshot.

A server restored after its clients left believes their sockets are still open (and
registered in its epoll); one restored after new clients arrived does not know theirs. A
socket connection cannot be rewound, but both can be told the truth of a rewind — the
connection ended:

- a socket open at the snapshot and closed (or replaced by another socket) now is
  re-created at the same fd number as one end of a fresh socket pair whose other end is
  closed at once (reads return end-of-file, epoll reports EPOLLIN|EPOLLHUP|EPOLLRDHUP), with
  its file status flags and its epoll registrations as recorded: the server sees the peer
  hang up and closes it itself;
- a socket opened since the snapshot (the restored memory never heard of it) is closed:
  its peer sees the server hang up.

Only sockets, only where the snapshot's record is certain, only in epoll instances that are
the same now. Everything runs in the parked target through the syscall injector.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from snapfs.capture.procstate import same_fd

EPOLL_CTL_ADD = 1
_STATUS_FLAGS = os.O_NONBLOCK | os.O_APPEND  # what F_SETFL can set back on a socket
_F_SETFD, _F_SETFL = 2, 4


@dataclass
class HangUp:
    """The fd changes: sockets to re-create hung up, sockets to close, epoll adds."""

    recreate: list[tuple[int, int]] = field(default_factory=list)  # (fd, recorded flags)
    close: list[int] = field(default_factory=list)
    epoll: list[tuple[int, int, int, int]] = field(default_factory=list)  # (epfd, fd, events, data)

    @property
    def fds(self) -> set[str]:
        """The fds this settles (their differences are resolved)."""
        return {str(fd) for fd, _ in self.recreate} | {str(fd) for fd in self.close}

    def describe(self) -> list[str]:
        return ([f"fd {fd}: re-created as a socket whose peer hung up" for fd, _ in self.recreate]
                + [f"fd {fd}: closed (a connection the snapshot never had)" for fd in self.close])


def plan(recorded: dict[str, Any], current: dict[str, dict]) -> HangUp:
    """What makes the sockets of ``current`` (an fd table) agree with ``recorded`` (the
    snapshot's :mod:`procstate` record)."""
    then, uncertain = recorded.get("fds", {}), recorded.get("fds_uncertain", {})
    out = HangUp()
    for fd in sorted(set(then) | set(current), key=int):
        old, cur = then.get(fd), current.get(fd)
        if fd in uncertain or same_fd(old, cur):
            continue
        old_sock = old is not None and old["type"] == "socket"
        cur_sock = cur is not None and cur["type"] == "socket"
        if old_sock and (cur is None or cur_sock):
            out.recreate.append((int(fd), int(old.get("flags", 0))))
        elif old is None and cur_sock:
            out.close.append(int(fd))
    redo = {fd for fd, _ in out.recreate}
    for fd, old in then.items():
        if old.get("epoll") and _same_epoll(old, current.get(fd)):
            for tfd, events, data, _ino, _dev in old["epoll"]:
                if tfd in redo:
                    out.epoll.append((int(fd), tfd, events, int(data, 16)))
    return out


def _same_epoll(old: dict, cur: dict | None) -> bool:
    return cur is not None and (old["target"], old.get("ino")) == (cur["target"], cur.get("ino"))


def apply(h: HangUp, inject, read_memory, write_memory, pid: int) -> None:
    """Run the changes in the stopped target (``inject``: the syscall injector)."""
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
    for epfd, fd, events, data in h.epoll:
        write_memory(pid, scratch, struct.pack("<IQ", events, data))  # packed struct epoll_event
        _check(inject("epoll_ctl", epfd, EPOLL_CTL_ADD, fd, scratch), f"epoll_ctl(ADD {fd})", pid)


class HangUpError(Exception):
    """An injected fd change failed (the process stays parked)."""


def _check(r: int, what: str, pid: int) -> int:
    if r < 0:
        raise HangUpError(f"{what} failed in process {pid}: {os.strerror(-r)}")
    return r
