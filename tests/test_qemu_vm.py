"""Real QEMU: VM snapshots through QMP, restores with -incoming, QEMU's own streams ingested.

The guest (tools/guest) keeps writing a self-describing pattern, so a restored RAM image can
be checked for being one consistent instant; guest RAM is a shared file on both sides.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from snapfs.store import Store
from snapfs.stream.qmp import QmpClient
from tests.conftest import snapfs_cmd
from tools.guest import build, check_pattern, read_counter
from tools.guest.vm import Qemu, guest_args, none_args

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64"),
]
TIMEOUT = 60


@pytest.fixture(scope="session")
def kernel() -> Path:
    return build()


@pytest.fixture
def shm_ram():
    """A guest RAM file in /dev/shm (shmem: QEMU can write-protect it for background snapshots)."""
    path = Path("/dev/shm") / f"snapfs-test-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def vms(tmp_path):
    """Start QEMUs with ``vms(args, name)``; all are killed at the end."""
    started: list[Qemu] = []

    def start(args: list[str], name: str) -> Qemu:
        vm = Qemu(args, tmp_path / f"{name}.qmp", tmp_path / f"{name}.log")
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.stop()


async def wait_guest_running(ram: Path, at_least: int = 1000) -> int:
    """Wait until the guest's counter passes ``at_least`` (it boots in well under a second)."""
    with trio.fail_after(TIMEOUT):
        while True:
            c = read_counter(ram)
            if c >= at_least:
                return c
            await trio.sleep(0.05)


async def wait_migration(qmp: QmpClient) -> dict:
    """Poll query-migrate until it completes; fail with QEMU's error otherwise."""
    with trio.fail_after(TIMEOUT):
        while True:
            info = await qmp.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                assert info["status"] == "completed", info
                return info
            await trio.sleep(0.05)


async def run_snapfs(env: dict, *args: str, stdin: bytes | None = None, check: bool = True):
    proc = await trio.run_process([*snapfs_cmd(), *args], env=env, stdin=stdin, capture_stdout=True,
                                  capture_stderr=True, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


async def restore(vms, kernel: Path, stream: Path, ram: Path, name: str) -> tuple[Qemu, QmpClient, bytes]:
    """A fresh paused QEMU loading ``stream``; returns it, its QMP client and the RAM image."""
    vm = vms(guest_args(kernel, mem_path=ram, incoming=f"exec:cat {stream}", paused=True), name)
    qmp = await QmpClient.connect(str(vm.qmp_path))
    await wait_migration(qmp)
    return vm, qmp, ram.read_bytes()


@pytest.mark.fuse
async def test_qmp_snapshot_roundtrip_restores_in_fresh_qemu(kernel, shm_ram, vms, tmp_path, snapfs_env):
    src = vms(guest_args(kernel, mem_path=shm_ram), "src")
    await wait_guest_running(shm_ram)
    proc = await run_snapfs(snapfs_env, "snapshot", "--qmp", str(src.qmp_path), "--name", "vm1", "--json")
    out = json.loads(proc.stdout)
    assert out["kind"] == "vm" and out["name"] == "vm1"
    assert out["qemu"]["downtime_ms"] is not None and out["pause_ms"] == out["qemu"]["downtime_ms"]
    assert out["region_count"] >= 2  # pc.ram, pc.bios, option ROMs...

    # The source keeps running, and its capabilities are back to what they were.
    async with await QmpClient.connect(str(src.qmp_path)) as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"
        caps = {c["capability"]: c["state"] for c in await qmp.execute("query-migrate-capabilities")}
        assert caps["background-snapshot"] is False

    # Restore straight from the mount, as a user would: -incoming "exec:cat MNT/vm1/vmstate".
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    await run_snapfs(snapfs_env, "mount", str(mnt))
    try:
        stream = mnt / "vm1" / "vmstate"
        vm, qmp, image = await restore(vms, kernel, stream, tmp_path / "dest.ram", "dest")
    finally:
        await run_snapfs(snapfs_env, "umount", str(mnt))
    async with qmp:
        instant = check_pattern(image)
        assert instant >= 1000
        with Store.open(snapfs_env["SNAPFS_STORE"], create=False) as store:
            reader = store.open_snapshot("vm1")
            pc_ram = next(r for r in reader.regions if r.name == "pc.ram")
            assert reader.read(pc_ram.index, 0, pc_ram.length) == image
        # The restored VM runs on from the snapshot instant.
        await qmp.execute("cont")
        with trio.fail_after(TIMEOUT):
            while read_counter(tmp_path / "dest.ram") <= instant:
                await trio.sleep(0.05)
        assert (await qmp.execute("query-status"))["status"] == "running"


async def test_qemu_native_snapshot_ingested_restores_identically(kernel, shm_ram, vms, tmp_path, snapfs_env):
    src = vms(guest_args(kernel, mem_path=shm_ram), "src")
    await wait_guest_running(shm_ram)
    native = tmp_path / "native.mig"
    async with await QmpClient.connect(str(src.qmp_path)) as qmp:
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": True}]})
        await qmp.execute("migrate", {"uri": f"exec:cat > {native}"})
        await wait_migration(qmp)
    proc = await run_snapfs(snapfs_env, "incoming", "--name", "nat", "--json", stdin=native.read_bytes())
    info = json.loads(proc.stdout)
    assert info["kind"] == "vm" and info["meta"]["qemu_stream"]["duplicate_records"] == 0
    ours = tmp_path / "ours.mig"
    ours.write_bytes((await run_snapfs(snapfs_env, "cat", "nat", "vmstate")).stdout)

    _, q1, native_image = await restore(vms, kernel, native, tmp_path / "native.ram", "native")
    _, q2, our_image = await restore(vms, kernel, ours, tmp_path / "ours.ram", "ours")
    async with q1, q2:
        assert our_image == native_image
        assert check_pattern(our_image) >= 1000


async def test_precopy_migration_into_snapfs_incoming(kernel, shm_ram, vms, tmp_path, snapfs_env):
    """QEMU's ordinary precopy piped into `snapfs incoming` (pages sent several times, COMMANDs,
    RAM END): our vmstate restores the same RAM as QEMU restores from its own copy of the stream.

    (QEMU 7.2 under TCG was seen to miss the guest's last writes in precopy, so the source's
    final RAM is not the reference: QEMU's own load of the same stream is.)
    """
    src = vms(guest_args(kernel, mem_path=shm_ram), "src")
    await wait_guest_running(shm_ram)
    native = tmp_path / "native.mig"
    env = " ".join(f"{k}={snapfs_env[k]}" for k in ("PYTHONPATH", "SNAPFS_STORE"))
    async with await QmpClient.connect(str(src.qmp_path)) as qmp:
        await qmp.execute("migrate", {"uri": f"exec:tee {native} | env {env} {sys.executable} -m snapfs "
                                             "incoming --name pre"})
        await wait_migration(qmp)
        with trio.fail_after(TIMEOUT):  # the run state follows "completed" a moment later
            while (await qmp.execute("query-status"))["status"] != "postmigrate":
                await trio.sleep(0.05)
    with trio.fail_after(TIMEOUT):  # QEMU is done writing; snapfs may still be committing
        while "pre" not in (await run_snapfs(snapfs_env, "list", "--json")).stdout.decode():
            await trio.sleep(0.1)

    with Store.open(snapfs_env["SNAPFS_STORE"], create=False) as store:
        stats = store.info("pre").meta["qemu_stream"]
    assert stats["duplicate_records"] > 0, stats  # the guest dirtied pages during precopy
    assert stats["stream_bytes"] == native.stat().st_size
    stream = tmp_path / "pre.vmstate"
    stream.write_bytes((await run_snapfs(snapfs_env, "cat", "pre", "vmstate")).stdout)
    _, q1, native_image = await restore(vms, kernel, native, tmp_path / "native.ram", "native")
    _, q2, our_image = await restore(vms, kernel, stream, tmp_path / "ours.ram", "ours")
    async with q1, q2:
        assert our_image == native_image


async def qmp_run(vm: Qemu, command: str) -> dict:
    """One QMP command on a fresh connection (QEMU serves one QMP client at a time)."""
    async with await QmpClient.connect(str(vm.qmp_path)) as qmp:
        return await qmp.execute(command)


async def test_refuses_prelaunch_and_paused_vm_on_qemu_72(kernel, vms, snapfs_env):
    vm = vms(guest_args(kernel, paused=True), "vm")
    proc = await run_snapfs(snapfs_env, "snapshot", "--qmp", str(vm.qmp_path), "--name", "x", check=False)
    assert proc.returncode == 11
    err = proc.stderr.decode()
    assert "prelaunch" in err and "cont" in err and err.count("\n") == 1
    assert (await qmp_run(vm, "query-status"))["status"] == "prelaunch"

    await qmp_run(vm, "cont")
    await qmp_run(vm, "stop")
    proc = await run_snapfs(snapfs_env, "snapshot", "--qmp", str(vm.qmp_path), "--name", "x", check=False)
    assert proc.returncode == 11 and "paused" in proc.stderr.decode()
    assert (await qmp_run(vm, "query-status"))["status"] == "paused"
    assert vm.proc.poll() is None
    assert not Path(snapfs_env["SNAPFS_STORE"]).exists()  # refused before touching the store


async def test_busy_qmp_socket_is_reported_not_waited_on(kernel, vms, snapfs_env, monkeypatch):
    import snapfs.stream.qmp as qmp_mod

    monkeypatch.setattr(qmp_mod, "GREETING_TIMEOUT", 0.5)
    vm = vms(guest_args(kernel), "vm")
    async with await QmpClient.connect(str(vm.qmp_path)):
        with pytest.raises(qmp_mod.QemuError, match="another client is probably connected"):
            await QmpClient.connect(str(vm.qmp_path))


async def test_snapshot_of_missing_socket_is_one_line_error(tmp_path, snapfs_env):
    proc = await run_snapfs(snapfs_env, "snapshot", "--qmp", str(tmp_path / "nope.qmp"), check=False)
    assert proc.returncode == 11
    assert proc.stderr.decode().count("\n") == 1 and "cannot connect to the QMP socket" in proc.stderr.decode()


async def test_process_vmstate_loads_into_qemu_machine_none(vms, tmp_path, snapfs_env):
    """A process snapshot's vmstate (one region) loads into `-machine none`; the file matches."""
    import numpy as np

    from snapfs.store import RegionSpec

    pages = 512
    img = np.random.default_rng(5).integers(0, 256, size=(pages, 4096), dtype=np.uint8)
    img[100:300] = 0
    with Store.open(snapfs_env["SNAPFS_STORE"], create=True) as store:
        w = store.begin_snapshot("proc1", {"kind": "process", "pid": 1, "comm": "t"})
        idx = w.add_region(RegionSpec("heap", 0x5555_0000_0000, pages * 4096, kind="heap"))
        w.put_pages(idx, 0, img[:400].tobytes())  # pages 400.. stay holes
        w.commit({})
    img[400:] = 0
    stream = tmp_path / "proc1.vmstate"
    stream.write_bytes((await run_snapfs(snapfs_env, "cat", "proc1", "vmstate")).stdout)
    ram = tmp_path / "heap.ram"
    ram.write_bytes(b"\xAA" * pages * 4096)  # pre-filled: zero pages and holes must be zeroed
    vm = vms(none_args("heap", pages * 4096, ram, f"exec:cat {stream}"), "none")
    async with await QmpClient.connect(str(vm.qmp_path)) as qmp:
        await wait_migration(qmp)
    assert ram.read_bytes() == img.tobytes()
    assert "vmdescription" not in vm.output().lower()  # no "Expected vmdescription" complaint


def test_guest_builds(kernel):
    elf = kernel.read_bytes()
    assert elf[:5] == b"\x7fELF\x01"  # ELF32: what QEMU's multiboot loader takes
    assert os.path.getsize(kernel) < 64 << 10
    assert b"\x02\xb0\xad\x1b" in elf[:8192]  # the multiboot header, within the first 8 KiB


async def test_refuses_after_cancelled_background_snapshot_on_qemu_72(kernel, vms, snapfs_env, tmp_path):
    """QEMU < 8.1 leaves RAM write-protected after a cancelled background snapshot: say so."""
    vm = vms(guest_args(kernel), "vm")
    async with await QmpClient.connect(str(vm.qmp_path)) as qmp:
        if qmp.version >= (8, 1, 0):
            pytest.skip("QEMU >= 8.1 cleans up after a cancel")
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": True}]})
        await qmp.execute("migrate", {"uri": "exec:sleep 2; cat > /dev/null"})
        await qmp.execute("migrate_cancel")
        with trio.fail_after(TIMEOUT):
            while (await qmp.execute("query-migrate"))["status"] != "cancelled":
                await trio.sleep(0.05)
    proc = await run_snapfs(snapfs_env, "snapshot", "--qmp", str(vm.qmp_path), "--name", "x", check=False)
    assert proc.returncode == 11
    err = proc.stderr.decode()
    assert "was cancelled" in err and "restart the VM" in err and err.count("\n") == 1


@pytest.mark.slow
async def test_ctrl_c_during_snapshot_never_cancels_qemu(kernel, shm_ram, vms, tmp_path, snapfs_env):
    """Interrupted snapfs drains QEMU's stream (a cancel would leave 7.2's RAM protected),
    publishes nothing, and the VM runs on; the next snapshot works."""
    import signal

    src = vms(guest_args(kernel, mem_path=shm_ram, ram=512 << 20), "src")
    await wait_guest_running(shm_ram)
    proc = subprocess.Popen([*snapfs_cmd(), "snapshot", "--qmp", str(src.qmp_path), "--name", "k"],
                            env=snapfs_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    locks = Path(snapfs_env["SNAPFS_STORE"]) / "locks"
    with trio.fail_after(TIMEOUT):  # the name is reserved right before QEMU starts
        while not (locks.exists() and any(locks.iterdir())):
            await trio.sleep(0.01)
    await trio.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = await trio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == 130, err
    assert err.decode() == "snapfs: interrupted\n"
    before = read_counter(shm_ram)
    await trio.sleep(0.3)
    assert read_counter(shm_ram) > before
    listing = await run_snapfs(snapfs_env, "list", "--json")
    assert '"k"' not in listing.stdout.decode()
    await run_snapfs(snapfs_env, "snapshot", "--qmp", str(src.qmp_path), "--name", "k2")
