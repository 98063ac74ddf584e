"""``snapfs rm``, ``snapfs gc`` and ``snapfs check``: keeping the store tidy and verified."""

from __future__ import annotations

import argparse
import json
from typing import Any

from snapfs.commands.common import add_store_argument, store_path
from snapfs.errors import StoreCorrupt
from snapfs.units import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rm``, ``gc`` and ``check`` commands."""
    p = subparsers.add_parser("rm", help="remove snapshots (then reclaim their space)")
    add_store_argument(p)
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=run_rm)
    p = subparsers.add_parser("gc", help="reclaim space no snapshot references (safe while in use)")
    add_store_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_gc)
    p = subparsers.add_parser("check", help="verify the store; exit 0 when clean")
    add_store_argument(p)
    p.add_argument("--verify-data", action="store_true", help="also read and checksum every frame")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_check)


def _gc_summary(result: dict[str, Any]) -> str:
    parts = [f"reclaimed {format_bytes(result['bytes_reclaimed'])}"]
    detail = []
    if result["segments_deleted"]:
        detail.append(f"{result['segments_deleted']} segments deleted")
    if result["frames_freed"]:
        detail.append(f"{result['frames_freed']} frames freed")
    if result["pending_removed"]:
        detail.append(f"{len(result['pending_removed'])} unfinished snapshots removed")
    if result["live_writers"]:
        detail.append(f"{result['live_writers']} captures in progress left alone")
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
        what = f"{report['snapshots']} snapshots, {report['frames']} frames" if report["snapshots"] is not None else "catalog"
        if args.verify_data:
            what += f", {report['frames_verified']} frames verified"
        for note in report.get("notes", []):
            print(f"note: {note}")
        if report["ok"]:
            print(f"store {path}: {what}: OK")
        else:
            print(f"store {path}: {what}: {len(report['problems'])} problems")
            for p in report["problems"]:
                affected = f" [affects {', '.join(p['regions'])}]" if p.get("regions") else ""
                print(f"  {p['what']}: {p['message']}{affected}")
        g = report.get("garbage") or {}
        junk = [f"{len(g['dead_pending'])} unfinished snapshots" if g.get("dead_pending") else "",
                f"{len(g['unreferenced_segments']) + len(g['orphan_segment_files'])} unreferenced segments"
                if g.get("unreferenced_segments") or g.get("orphan_segment_files") else "",
                f"{g['unreferenced_frames']} unreferenced frames" if g.get("unreferenced_frames") else ""]
        junk = [j for j in junk if j]
        if junk:
            print(f"reclaimable by `snapfs gc`: {', '.join(junk)}")
    return 0 if report["ok"] else StoreCorrupt.exit_code
