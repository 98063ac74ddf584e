"""PNG plots of a run: image size and duration vs write rate, pause by method (log scale)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

COMPARED = ("snapfs", "pre-copy", "stop-copy")
STYLE = {"snapfs": dict(marker="o", linestyle="-", linewidth=2.5, zorder=3),
         "pre-copy": dict(marker="s", linestyle="-"),
         "stop-copy": dict(marker="^", linestyle="--", markersize=8, markerfacecolor="none")}


def _by_method(rows: list[dict], methods) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] in methods and not r.get("error"):
            out.setdefault(r["method"], []).append(r)
    return out


def _rate_axis(rows: list[dict]) -> tuple[list[float], list[str]]:
    rates = sorted({r["write_rate"] for r in rows}, key=lambda x: (x < 0, x))
    labels = {r["write_rate"]: r["write_rate_label"] for r in rows}
    return rates, [labels[x] for x in rates]


def _vs_rate(rows: list[dict], key: str, ylabel: str, title: str, path: Path, log: bool = False) -> None:
    rows = [r for r in rows if not r.get("section")]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    rates, labels = _rate_axis(rows)
    for method, rs in _by_method(rows, COMPARED).items():
        pos = {x: i for i, x in enumerate(rates)}
        pts = sorted((pos[r["write_rate"]], r[key]) for r in rs)
        ax.plot([p for p, _ in pts], [v for _, v in pts], label=method, **STYLE.get(method, {}))
    ax.set_xticks(range(len(rates)), labels)
    ax.set_xlabel("target write rate (page writes/s)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pause_by_method(results: dict, path: Path) -> None:
    rows = [r for r in results["rows"] if not r.get("error") and r["write_rate"] != 0 and not r.get("section")]
    fig, ax = plt.subplots(figsize=(7.5, 5.6), dpi=110)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    rates, labels = _rate_axis(rows) if rows else ([], [])
    width = 0.8 / max(1, len(rates))
    for j, rate in enumerate(rates):
        vals = [next((r["pause_ms"] for r in rows if r["method"] == m and r["write_rate"] == rate), 0)
                for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], vals, width, label=f"{labels[j]} writes/s")
    q = results.get("qemu") or {}
    wp = (results.get("floors") or {}).get("write_protect", {}).get("protect_ms")
    if wp:
        ax.axhline(wp, color="k", linestyle="--", linewidth=1, label=f"kernel write-protect {wp:.1f} ms")
    if q.get("downtime_ms") is not None:
        ax.axhline(max(q["downtime_ms"], 0.1), color="tab:gray", linestyle=":", linewidth=1,
                   label=f"QEMU bg-snapshot downtime {q['downtime_ms']} ms (VM)")
    ax.set_xticks([i + width * (len(rates) - 1) / 2 for i in range(len(methods))], methods,
                  rotation=25, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_ylabel("pause (ms, target-measured longest stall)")
    ax.set_title("Pause by method")
    ax.grid(True, axis="y", alpha=0.3)
    if rows:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.36), ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _stall_by_threads(results: dict, path: Path) -> None:
    """Worst stall (the target's) by method, writer threads and THP: the worst over write rates
    as the bar, every rate as a dot, the undisturbed window's worst as a dash."""
    rows = [r for r in results["rows"] if r.get("section") == "matrix" and not r.get("error")
            and r.get("pause_ms") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
    groups = sorted({(r["threads"], r["thp"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, worst = [], []
        for i, g in enumerate(groups):
            sel = [r for r in rows if r["method"] == m and (r["threads"], r["thp"]) == g]
            if not sel:
                continue
            x = i + j * width
            xs.append(x)
            worst.append(max(r["pause_ms"] for r in sel))
            ax.scatter([x] * len(sel), [r["pause_ms"] for r in sel], s=10, color="k", zorder=3)
            ax.scatter([x], [max(r["baseline_max_stall_ms"] or 0.01 for r in sel)], marker="_", s=200,
                       color="tab:gray", zorder=3)
        ax.bar(xs, worst, width, label=m)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(groups))],
                  [f"{t} writer{'s' if t > 1 else ''}{', THP' if thp else ''}" for t, thp in groups],
                  rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_ylabel("worst stall the target measured (ms)")
    ax.set_title("Worst stall by method and writer threads (bar: worst over write rates;\n"
                 "dots: each rate; grey dash: undisturbed window)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> list[Path]:
    """The PNGs in ``out_dir``."""
    rows = results["rows"]
    paths = [out_dir / "image_vs_rate.png", out_dir / "duration_vs_rate.png", out_dir / "pause_by_method.png"]
    _vs_rate(rows, "image_ratio", "image bytes / non-zero RSS", "Image size vs write rate", paths[0])
    _vs_rate(rows, "duration_s", "snapshot duration (s)", "Duration vs write rate", paths[1], log=True)
    _pause_by_method(results, paths[2])
    if any(r.get("section") == "matrix" for r in rows):
        paths.append(out_dir / "stall_by_threads.png")
        _stall_by_threads(results, paths[-1])
    return paths
