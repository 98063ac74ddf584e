"""snapfs benchmark suite: ``python -m tools.bench [--quick] [--out DIR]`` from the project root.

Runs snapfs (UFFD-WP) and its peers — stop-the-world copy, iterative pre-copy with dirty logging
(UFFD WP_ASYNC + PAGEMAP_SCAN), gcore, QEMU's background-snapshot — on the same memwriter
targets at several write rates, plus the physical floors (kernel write-protect, process_vm_readv,
zstd alone) and the read paths (store, FUSE, vmstate, incremental). Writes results.json,
results.md and PNG plots to --out (default bench-results/); with ``--docs docs`` also
docs/performance.md and docs/performance/*.png. ``--render results.json`` re-renders an
earlier run without measuring. The quick mode (64 MiB target, 3 write rates) takes under a
minute here; the full mode (1 GiB, 6 write rates, variants) about 6-10 minutes.

Modules: plan (what to run), targets (memwriter driver), methods/ (one per peer), floors,
readpaths, peers (find/install peer tools), machine, goals, report, plots, runner.
"""
