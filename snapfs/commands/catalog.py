"""``snapfs list`` and ``snapfs info NAME``: what the store holds (human or --json)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from snapfs.commands.common import add_store_argument, store_path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store (numpy, zstd) is imported when a command runs: `snapfs
    from snapfs.store import SnapshotInfo  # incoming` must start draining a pipe at once
from snapfs.units import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``list`` and ``info`` commands."""
    p = subparsers.add_parser(
        "list", help="list snapshots in the store",
        description="List the store's snapshots, oldest first: name, when it was taken, the target "
        "(pid and command, or the VM), the pause, the memory it holds (RESIDENT), the bytes it "
        "wrote to the store (STORED) and those it shares with its parent chain (SHARED), and its "
        "parent (an incremental snapshot's; removed ancestors are named). Exit 6 if a catalog row "
        "is damaged (see `snapfs check`).")
    add_store_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_list)
    p = subparsers.add_parser(
        "info", help="show one snapshot in detail",
        description="Show one snapshot: the process (exe, command line), pause, duration, write "
        "faults, sizes, parent, warnings recorded during the capture, and every region with its "
        "address, permissions, kind and how much of it holds data or zero pages.")
    add_store_argument(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_info)


def _target(s: SnapshotInfo) -> str:
    if s.kind == "vm":
        return f"vm {s.meta.get('vm_name') or s.comm or ''}".strip()
    if s.kind == "tree":
        tree = s.meta.get("tree", {})
        root = tree.get("root", {})
        where = f"{s.pid} {s.comm or ''}".strip() if s.pid else f"cgroup {root.get('cgroup', '?')}"
        return f"tree {where} ({len(tree.get('processes', []))} processes)"
    return f"{s.pid or '?'} {s.comm or ''}".strip()


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _parent(s: SnapshotInfo) -> str:
    """The parent column: the nearest ancestor still stored, and the removed ones before it."""
    if not s.removed_parents:
        return s.parent or "-"
    return f"{s.parent or '-'} ({', '.join(s.removed_parents)} removed)"


def _pause(s: SnapshotInfo) -> str:
    return "-" if s.pause_ms is None else f"{s.pause_ms:.1f} ms"


def run_list(args: argparse.Namespace) -> int:
    """Print the committed snapshots, oldest first."""
    from snapfs.store import Store

    from snapfs.errors import StoreCorrupt

    with Store.open(store_path(args), create=False) as store:
        snaps = store.list_snapshots()
    damaged = [s for s in snaps if s.damaged]
    if args.json:
        print(json.dumps([s.to_json() for s in snaps], indent=2))
    elif not snaps:
        print(f"no snapshots in {store_path(args)}")
    else:
        rows = [("NAME", "CREATED", "TARGET", "PAUSE", "RESIDENT", "STORED", "SHARED", "PARENT")]
        for s in snaps:
            if s.damaged:
                rows.append((s.name, "?", "DAMAGED: see below", "", "", "", "", ""))
                continue
            rows.append((s.name, _when(s.created), _target(s), _pause(s), format_bytes(s.resident_bytes),
                         format_bytes(s.stored_bytes), format_bytes(s.shared_bytes), _parent(s)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for s in damaged:
        print(f"snapfs: {s.damaged}", file=sys.stderr)
    return StoreCorrupt.exit_code if damaged else 0


def run_info(args: argparse.Namespace) -> int:
    """Print one snapshot's fields, warnings and regions."""
    from snapfs.store import Store

    with Store.open(store_path(args), create=False) as store:
        reader = store.open_snapshot(args.name)
        info, regions = reader.info, reader.regions
    if args.json:
        print(json.dumps({**info.to_json(), "regions": [r.to_json() for r in regions]}, indent=2))
        return 0
    lines = [
        ("name", info.name),
        ("kind", info.kind),
        ("target", _target(info)),
        ("exe", info.exe or "-"),
        ("cmdline", " ".join(info.cmdline) if info.cmdline else "-"),
        ("created", _when(info.created)),
        ("pause", _pause(info)),
        ("duration", "-" if info.duration_s is None else f"{info.duration_s:.3f} s"),
        ("resident", f"{format_bytes(info.resident_bytes)} (zero pages {format_bytes(info.zero_bytes)})"),
        ("stored", f"{format_bytes(info.stored_bytes)} own, {format_bytes(info.shared_bytes)} shared with parents"),
        ("faults", str(info.faults)),
        ("parent", _parent(info)),
        ("regions", str(info.region_count)),
    ]
    for key, value in lines:
        print(f"{key + ':':10} {value}")
    for w in info.warnings:
        print(f"warning:   {w}")
    if info.kind == "tree":
        _tree_info(info, regions)
    elif regions:
        print()
        print(f"{'START':>18}  {'LENGTH':>10}  PERMS  {'KIND':8}  {'DATA':>10}  {'ZERO':>10}  NAME")
        for r in regions:
            print(f"{r.start:#18x}  {format_bytes(r.length):>10}  {r.perms:5}  {r.kind:8}  "
                  f"{format_bytes(r.data_pages * 4096):>10}  {format_bytes(r.zero_pages * 4096):>10}  {r.name}")
    return 0


def _tree_info(info: SnapshotInfo, regions: list) -> None:
    """A tree snapshot's processes and shared objects (the regions are theirs)."""
    from snapfs.store.tree import member_regions

    tree = info.meta.get("tree", {})
    print()
    print(f"{'PID':>8}  {'PPID':>8}  {'PAUSE':>9}  {'FAULTS':>7}  {'RESIDENT':>10}  PROCESS")
    for p in tree.get("processes", []):
        pages = sum(regions[i].data_pages + regions[i].zero_pages for i in member_regions(p))
        flag = "  (exited during the capture)" if p.get("exited") else ""
        print(f"{p['pid']:>8}  {p['ppid']:>8}  {p['pause_ms']:>6.1f} ms  {p['faults']:>7}  "
              f"{format_bytes(pages * 4096):>10}  processes/{p['entry']}{flag}")
    print()
    print(f"{'SIZE':>10}  {'DATA':>10}  {'MAPPED BY':>9}  {'HOW':24}  SHARED OBJECT")
    for o in tree.get("shared", []):
        r = regions[o["region"]]
        print(f"{format_bytes(r.length):>10}  {format_bytes(r.data_pages * 4096):>10}  "
              f"{len(o.get('mapped_by', [])):>9}  {o['how'][:24]:24}  shared/{o['entry']} ({o['path']})")
