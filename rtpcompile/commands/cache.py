"""``rtpcompile cache``: inspect and manage the persistent autotune cache.

rtpcompile cache path            where entries live (RTP_CACHE_DIR overrides)
rtpcompile cache list [--json]   one line per entry: id, shape bucket, winner
rtpcompile cache show KEY        the full entry (KEY: an id or a unique id prefix)
rtpcompile cache clear           delete every entry
rtpcompile cache export FILE     every valid entry in one JSON file, to ship with a model
                                 (FILE "-": stdout; a symlink is written through)
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
    actions.add_parser("path", help="print the cache directory").set_defaults(func=_checked(_path))
    listing = actions.add_parser("list", help="list entries")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_checked(_list))
    show = actions.add_parser("show", help="print one entry")
    show.add_argument("key", help="entry id or a unique prefix of it")
    show.set_defaults(func=_checked(_show))
    actions.add_parser("clear", help="delete every entry").set_defaults(func=_checked(_clear))
    export = actions.add_parser("export", help="write every valid entry to FILE")
    export.add_argument("file")
    export.set_defaults(func=_checked(_export))
    imp = actions.add_parser("import", help="store the valid entries of FILE")
    imp.add_argument("file")
    imp.set_defaults(func=_checked(_import))


def _checked(action):
    """``action`` run after ``RTP_CACHE`` validated: a bad value is an error like any option's."""

    def run(args) -> int:
        try:
            cache.mode()
        except ValueError as exc:
            print(f"rtpcompile cache: error: {exc}", file=sys.stderr)
            return 2
        return action(args)

    run.__doc__ = action.__doc__
    return run


def _path(args) -> int:
    print(cache.directory())
    return 0


def summary(entry: dict) -> str:
    """``B*H<=8 T<=512 K=64 V=64 float32 fwd triton on NAME -> chunkwise(C=64)[BV=64,...] 2.7 ms``.

    After the phase: "state" (a state comes in), "no-state-out" (the forward returns none),
    "request=FORM" / "chunk=C" (what the call forced), so that no two entries read the same.
    """
    key, value = entry["key"], entry["value"]
    spec, bucket = key["spec"], key["bucket"]
    bh, t = bucket.get("BH", "?"), bucket.get("T", "?")
    state = " state" if spec.get("state_in") else ""
    if spec.get("state_out") is False:
        state += " no-state-out"
    if spec.get("request", "auto") != "auto":
        state += f" request={spec['request']}"
    if spec.get("chunk"):
        state += f" chunk={spec['chunk']}"
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
        verb = "matches" if len(found) < 2 else "match"
        print(f"{what} {verb} {args.key!r} in {cache.directory()}", file=sys.stderr)
        return 1
    entry_id, path, entry = found[0]
    if entry is None:
        print(f"{path} is not a valid entry (ignored by the planner)", file=sys.stderr)
        return 1
    print(json.dumps({"id": entry_id, "path": str(path), **entry}, indent=1, sort_keys=True))
    return 0


def _clear(args) -> int:
    try:
        removed = cache.clear()
    except (OSError, ValueError) as exc:
        print(f"rtpcompile cache clear: {exc}", file=sys.stderr)
        return 1
    print(f"removed {removed} file(s) from {cache.directory()}")
    return 0


def _export(args) -> int:
    try:
        count = cache.export_entries(args.file)
    except OSError as exc:
        print(f"rtpcompile cache export: cannot write {args.file!r} ({exc})", file=sys.stderr)
        return 1
    # NOTE: with FILE "-" the entries went to stdout; the count goes to stderr
    where = "stdout" if args.file == "-" else args.file
    out = sys.stderr if args.file == "-" else sys.stdout
    print(f"exported {count} entr{'y' if count == 1 else 'ies'} to {where}", file=out)
    return 0


def _import(args) -> int:
    try:
        imported, skipped = cache.import_entries(args.file)
    except (OSError, ValueError) as exc:
        print(f"rtpcompile cache import: {exc}", file=sys.stderr)
        return 1
    print(f"imported {imported} entr{'y' if imported == 1 else 'ies'}, skipped {skipped}")
    return 0
