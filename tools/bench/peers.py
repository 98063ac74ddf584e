"""Peer tools the bench compares with: found, installed by the bench's setup, or reported missing.

Never silently skipped: every peer ends up in the report as ok/installed (with its version) or
missing (with the reason).
"""

from __future__ import annotations

import os
import shutil
import subprocess

# peer -> (executable, Debian package)
PEERS = {"gcore": ("gcore", "gdb"), "qemu": ("qemu-system-x86_64", "qemu-system-x86")}


def _version(cmd: str) -> str:
    flag = "--version"
    exe = "gdb" if cmd == "gcore" else cmd
    try:
        out = subprocess.run([exe, flag], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def _apt_install(package: str) -> str | None:
    """Install a Debian package; None on success, else why it failed."""
    if os.geteuid() != 0:
        return f"not installed, and installing {package} needs root (apt-get install {package})"
    if not shutil.which("apt-get"):
        return f"not installed and no apt-get to install {package}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return f"apt-get install {package} failed: {tail[0]}"
    return None


def ensure(install: bool = True) -> dict[str, dict]:
    """Status of each peer: {"status": ok|installed|missing, "version"|"reason": ...}."""
    status: dict[str, dict] = {}
    for peer, (cmd, package) in PEERS.items():
        if shutil.which(cmd):
            status[peer] = {"status": "ok", "version": _version(cmd)}
            continue
        reason = _apt_install(package) if install else f"{cmd} not found (Debian package {package})"
        if reason is None and shutil.which(cmd):
            status[peer] = {"status": "installed", "version": _version(cmd)}
        else:
            status[peer] = {"status": "missing", "reason": reason or f"{cmd} still not found after install"}
    return status


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None
