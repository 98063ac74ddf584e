"""``snapfs rm``, ``snapfs gc`` and ``snapfs check``: keeping the store tidy and verified."""

from __future__ import annotations

import argparse
import json
from typing import Any

from snapfs.commands.common import add_store_argument, store_path
from snapfs.errors import StoreCorrupt
from snapfs.units import count_of, format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rm``, ``gc`` and ``check`` commands."""
    p = subparsers.add_parser(
        "rm", help="remove snapshots (then reclaim their space)",
        description="Remove the named snapshots (all of them, or none if one name is unknown), "
        "then reclaim the space no other snapshot uses. Children of a removed snapshot stay "
        "complete and readable: they keep the pages they share with it; `list` then shows their "
        "nearest remaining ancestor as parent and names the removed ones.")
    add_store_argument(p)
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=run_rm)
    p = subparsers.add_parser(
        "gc", help="reclaim space no snapshot references (safe while in use)",
        description="Reclaim store space no committed snapshot references: frames and segments "
        "left by removed snapshots and by captures that died unfinished. Captures in progress are "
        "left alone: safe to run while snapshots are taken or read.")
    add_store_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_gc)
    p = subparsers.add_parser(
        "check", help="verify the store; exit 0 when clean",
        description="Verify the store: the catalog and every snapshot, region, hash and blob row "
        "against its checksum, every page map (structure and references), the segments and the "
        "frame index; with --verify-data also every referenced frame's checksum (reads the whole "
        "store). Prints each problem and the regions it affects, and what `snapfs gc` could "
        "reclaim. Exit 0 when clean, 6 when damaged.")
    add_store_argument(p)
    p.add_argument("--verify-data", action="store_true", help="also read and checksum every frame")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_check)


def _gc_summary(result: dict[str, Any]) -> str:
    parts = [f"reclaimed {format_bytes(result['bytes_reclaimed'])}"]
    detail = []
    if result["segments_deleted"]:
        detail.append(f"{count_of(result['segments_deleted'], 'segment')} deleted")
    if result["frames_freed"]:
        detail.append(f"{count_of(result['frames_freed'], 'frame')} freed")
    if result["pending_removed"]:
        detail.append(f"{count_of(len(result['pending_removed']), 'unfinished snapshot')} removed")
    if result["live_writers"]:
        detail.append(f"{count_of(result['live_writers'], 'capture')} in progress left alone")
    return parts[0] + (f" ({', '.join(detail)})" if detail else "")


def run_rm(args: argparse.Namespace) -> int:
    """Remove the named snapshots (all or none), then reclaim space."""
    from snapfs.store import Store  # lazily: see catalog.py

    with Store.open(store_path(args), create=False) as store:
        store.remove(args.names)
        result = store.gc()
    print(f"removed {', '.join(args.names)}; {_gc_summary(result)}")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    """Reclaim unreferenced space and report how much."""
    from snapfs.store import Store  # lazily: see catalog.py

    with Store.open(store_path(args), create=False) as store:
        result = store.gc()
    print(json.dumps(result, indent=2) if args.json else _gc_summary(result))
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Check the store; print what is damaged; exit 0 when clean, StoreCorrupt's code otherwise."""
    path = store_path(args)
    try:
        from snapfs.store import Store  # lazily: see catalog.py

        with Store.open(path, create=False) as store:
            report = store.check(verify_data=args.verify_data)
    except StoreCorrupt as exc:
        report = {"ok": False, "problems": [{"what": "catalog", "message": str(exc)}],
                  "snapshots": None, "regions": None, "frames": None, "frames_verified": 0, "garbage": {}}
    if args.json:
        print(json.dumps({"store": str(path), **report}, indent=2))
    else:
        what = f"{count_of(report['snapshots'], 'snapshot')}, {count_of(report['frames'], 'frame')}" if report["snapshots"] is not None else "catalog"
        if args.verify_data:
            what += f", {count_of(report['frames_verified'], 'frame')} verified"
        for note in report.get("notes", []):
            print(f"note: {note}")
        if report["ok"]:
            print(f"store {path}: {what}: OK")
        else:
            print(f"store {path}: {what}: {count_of(len(report['problems']), 'problem')}")
            for p in report["problems"]:
                affected = f" [affects {', '.join(p['regions'])}]" if p.get("regions") else ""
                print(f"  {p['what']}: {p['message']}{affected}")
        g = report.get("garbage") or {}
        junk = [count_of(len(g['dead_pending']), 'unfinished snapshot') if g.get("dead_pending") else "",
                count_of(len(g['unreferenced_segments']) + len(g['orphan_segment_files']), 'unreferenced segment')
                if g.get("unreferenced_segments") or g.get("orphan_segment_files") else "",
                count_of(g['unreferenced_frames'], 'unreferenced frame') if g.get("unreferenced_frames") else ""]
        junk = [j for j in junk if j]
        if junk:
            print(f"reclaimable by `snapfs gc`: {', '.join(junk)}")
    return 0 if report["ok"] else StoreCorrupt.exit_code
