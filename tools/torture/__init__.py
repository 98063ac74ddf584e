"""``python -m tools.torture``: fault campaigns against snapfs, with the figures users judge.

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

Adding a campaign (the bad-input campaigns of the store and stream belong here too): write a
module in this package with a function decorated ``@register("name", "what it does")`` that
takes ``(budget: Budget, tally: Tally, log)`` and records what it did with
``tally.case()``, ``tally.fault()``, ``tally.harmed(why)``, ``tally.bad_input()``,
``tally.wrong_read(why)``; import it in ``tools/torture/campaigns.py``. A fault sweep over
another snapfs command against a regcheck-protocol target is one more
:class:`~tools.torture.sweep.FaultCase` list handed to :func:`~tools.torture.sweep.sweep`.

The suite runs a small budget of each campaign (``tests/test_torture.py``, marker
``torture``); the full sweep is this command.
"""
