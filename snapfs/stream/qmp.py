"""A small asynchronous QMP client (trio) over a unix socket, with fd passing for ``getfd``.

One task at a time talks to QEMU (a lock serialises commands). Events that arrive while
waiting for a reply are kept (bounded) and can be awaited with :meth:`QmpClient.wait_event`.
QMP errors raise :class:`~snapfs.errors.QemuError` carrying QEMU's description.
"""

from __future__ import annotations

import array
import collections
import json
import socket
from typing import Any

import trio

from snapfs.errors import QemuError

_MAX_LINE = 16 << 20
_MAX_EVENTS = 1024
GREETING_TIMEOUT = 10.0


class QmpClient:
    """A negotiated QMP connection; use ``async with await QmpClient.connect(path) as qmp``."""

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self._sock = sock
        self._path = path
        self._buf = bytearray()
        self._lock = trio.Lock()
        self.events: collections.deque[dict] = collections.deque(maxlen=_MAX_EVENTS)
        self.greeting: dict = {}

    @classmethod
    async def connect(cls, path: str) -> "QmpClient":
        """Connect to QEMU's QMP socket ``path`` and leave capabilities negotiation mode.

        QemuError if nothing listens there or the peer does not speak QMP.
        """
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise QemuError(
                f"cannot connect to the QMP socket {path}: {exc.strerror or exc}; start QEMU with "
                f"-qmp unix:{path},server=on,wait=off"
            ) from None
        qmp = cls(sock, str(path))
        try:
            with trio.move_on_after(GREETING_TIMEOUT) as scope:
                greeting = await qmp._read_message()
            if scope.cancelled_caught:
                raise QemuError(
                    f"QEMU did not greet on {path} within {GREETING_TIMEOUT:.0f} s: another client is "
                    "probably connected (a QMP socket serves one client at a time); disconnect it"
                )
            if "QMP" not in greeting:
                raise QemuError(f"{path} is not a QMP socket (greeting {str(greeting)[:80]})")
            qmp.greeting = greeting["QMP"]
            await qmp.execute("qmp_capabilities")
        except BaseException:
            sock.close()
            raise
        return qmp

    async def __aenter__(self) -> "QmpClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    @property
    def version(self) -> tuple[int, int, int]:
        """QEMU's (major, minor, micro) from the greeting."""
        q = self.greeting.get("version", {}).get("qemu", {})
        return (int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)))

    async def _read_message(self) -> dict:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if not line.strip():
                    continue
                try:
                    return json.loads(line)
                except ValueError:
                    raise QemuError(f"QMP socket {self._path}: malformed message {line[:80]!r}") from None
            if len(self._buf) > _MAX_LINE:
                raise QemuError(f"QMP socket {self._path}: message longer than {_MAX_LINE} bytes")
            data = await self._sock.recv(65536)
            if not data:
                raise QemuError(f"QEMU closed the QMP connection {self._path} (did it exit?)")
            self._buf += data

    async def execute(self, command: str, arguments: dict | None = None, fds: tuple[int, ...] = ()) -> Any:
        """Run a QMP command and return its ``return`` value; ``fds`` go along via SCM_RIGHTS."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        async with self._lock:
            view = memoryview(data)
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                view = view[await self._sock.sendmsg([view], anc) :]
            while view:
                view = view[await self._sock.send(view) :]
            while True:
                reply = await self._read_message()
                if "event" in reply:
                    self.events.append(reply)
                    continue
                if "error" in reply:
                    err = reply["error"]
                    raise QemuError(f"QEMU refused {command}: {err.get('desc', err)}")
                if "return" in reply:
                    return reply["return"]

    async def wait_event(self, name: str, predicate=None) -> dict:
        """The first (kept or future) event called ``name`` matching ``predicate(data)``."""
        while True:
            for ev in list(self.events):
                if ev.get("event") == name and (predicate is None or predicate(ev.get("data", {}))):
                    self.events.remove(ev)
                    return ev
            async with self._lock:
                msg = await self._read_message()
                if "event" in msg:
                    self.events.append(msg)
