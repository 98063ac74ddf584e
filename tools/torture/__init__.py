"""``python -m tools.torture``: fault and bad-input campaigns against snapfs, with the figures users judge.

Each **campaign** runs **cases** and adds to one tally: cases, faults injected, targets harmed
(must be 0), bad inputs tried, wrong reads (must be 0). The exit status is 1 if anything was
harmed or read wrong.

Campaigns today (``--list``):

- ``capture``: a self-verifying target (``tools/targets/regcheck.c``: every register, ymm,
  MXCSR, signal mask, sigaltstack, syscall results, queued signals) is snapshotted by
  ``snapfs snapshot PID`` under ``strace -f -e inject=ptrace:signal=KILL:when=N`` for every N
  (every ptrace call of the capture: snapfs issues them all from one tracer thread, which is
  what strace counts), plus SIGKILL at random delays. After each fault the target must be
  released (untraced, not stopped, no userfaultfd) and pass its checks. Cases: 1 and 4 threads
  running, threads blocked in syscalls (the leader in read, or in nanosleep).
- ``restore``: ``snapfs incoming --pid`` killed at every ptrace and process_vm_writev call of
  a restore of ptrchase (the case list of ``tools/torture_restore.py``), with and without
  layout work; the target must be sound or parked, and the restore run again must finish it.
- ``store-damage`` (bad inputs; cases ``catalog``, ``maps``): single bit flips in a copy of a
  store's catalog.sqlite, over every class of page (header, each table's and index's leaf,
  interior and overflow pages, free pages) and every bit, and inside the page-map blobs;
  everything a user can read is read through ``SnapshotFS`` and compared with the undamaged
  store. A read that returns other bytes, raises something unexpected, or a ``check
  --verify-data`` that calls a store OK while reads fail (for a page map: that does not see the
  damage) is a wrong read. ``--positions N``: N flips of each kind (default 200 and 100).
- ``stream-fuzz`` (bad inputs; case ``mutations``): mutated migration streams (a ram-only one
  and a QEMU-like one; bit flips, inserts, cuts, nasty size fields) parsed and spooled whole
  and in small chunks; anything but a one-line StreamError, or 16 MiB allocated, is a wrong
  read. ``--positions N``: N mutations (default 6000).

``--seed 1`` (the default) draws the flips and mutations the suite runs
(``tests/test_store_catalog_damage.py``, ``tests/test_stream_fuzz.py``).

Adding a campaign: write a
module in this package with a function decorated ``@register("name", "what it does")`` that
takes ``(budget: Budget, tally: Tally, log)`` and records what it did with
``tally.case()``, ``tally.fault()``, ``tally.harmed(why)``, ``tally.bad_input()``,
``tally.wrong_read(why)``; import it in ``tools/torture/campaigns.py``. A fault sweep over
another snapfs command against a regcheck-protocol target is one more
:class:`~tools.torture.sweep.FaultCase` list handed to :func:`~tools.torture.sweep.sweep`.

The suite runs a small budget of the fault campaigns (``tests/test_torture.py``, marker
``torture``) and the bad-input campaigns at their default size (the two test files above);
the full sweep is this command.
"""
