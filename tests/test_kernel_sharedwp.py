"""What the kernel does with userfaultfd write-protection of memory shared by several processes
(tools/targets/sharedwp.c): the facts process-tree snapshots are built on (docs/architecture.md,
"Process trees"). If a kernel changes any of them, this fails before a tree snapshot goes wrong."""

from __future__ import annotations

import subprocess

import pytest


def probe(target_bin, *args: str) -> dict[str, str]:
    out = subprocess.run([str(target_bin("sharedwp")), *args], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if not line.startswith("setup"))


# Per mapping: protection lives in each process's page tables (PTE bits, or markers where
# nothing is mapped), and a write faults only to the uffd of the process that writes.
PER_MAPPING = {
    "register": "ok",
    "only_a_protected.b_writes": "none",          # B's mapping is not protected by A's uffd
    "only_a_protected.a_writes": "A",
    "both.b_writes_mapped_in_both": "B",
    "both.a_writes_after_b_unprotected": "A",     # unprotecting in B leaves A protected
    "both.a_writes_again": "none",
    "both.b_writes_not_mapped_in_b": "B",         # a marker guards what B has not mapped
    "both.b_reads_cached_unmapped": "none",       # a read maps the page, still protected
    "both.b_writes_after_reading": "B",
    "both.a_writes_cached_unmapped": "A",         # page cache mapped by nobody: guarded too
    "both.b_writes_hole": "B",                    # not even in the page cache: still a fault
    "both.a_writes_page_b_created": "A",
    "both.a_writes_after_dontneed": "A",          # zapping a PTE keeps its marker
    "fork.child_writes_shared": "none",           # without EVENT_FORK a child is unprotected
    "fork.child_writes_private": "none",
}


@pytest.mark.parametrize("kind", ["anon", "memfd"])
def test_each_mapping_is_protected_by_its_own_process_uffd(target_bin, kind):
    expected = dict(PER_MAPPING)
    if kind == "memfd":
        expected["both.a_pwrites_memfd"] = "none"  # write(2) to the object is never caught
    assert probe(target_bin, kind) == expected


def test_sysv_shm_cannot_be_registered(target_bin):
    # SysV segments have their own vm_ops (shm_vm_ops), so vma_is_shmem() is false and
    # UFFDIO_REGISTER refuses them: snapfs copies them while the tree is stopped.
    assert probe(target_bin, "sysv") == {"register": "Invalid argument"}


def test_fork_event_gives_the_child_a_protected_uffd(target_bin):
    got = probe(target_bin, "anon", "fork")
    # With UFFD_FEATURE_EVENT_FORK the child's mappings keep their protection and its writes
    # fault to a uffd snapfs receives with the event; once the child exits that uffd's ioctls
    # fail with ESRCH.
    assert got["fork.child_writes_shared"] == "child"
    assert got["fork.child_writes_private"] == "child"
    assert got["fork.dead_child_uffd"] == "No such process"
    # Closing the child's uffd on arrival drops its protection (nothing left blocked).
    closed = probe(target_bin, "memfd", "closefork")
    assert closed["fork.child_writes_shared"] == "none"
    assert closed["fork.child_writes_private"] == "none"
