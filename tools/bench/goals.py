"""The goals of issue 6 for snapfs, each judged pass/fail from one run's results."""

from __future__ import annotations

import statistics

GiB = 1 << 30


def _rows(results: dict, method: str) -> list[dict]:
    return [r for r in results["rows"] if r["method"] == method and not r.get("error")]


def _goal(name: str, measured: str, passed: bool | None, why: str = "") -> dict:
    return {"goal": name, "measured": measured, "pass": passed, "note": why}


def evaluate(results: dict) -> list[dict]:
    """One entry per goal: goal, measured (text), pass (True/False/None = could not judge), note."""
    goals: list[dict] = []
    snap = _rows(results, "snapfs")
    writing = [r for r in snap if r["write_rate"] != 0]
    wp = results.get("floors", {}).get("write_protect", {}).get("protect_ms")

    # 1. pause vs the kernel's write-protect time
    name = "pause <= 1.25 x kernel write-protect time"
    if writing and wp:
        pause = statistics.median(r["pause_ms"] for r in writing)
        own = statistics.median(r["tool_pause_ms"] for r in snap)
        goals.append(_goal(name, f"median target-measured pause {pause:.2f} ms vs write-protect "
                           f"{wp:.2f} ms (x{pause / wp:.2f}); snapfs's own pause_ms median {own:.2f} ms "
                           f"(x{own / wp:.2f})", pause <= 1.25 * wp,
                           "judged on the target-measured pause, median over write rates > 0"))
    else:
        goals.append(_goal(name, "n/a", None, "needs snapfs rows and the write-protect floor"))

    # 2. pause vs gcore
    name = "pause >= 50 x shorter than gcore's stop"
    gc = [r for r in _rows(results, "gcore") if r["write_rate"] != 0]
    if writing and gc:
        pause = statistics.median(r["pause_ms"] for r in writing)
        gstop = statistics.median(r["pause_ms"] for r in gc)
        goals.append(_goal(name, f"gcore {gstop:.1f} ms / snapfs {pause:.2f} ms = x{gstop / pause:.0f}",
                           gstop >= 50 * pause, "medians of target-measured pauses, write rates > 0"))
    else:
        goals.append(_goal(name, "n/a", None, "needs snapfs and gcore rows"))

    # 3. image size constant for snapfs, growing for pre-copy
    name = "image / non-zero RSS constant (5%) over write rates; pre-copy grows"
    pre = _rows(results, "pre-copy")
    if len(snap) >= 2 and len(pre) >= 2:
        ratios = [r["image_ratio"] for r in snap]
        spread = (max(ratios) - min(ratios)) / min(ratios)
        pre_sorted = sorted(pre, key=lambda r: (r["write_rate"] < 0, r["write_rate"]))
        growth = pre_sorted[-1]["image_ratio"] / pre_sorted[0]["image_ratio"]
        goals.append(_goal(name, f"snapfs {min(ratios):.3f}-{max(ratios):.3f} (spread {spread:.1%}); "
                           f"pre-copy x{growth:.2f} from rate {pre_sorted[0]['write_rate_label']} to "
                           f"{pre_sorted[-1]['write_rate_label']}", spread <= 0.05 and growth > 1.05))
    else:
        goals.append(_goal(name, "n/a", None, "needs snapfs and pre-copy rows at 2+ write rates"))

    # 4. capture throughput vs zstd alone
    name = "capture throughput >= 0.8 x zstd alone on the same bytes"
    idle = [r for r in snap if r["write_rate"] == 0]
    side = idle[0].get("zstd_side_by_side") if idle else None
    zstd = (side or results.get("floors", {}).get("zstd", {})).get("Bps")
    if idle and zstd:
        r = idle[0]
        runs = r.get("duration_s_runs") or [r["duration_s"]]
        tput = r["resident_bytes"] / min(runs)
        how = ("zstd passes interleaved with the captures: "
               + ", ".join(f"{b / 1e6:.0f}" for b in side["pass_Bps"]) + " MB/s"
               if side else "the zstd floor (best of 3)")
        goals.append(_goal(name, f"snapfs {tput / 1e6:.0f} MB/s vs zstd alone {zstd / 1e6:.0f} MB/s "
                           f"(x{tput / zstd:.2f}); snapfs durations {', '.join(f'{d:.3f}' for d in runs)} s",
                           tput >= 0.8 * zstd,
                           f"write rate 0; bytes = the target's data region over snapfs's duration_s; best "
                           f"of {len(runs)} captures against the best of {how}"))
    else:
        goals.append(_goal(name, "n/a", None, "needs a snapfs row at write rate 0 and the zstd floor"))

    # 4b. write-fault round trip as the target sees it
    name = "write-fault round trip p50 <= 60 us, p99 <= 250 us"
    timed = [r for r in writing if r.get("slow_p99_us") is not None and r.get("slow_writes")]
    if timed:
        p50 = statistics.median(r["slow_p50_us"] for r in timed)
        p99 = statistics.median(r["slow_p99_us"] for r in timed)
        goals.append(_goal(name, f"median over write rates: p50 {p50:.0f} µs, p99 {p99:.0f} µs (per rate: "
                           + ", ".join(f"{r['write_rate_label']} {r['slow_p50_us']:.0f}/{r['slow_p99_us']:.0f}"
                                       for r in timed) + ")",
                           p50 <= 60 and p99 <= 250,
                           "the target's slow writes (> 2 µs) during the capture: its write-protect faults"))
    else:
        goals.append(_goal(name, "n/a", None, "needs snapfs rows with the target's slow-write timings"))

    # 5. per GiB of non-zero memory, faster than QEMU's background-snapshot
    name = "per GiB non-zero, faster than QEMU background-snapshot"
    q = results.get("qemu") or {}
    if writing and "seconds_per_nonzero_gib" in q:
        rate = q.get("guest_writes_per_s_before") or 0
        nearest = min(writing, key=lambda r: abs((r["write_rate"] if r["write_rate"] > 0 else 1e9) - rate))
        s = nearest["duration_s"] / (nearest["nonzero_bytes"] / GiB)
        goals.append(_goal(name, f"snapfs {s:.2f} s/GiB (write rate {nearest['write_rate_label']}) vs QEMU "
                           f"{q['seconds_per_nonzero_gib']:.2f} s/GiB ({q['accel']}, guest ~{rate:.0f} writes/s)",
                           s < q["seconds_per_nonzero_gib"], "snapfs row nearest the guest's write rate"))
    else:
        goals.append(_goal(name, "n/a", None, "needs snapfs rows and a QEMU result"))
    return goals
