"""``rtpcompile cache``: inspect and manage the persistent autotune cache.

rtpcompile cache path            where entries live (RTP_CACHE_DIR overrides)
rtpcompile cache list [--json]   one line per entry: id, shape bucket, winner
rtpcompile cache show KEY        the full entry (KEY: an id or a unique id prefix)
rtpcompile cache clear           delete every entry
rtpcompile cache export FILE     every valid entry in one JSON file, to ship with a model
rtpcompile cache import FILE     store the valid entries of an exported file
"""

from __future__ import annotations

import argparse
import json
import sys

from ..kernels import cache


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="inspect or manage the persistent autotune cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("path", help="print the cache directory").set_defaults(func=_path)
    listing = actions.add_parser("list", help="list entries")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_list)
    show = actions.add_parser("show", help="print one entry")
    show.add_argument("key", help="entry id or a unique prefix of it")
    show.set_defaults(func=_show)
    actions.add_parser("clear", help="delete every entry").set_defaults(func=_clear)
    export = actions.add_parser("export", help="write every valid entry to FILE")
    export.add_argument("file")
    export.set_defaults(func=_export)
    imp = actions.add_parser("import", help="store the valid entries of FILE")
    imp.add_argument("file")
    imp.set_defaults(func=_import)


def _path(args) -> int:
    print(cache.directory())
    return 0


def summary(entry: dict) -> str:
    """``B*H<=8 T<=512 K=64 V=64 float32 fwd -> chunkwise(C=64)[BV=64,...] 2.7 ms``."""
    key, value = entry["key"], entry["value"]
    spec, bucket = key["spec"], key["bucket"]
    bh, t = bucket.get("BH", "?"), bucket.get("T", "?")
    state = " state" if spec.get("state_in") else ""
    winner = value["form"] + (f"(C={value['chunk_size']})" if value["form"] == "chunkwise" else "")
    if value.get("config"):
        winner += "[" + ",".join(f"{k}={v}" for k, v in sorted(value["config"].items())) + "]"
    ms = "" if value["time_ms"] is None else f" {value['time_ms']:.3g} ms"
    return (
        f"B*H<={bh} T<={t} K={spec.get('K')} V={spec.get('V')} {key['dtype']} "
        f"{spec.get('phase')}{state} {spec.get('backend')} on {key['device']} -> {winner}{ms}"
    )


def _list(args) -> int:
    found = cache.entries()
    if args.json:
        print(json.dumps([{"id": i, "entry": e} for i, _, e in found], indent=1))
        return 0
    if not found:
        print(f"no entries in {cache.directory()}")
    for entry_id, _, entry in found:
        print(f"{entry_id}  {'<invalid entry: ignored>' if entry is None else summary(entry)}")
    return 0


def _show(args) -> int:
    found = cache.find(args.key)
    if len(found) != 1:
        what = "no entry" if not found else f"{len(found)} entries"
        print(f"{what} matches {args.key!r} in {cache.directory()}", file=sys.stderr)
        return 1
    entry_id, path, entry = found[0]
    if entry is None:
        print(f"{path} is not a valid entry (ignored by the planner)", file=sys.stderr)
        return 1
    print(json.dumps({"id": entry_id, "path": str(path), **entry}, indent=1, sort_keys=True))
    return 0


def _clear(args) -> int:
    removed = cache.clear()
    print(f"removed {removed} file(s) from {cache.directory()}")
    return 0


def _export(args) -> int:
    count = cache.export_entries(args.file)
    print(f"exported {count} entr{'y' if count == 1 else 'ies'} to {args.file}")
    return 0


def _import(args) -> int:
    try:
        imported, skipped = cache.import_entries(args.file)
    except (OSError, ValueError) as exc:
        print(f"rtpcompile cache import: {exc}", file=sys.stderr)
        return 1
    print(f"imported {imported} entr{'y' if imported == 1 else 'ies'}, skipped {skipped}")
    return 0
