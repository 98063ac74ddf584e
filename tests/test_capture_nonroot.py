"""A non-root user snapshots their own process through the /dev/userfaultfd handoff; clear
errors when /dev/userfaultfd or ptrace access is missing. Needs root to set the stage: a
test user, and a group given access to /dev/userfaultfd for the duration of the test."""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from snapfs.store import Store
from tests.conftest import ROOT
from tests.support.capture import Target, assert_released, check_oracle, region_image

USER = "snapfs-test"
GROUP = "snapfs-uffd"
DEV = Path("/dev/userfaultfd")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not DEV.exists(), reason="needs root")


@pytest.fixture(scope="module", autouse=True)
def _account_removed_after():
    """The test user and group are created on first use; remove them after the module when
    they were not there before (a machine is left as the tests found it)."""
    # The account and /dev/userfaultfd's mode are machine-wide: two suites running at once
    # (two checkouts) take turns.
    with open("/run/lock/snapfs-nonroot-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        had_group, had_user = _exists(grp.getgrnam, GROUP), _exists(pwd.getpwnam, USER)
        yield
        if not had_user and _exists(pwd.getpwnam, USER):
            subprocess.run(["userdel", USER], check=False, capture_output=True)
        if not had_group and _exists(grp.getgrnam, GROUP):
            subprocess.run(["groupdel", GROUP], check=False, capture_output=True)


def _exists(lookup, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _ensure_account() -> None:
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )


@pytest.fixture
def user_store():
    """A store directory owned by the test user."""
    _ensure_account()
    pw = pwd.getpwnam(USER)
    base = Path(tempfile.mkdtemp(prefix="snapfs-nonroot-", dir="/tmp"))
    os.chown(base, pw.pw_uid, pw.pw_gid)
    base.chmod(0o700)
    try:
        yield base / "store"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def uffd_group_access():
    """Give GROUP read/write access to /dev/userfaultfd and put USER in it; undo after."""
    _ensure_account()
    st = DEV.stat()
    subprocess.run(["usermod", "-a", "-G", GROUP, USER], check=True)
    os.chown(DEV, st.st_uid, grp.getgrnam(GROUP).gr_gid)
    DEV.chmod(0o660)
    try:
        yield
    finally:
        os.chown(DEV, st.st_uid, st.st_gid)
        DEV.chmod(st.st_mode & 0o7777)


def _snapfs_as_user(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
    cmd = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups",
           sys.executable, "-m", "snapfs", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_user_snapshots_own_process(user_store, uffd_group_access):
    npages = 4096
    with Target("oracle", str(npages), "2", user=USER) as t:
        out = _snapfs_as_user("snapshot", str(t.pid), "--name", "mine", "--store", str(user_store))
        assert out.returncode == 0, out.stderr
        assert "snapshot mine:" in out.stdout
        assert_released(t.pid)
        with Store.open(user_store, create=False) as store:
            check_oracle(region_image(store.open_snapshot("mine"), t.addr, npages))


def test_user_without_userfaultfd_access_gets_clear_error(user_store):
    _ensure_account()
    st = DEV.stat()
    if st.st_gid == grp.getgrnam(GROUP).gr_gid:  # left over by an interrupted run of ours
        os.chown(DEV, 0, 0)
        DEV.chmod(0o600)
    assert not (DEV.stat().st_mode & 0o006), "/dev/userfaultfd must not be world-accessible"
    with Target("oracle", "256", "1", user=USER) as t:
        out = _snapfs_as_user("snapshot", str(t.pid), "--store", str(user_store))
        assert out.returncode == 4, out.stderr
        line = out.stderr.strip()
        assert "\n" not in line and "/dev/userfaultfd" in line
        assert "vm.unprivileged_userfaultfd" in line
        assert_released(t.pid)
        assert t.proc.poll() is None


def test_user_cannot_snapshot_other_users_process(user_store, uffd_group_access):
    with Target("oracle", "256", "1") as t:  # runs as root
        out = _snapfs_as_user("snapshot", str(t.pid), "--store", str(user_store))
        assert out.returncode == 4, out.stderr
        line = out.stderr.strip()
        assert "\n" not in line and "not permitted to ptrace" in line
        assert_released(t.pid)


async def test_root_snapshots_other_users_process(store_dir):
    """root can snapshot anything: the target may not create a userfaultfd itself
    (vm.unprivileged_userfaultfd=0), so it is handed one from /dev/userfaultfd."""
    from snapfs.capture import CaptureOptions, capture_process

    _ensure_account()
    npages = 2048
    with Target("oracle", str(npages), "2", user=USER) as t:
        with Store.open(store_dir, create=True) as store:
            await capture_process(t.pid, store, "s", CaptureOptions())
            check_oracle(region_image(store.open_snapshot("s"), t.addr, npages))
        assert_released(t.pid)
