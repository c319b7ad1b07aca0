"""``inspector archive list|show|export``: read a line's failed-frame archive (``inspector.worker.archive``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_NOT_FOUND, EXIT_BAD_INPUT = 0, 1, 2


def add_archive_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("archive", help="read the failed-frame archive a worker keeps ([archive] dir)")
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="archived frames, newest first")
    ls.add_argument("--dir", required=True, help="the archive directory (the line config's [archive] dir)")
    ls.add_argument("--product")
    ls.add_argument("--verdict", choices=("fail", "pass"))
    ls.add_argument("--limit", type=int, default=50, help="most entries listed (default 50; 0: all)")
    ls.add_argument("--json", action="store_true", help="one result header per line")
    show = verbs.add_parser("show", help="one archived frame: its result header and files")
    show.add_argument("--dir", required=True)
    show.add_argument("frame_id")
    ex = verbs.add_parser("export", help="write archived frames to a .tar file")
    ex.add_argument("--dir", required=True)
    ex.add_argument("--out", required=True, help="the .tar file to write")
    ex.add_argument("frame_ids", nargs="*", help="frames to export (default: all)")


def cmd_archive(args: argparse.Namespace) -> int:
    from ..worker.archive import export_entries, find_entry, list_entries

    root = Path(args.dir)
    if not root.is_dir():
        print(f"error: {root} is not an archive directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.verb == "list":
        if args.limit < 0:
            print(f"error: --limit must be >= 0, got {args.limit}", file=sys.stderr)
            return EXIT_BAD_INPUT
        for entry, r in list_entries(root, args.product, args.verdict, args.limit or None):
            if args.json:
                print(json.dumps(r, sort_keys=True))
            else:
                score = "-" if r.get("score") is None else f"{r['score']:.3f}"
                print(f"{entry.name[:20]}  {r.get('frame_id')}  {r.get('verdict')}  {r.get('reason') or '-'}  "
                      f"product {r.get('product') or '-'}  score {score}  threshold {r.get('threshold')}")
        return EXIT_OK
    if args.verb == "show":
        entry = find_entry(root, args.frame_id)
        if entry is None:
            print(f"error: frame {args.frame_id!r} is not in {root}", file=sys.stderr)
            return EXIT_NOT_FOUND
        print(json.dumps(entry.result(), indent=2, sort_keys=True))
        for f in sorted(entry.path.iterdir()):
            print(f"{f}  {f.stat().st_size} bytes")
        return EXIT_OK
    exported = export_entries(root, args.out, args.frame_ids)
    missing = set(args.frame_ids) - set(exported)
    if missing:
        print(f"warning: not in the archive: {', '.join(sorted(missing))}", file=sys.stderr)
    print(f"exported {len(exported)} entries to {args.out}")
    return EXIT_OK if exported or not args.frame_ids else EXIT_NOT_FOUND
