"""snapfs benchmark suite: ``python -m tools.bench [--quick] [--out DIR]`` from the project root.

Runs snapfs (UFFD-WP) and its peers — stop-the-world copy, iterative pre-copy with dirty logging
(UFFD WP_ASYNC + PAGEMAP_SCAN), gcore, QEMU's background-snapshot, and fork() (the target forks
a child that writes its memory out, as in-memory databases save) — on memwriter targets, plus
the physical floors (kernel write-protect, process_vm_readv, zstd alone) and the read paths
(store, FUSE, vmstate, incremental). Writes results.json, results.md and PNG plots to --out
(default bench-results/); with ``--docs docs`` also docs/performance.md and
docs/performance/*.png. ``--render results.json`` re-renders an earlier run without measuring.

Sections (``--only a,b``; all by default): ``methods`` (every method at every write rate on
the same target, with the floors), ``matrix`` (snapfs and fork at 1/4/16 writer threads x THP
off/on x every write rate: the target's worst stall, its undisturbed window, where each long
stall fell and how much host steal and kdamond time it held), ``jvm`` (a JVM-like target: 200
idle threads, 16 mutators, a GC thread), ``mappings`` (65 000 mappings against one), ``throughput`` (snapfs against stop-copy on 1 and
4 GiB, CPU-seconds), ``every`` (``--every`` pauses against a one-shot's), ``qemu``,
``readpaths``. ``--threads``, ``--thp``, ``--rates`` and ``--size`` narrow the matrix. The
quick mode (64 MiB, few rates and rows) takes a few minutes; the full plan (1 GiB, 6 rates)
about 25-35 minutes; e.g. ``--only matrix --threads 4 --thp off`` for one slice of it.

Every stall goal is judged per row: the target's own worst stall, never a median over rows.

Modules: plan (what to run), targets (memwriter driver), methods/ (one per peer), stalls
(the target's own stalls), noise (host steal and kdamond sampled beside each run), every,
floors, readpaths, peers (find/install peer tools), machine, goals, report, plots, runner.
"""
