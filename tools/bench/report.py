"""Writes a run's results as results.json and results.md (tables, goals, how each figure was measured)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tools.bench import tree
from tools.bench.methods.gcore import Gcore
from tools.bench.methods.precopy import PreCopy
from tools.bench.methods.qemu_bg import QemuBackground
from tools.bench.methods.snapfs_uffd import Snapfs
from tools.bench.methods.stopcopy import StopCopy


def _steal(m: dict) -> str:
    """The host's steal over the run, if both ends were recorded (older results: none)."""
    if m.get("steal_s_start") is None or m.get("steal_s_end") is None:
        return ""
    return (f" Host steal (CPU time the hypervisor gave to others) over the run: "
            f"{m['steal_s_end'] - m['steal_s_start']:.1f} CPU-s.")


def _f(v, fmt: str = "{:.2f}", none: str = "–") -> str:
    return none if v is None else fmt.format(v)


def _mb(bps) -> str:
    return _f(bps, "{:.0f}") if bps is None else f"{bps / 1e6:.0f} MB/s"


def _main_table(rows: list[dict]) -> list[str]:
    out = ["| method | write rate (pages/s) | pause ms | tool's pause ms | duration s | image MiB | image / non-zero RSS "
           "| throughput during / before | slow-write p50 / p99 µs |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['method']} | {r['write_rate_label']} | FAILED: {r['error']} |||||||")
            continue
        pause = _f(r["pause_ms"]) + ("" if r["pause_source"] == "target" else " ¹")
        out.append(
            f"| {r['method']} | {r['write_rate_label']} | {pause} | {_f(r['tool_pause_ms'])} | "
            f"{_f(r['duration_s'], '{:.3f}')} | "
            f"{r['image_bytes'] / 2**20:.1f} | {r['image_ratio']:.3f} | {_f(r['throughput_ratio'])} | "
            f"{_f(r['slow_p50_us'], '{:.0f}')} / {_f(r['slow_p99_us'], '{:.0f}')} |")
    return out


def _stall_table(rows: list[dict]) -> list[str]:
    """The stall rows: the target's worst stall beside its undisturbed window, per row."""
    out = ["| section | target | write rate | method | worst stall ms | undisturbed ms | where the worst "
           "fell (host steal, kdamond in it) | tool's pause ms | duration s | slow-write p50 / p99 µs | "
           "throughput during / before | CPU-s/GiB |",
           "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['section']} | {r.get('shape', '')} | {r['write_rate_label']} | {r['method']} | "
                       f"FAILED: {r['error']} ||||||||")
            continue
        stalls = r.get("stalls") or []
        where = f"{stalls[0]['phase']} ({stalls[0]['who']})" if stalls else "–"
        host = [f"{k} {stalls[0][k + '_ms']:.0f} ms" for k in ("steal", "kdamond")
                if stalls and (stalls[0].get(k + "_ms") or 0) >= 1]
        if host:  # the machine's own share of that stall (tools/bench/noise.py, upper bounds)
            where += f"; in it {', '.join(host)}"
        cpu = (r.get("extra") or {}).get("cpu_s")
        per_gib = cpu / (r["resident_bytes"] / 2**30) if cpu is not None and r.get("resident_bytes") else None
        out.append(
            f"| {r['section']} | {r.get('shape', '')} | {r['write_rate_label']} | {r['method']} | "
            f"{_f(r.get('pause_ms'))} | {_f(r.get('baseline_max_stall_ms'))} | {where} | "
            f"{_f(r.get('tool_pause_ms'))} | {_f(r.get('duration_s'), '{:.3f}')} | "
            f"{_f(r.get('slow_p50_us'), '{:.0f}')} / {_f(r.get('slow_p99_us'), '{:.0f}')} | "
            f"{_f(r.get('throughput_ratio'))} | {_f(per_gib)} |")
    return out


def _every_lines(every: dict) -> list[str]:
    out = []
    for key, e in (every or {}).items():
        if "skipped" in e:
            out.append(f"- **{key}**: skipped — {e['skipped']}")
            continue
        out.append(f"- **{key}** ({e['target']}): first snapshot pause {e['first']['pause_ms']:.2f} ms "
                   f"(then {e['first'].get('switch_pause_ms') or 0:.2f} ms to switch to async tracking); "
                   f"children {', '.join(f'{p:.2f}' for p in e['child_pause_ms'])} ms; one-shot "
                   f"{e['one_shot_pause_ms']:.2f} ms")
    return out


def markdown(results: dict, command: str, img_prefix: str = "") -> str:
    """The report as markdown; the PNGs are referenced as ``img_prefix + file name``."""
    m, plan = results["machine"], results["plan"]
    L: list[str] = [f"# snapfs benchmark ({plan['mode']})", "",
                    f"Command: `{command}` — {results['elapsed_s']:.0f} s.", "",
                    f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, kernel {m['kernel']}, "
                    f"virtualized: {m['virtualized']}, THP `{m['thp']}`, clocksource {m['clocksource']}; "
                    f"Python {m['python']}, zstandard {m['zstandard']}. Load average (1 min) at start "
                    f"{_f((m.get('loadavg_start') or [None])[0])}, at end {_f((m.get('loadavg_end') or [None])[0])} "
                    f"(the bench itself uses up to 2 CPUs: more means other work ran beside it)."
                    + _steal(m), "",
                    f"Target: memwriter, {plan['size'] >> 20} MiB resident (30% zero / 40% compressible / "
                    f"30% random pages), {plan['writer_threads']} writer thread, uniform random page writes; "
                    f"compression threads: {plan['compress_threads']}.", ""]
    peers = results.get("peers", {})
    if peers:
        L.append("Peers: " + "; ".join(f"{k} {v['status']} ({v.get('version') or v.get('reason')})"
                                       for k, v in peers.items()) + ".")
        L.append("")
    if results.get("missing"):
        L += ["## Not run", ""] + [f"- **{k}**: {v}" for k, v in results["missing"].items()] + [""]

    L += ["## Goals (snapfs)", ""]
    if plan["mode"] == "quick":
        L += ["Quick mode (small target, few rates): the goals are stated for the full run; these "
              "verdicts only show the machinery works.", ""]
    L += ["| goal | measured | result |", "|---|---|---|"]
    for g in results.get("goals", []):
        verdict = {True: "PASS", False: "FAIL", None: "not judged"}[g["pass"]]
        note = f" ({g['note']})" if g["note"] else ""
        L.append(f"| {g['goal']} | {g['measured']}{note} | **{verdict}** |")
    L.append("")
    per_row = [g for g in results.get("goals", []) if g.get("rows")]
    if per_row:
        L += ["Every row of each per-row goal:", ""]
        for g in per_row:
            L.append(f"- {g['goal']}:")
            L += [f"  - {'PASS' if r['pass'] else 'FAIL' if r['pass'] is False else 'n/a'}: {r['row']}"
                  for r in g["rows"]]
        L.append("")

    stall_rows = [r for r in results["rows"] if r.get("section")]
    if stall_rows:
        L += ["## What the target suffers: writer threads, THP, JVM-like, many mappings, throughput", "",
              "Each target runs snapfs and its peers in turn (fork: the target forks a child that "
              "writes its memory out, as in-memory databases save). *Worst stall*: the longest stall "
              "the target measured during the run; *undisturbed*: the same in the "
              f"{plan['settle_s']} s before it; *where*: the capture phase that stall overlapped most "
              "(attach, preprotect, freeze, background) and the thread it hit, with the host steal "
              "(most on one CPU) and the kernel's DAMON thread (kdamond) time sampled during it when "
              ">= 1 ms (every 10 ms, so upper bounds: tools/bench/noise.py); *tool's pause*: "
              "snapfs's pause_ms (the freeze), fork() as the target timed it, stop-copy's stop.", ""]
        L += _stall_table(stall_rows)
        L += ["", f"![worst stall by method and thread count]({img_prefix}stall_by_threads.png)", ""]
    if results.get("every"):
        L += ["## `--every` pauses against a one-shot snapshot of the same target", ""]
        L += _every_lines(results["every"]) + [""]

    f = results.get("floors") or {}
    if f:
        wp, pvr, z = f.get("write_protect", {}), f.get("process_vm_readv", {}), f.get("zstd", {})
        L += ["## Physical floors (same target, not writing)", "",
              "| floor | value |", "|---|---:|",
              f"| kernel write-protect of {wp.get('bytes', 0) >> 20} MiB (UFFDIO_WRITEPROTECT, best of 3) | "
              f"{_f(wp.get('protect_ms'))} ms |",
              f"| un-protect of the same | {_f(wp.get('unprotect_ms'))} ms |",
              *[f"| kernel write-protect, {k[len('write_protect_'):]} target (writing) | "
                f"{_f(v.get('protect_ms'))} ms |" for k, v in f.items() if k.startswith("write_protect_")],
              f"| process_vm_readv, 1 MiB reads, reused buffer | {_mb(pvr.get('reused_buffer_Bps'))} |",
              f"| process_vm_readv, one read into fresh memory | {_mb(pvr.get('fresh_memory_Bps'))} |",
              f"| zstd level 1 alone, {z.get('threads')} threads, 128 KiB frames, zero pages skipped "
              f"(per resident byte) | {_mb(z.get('Bps'))} |",
              *[f"| the same, best of the passes interleaved with snapfs's throughput captures "
                f"({', '.join(_mb(b) for b in r['zstd_side_by_side']['pass_Bps'])}) | "
                f"{_mb(r['zstd_side_by_side']['Bps'])} |"
                for r in results["rows"] if r.get("zstd_side_by_side")],
              f"| compression ratio of the non-zero pages | {_f(z.get('ratio'))} |", ""]
        if wp.get("error"):
            L += [f"Write-protect floor failed: {wp['error']}", ""]

    L += ["## Snapshot of a writing process, per method and write rate", ""]
    L += _main_table(results["rows"])
    base = [r["baseline_max_stall_ms"] for r in results["rows"] if r.get("baseline_max_stall_ms") is not None]
    if base:
        L += ["", f"Noise floor: in the undisturbed {plan['settle_s']} s window before each run the target's "
              f"longest stall was {statistics.median(base):.1f} ms (median; max {max(base):.1f} ms)."]
    variants = [r for r in results["rows"] if r.get("variant")]
    L += ["", "¹ at write rate 0 the target cannot time a pause (it makes no writes): the tool's own "
          "figure is shown.", ""]
    if variants:
        L += ["Variants (snapfs only): " + "; ".join(
            f"{r['method']}: " + ", ".join(f"{k} {v}" for k, v in r["variant"].items()) for r in variants)
            + " (huge_bytes = AnonHugePages of the target).", ""]
    L += [
          f"![image size vs write rate]({img_prefix}image_vs_rate.png)", "",
          f"![duration vs write rate]({img_prefix}duration_vs_rate.png)", "",
          f"![pause by method]({img_prefix}pause_by_method.png)", ""]

    snaps = [r for r in results["rows"] if r["method"].startswith("snapfs") and not r.get("error")]
    if snaps:
        L += ["snapfs per run: write faults served, and its own peak RSS (VmHWM sampled every 50 ms; "
              "it must not hold a copy of the target):", ""]
        L += [f"- {r['method']}, rate {r['write_rate_label']}: {r['extra'].get('faults')} faults, peak RSS "
              f"{(r['extra'].get('peak_rss_bytes') or 0) / 2**20:.0f} MiB"
              + (f", warnings: {'; '.join(r['extra']['warnings'])}" if r["extra"].get("warnings") else "")
              for r in snaps]
        L.append("")
    pre = [r for r in results["rows"] if r["method"] == "pre-copy" and not r.get("error")]
    if pre:
        L += ["Pre-copy rounds (pages copied per round, last = final stop-copy):", ""]
        L += [f"- rate {r['write_rate_label']}: {r['extra']['round_pages']}"
              f"{'' if r['extra']['converged'] else ' (did not converge: round limit)'}" for r in pre]
        L.append("")

    q = results.get("qemu")
    L += ["## QEMU background-snapshot", ""]
    if not q:
        L += ["Not run (see above).", ""]
    elif q.get("error"):
        L += [f"Failed: {q['error']}", ""]
    else:
        L += ["| accel | guest RAM | non-zero | total s | downtime ms | image MiB | image / non-zero | "
              "s per GiB non-zero | guest writes/s before → during |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| {q['accel']} | {q['guest_mem'] >> 20} MiB | {q['nonzero_bytes'] / 2**20:.0f} MiB | "
              f"{q['total_s']:.3f} | {q['downtime_ms']} | {q['image_bytes'] / 2**20:.1f} | "
              f"{q['image_ratio']:.3f} | {q['seconds_per_nonzero_gib']:.2f} | "
              f"{q['guest_writes_per_s_before']:.0f} → {q['guest_writes_per_s_during']:.0f} |", "",
              f"Accelerator: {q['accel']} ({q['accel_reason']}). QEMU's stream is uncompressed.", ""]
        inc = q.get("incoming") or {}
        if "skipped" in inc:
            L += [f"Second snapshot into `snapfs incoming`: skipped — {inc['skipped']}", ""]
        elif inc:
            L += [f"Snapshots of the same VM alternating `snapfs incoming` and a file sink "
                  f"({inc.get('rounds', 1)} each, medians): QEMU total {inc['total_s']:.3f} s with "
                  f"`snapfs incoming` vs {inc.get('file_total_s', 0):.3f} s with `cat > FILE`, "
                  f"x{inc['ratio_to_file']:.2f} (goal <= 1.1).", ""]

    rp = results.get("readpaths") or {}
    L += ["## Read paths (store, FUSE, vmstate, incremental)", ""]
    for key, sec in rp.items():
        if "skipped" in sec:
            L.append(f"- **{key}**: skipped — {sec['skipped']}")
            continue
        if key == "store":
            L.append(f"- **store** (SnapshotReader, {sec['bytes'] >> 20} MiB region, 1 MiB reads): "
                     f"sequential {'cold' if sec['cold'] else 'warm'} {_mb(sec['sequential_cold_Bps'])}, "
                     f"warm {_mb(sec['sequential_warm_Bps'])}; random 4 KiB "
                     f"{sec['random_4k_cold']['reads_per_s']:.0f} reads/s, p50 "
                     f"{sec['random_4k_cold']['p50_us']:.0f} µs, p99 {sec['random_4k_cold']['p99_us']:.0f} µs")
        elif key == "fuse":
            line = (f"- **FUSE** (ramblocks/{sec['block']}/data, {sec['bytes'] >> 20} MiB, 1 MiB reads): "
                    f"sequential cold {_mb(sec['sequential_cold_Bps'])}, warm {_mb(sec['sequential_warm_Bps'])}; "
                    f"random 4 KiB {sec['random_4k_cold']['reads_per_s']:.0f} reads/s, p50 "
                    f"{sec['random_4k_cold']['p50_us']:.0f} µs, p99 {sec['random_4k_cold']['p99_us']:.0f} µs")
            if "vmstate_sequential_Bps" in sec:
                line += f"; vmstate through the mount {_mb(sec['vmstate_sequential_Bps'])}"
            L.append(line)
        elif key == "vmstate":
            L.append(f"- **vmstate** (VmstateView in-process, {sec['bytes'] >> 20} MiB stream): "
                     f"sequential {_mb(sec['sequential_Bps'])}")
        elif key == "incremental":
            L.append(f"- **incremental** ({sec['dirty_fraction']:.1%} of pages rewritten, `--every`): child "
                     f"pause {sec['child']['pause_ms']:.1f} ms vs full {sec['full']['pause_ms']:.1f} ms "
                     f"(x{_f(sec['pause_ratio'])}), duration {sec['child']['duration_s']:.3f} s vs "
                     f"{sec['full']['duration_s']:.3f} s (x{_f(sec['duration_ratio'])}), stored "
                     f"{sec['child']['stored_bytes'] / 2**20:.1f} MiB vs {sec['full']['stored_bytes'] / 2**20:.1f} MiB")
    L.append("")

    if results.get("stop_cost"):
        from tools.bench.stopcost import report as stop_report

        L += ["## Stop cost by thread count", "", stop_report(results["stop_cost"]), ""]

    L += tree.markdown(results.get("tree"))

    L += ["## How each figure is measured", "",
          "- **pause**: the longest stall the target measured itself during the run (memwriter times "
          "every write; a stall is the time from when a write could start — its pacing deadline or "
          "the end of the previous write — to its end). Nothing is subtracted: it includes the "
          "scheduler noise seen in the undisturbed window before (the noise floor above).",
          "- **tool's pause**: what the method itself measures: snapfs's pause_ms; stop-copy and "
          "pre-copy time their stop; for gcore it is its whole run (gdb start-up, attach, dump, detach).",
          "- **throughput during / before**: the target's writes/s during the run over its writes/s in "
          f"the {plan['settle_s']} s before it.",
          "- **slow-write p50/p99**: single 8-byte stores that took over 2 µs, as the target timed them; "
          "during a snapfs run these are its write-protect faults (the fault round trip).",
          "- **image / non-zero RSS**: image bytes over the target's non-zero resident bytes.",
          f"- **snapfs**: {Snapfs.how}.",
          f"- **stop-copy**: {StopCopy.how}.",
          f"- **pre-copy**: {PreCopy.how} (at most {plan['precopy_max_rounds']} rounds, downtime "
          f"budget {plan['precopy_max_downtime_s'] * 1e3:.0f} ms).",
          f"- **gcore**: {Gcore.how}.",
          f"- **QEMU**: {QemuBackground.how}.", ""]
    return "\n".join(L)


DOCS_PREAMBLE = """\
<!-- Generated by `python -m tools.bench --docs docs` from one run's results.json: every number
below was produced by the command named in it, on the machine it describes (raw figures:
performance/results.json). Re-run to update. -->

Ratios, not absolute numbers, are the headline: this machine is a small, noisy VM, and other
work may have run beside the bench. See tools/bench/__init__.py for what each module measures.

"""


def write_docs(results: dict, docs_dir: Path, pngs: list[Path]) -> Path:
    """docs/performance.md plus its PNGs in docs/performance/."""
    assets = docs_dir / "performance"
    assets.mkdir(parents=True, exist_ok=True)
    for png in pngs:
        (assets / png.name).write_bytes(png.read_bytes())
    # The raw figures behind the page, for anyone who wants more than the tables show.
    (assets / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    md = docs_dir / "performance.md"
    body = markdown(results, results.get("command", "python -m tools.bench"), img_prefix="performance/")
    title, _, rest = body.partition("\n")
    md.write_text(f"{title.replace('snapfs benchmark', 'snapfs performance')}\n\n{DOCS_PREAMBLE}{rest.lstrip()}")
    return md


def write(results: dict, out_dir: Path, command: str) -> tuple[Path, Path]:
    """results.json and results.md in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results, command=command)
    js = out_dir / "results.json"
    js.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md = out_dir / "results.md"
    md.write_text(markdown(results, command))
    return js, md
