"""``rtpcompile cache``: inspect and manage the persistent autotune cache.

rtpcompile cache path            where entries live (RTP_CACHE_DIR overrides)
rtpcompile cache list [--json]   one line per entry: id, shape bucket, winner; "(stale: ...)"
                                 after an entry this installation's planner never reads
rtpcompile cache show KEY        the full entry (KEY: an id or a unique id prefix)
rtpcompile cache clear           delete every entry, and the generated kernel modules in
                                 kernels/ beside autotune/ (--entries-only: keep those)
rtpcompile cache export FILE     every valid entry in one JSON file, to ship with a model
                                 (FILE "-": stdout; a symlink is written through), stale ones
                                 included: the count says how many
rtpcompile cache import FILE     store the valid entries of an exported file

A stale entry was tuned with another rtpcompile source (its implementation hash), torch or
triton version than this installation's, or is stored under another file name than its key's
id: the planner here never reads it (``tune --force`` or ``cache clear`` replaces it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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
    clear = actions.add_parser(
        "clear", help="delete every entry and the generated kernel modules beside them"
    )
    clear.add_argument(
        "--entries-only",
        action="store_true",
        help="delete the autotune entries only, keeping the generated kernel modules",
    )
    clear.set_defaults(func=_checked(_clear))
    export = actions.add_parser(
        "export",
        help="write every valid entry to FILE, stale ones (see list) included: the count says "
        "how many",
    )
    export.add_argument("file")
    export.set_defaults(func=_checked(_export))
    imp = actions.add_parser("import", help="store the valid entries of FILE")
    imp.add_argument("file")
    imp.set_defaults(func=_checked(_import))


def _checked(action):
    """``action`` run after ``RTP_CACHE`` and ``RTP_CACHE_DIR`` validated: a bad value is an
    error like any option's."""

    def run(args) -> int:
        try:
            cache.mode()
            cache.root()
        except ValueError as exc:
            print(f"rtpcompile cache: error: {exc}", file=sys.stderr)
            return 2
        return action(args)

    run.__doc__ = action.__doc__
    return run


def _path(args) -> int:
    print(cache.directory())
    return 0


def summary(entry: dict, tags: Sequence[str] = ()) -> str:
    """``B*H<=8 T<=512 K=64 V=64 float32 fwd triton on NAME -> chunkwise(C=64)[BV=64,...] 2.7 ms``.

    After the phase: "state" (a state comes in), "no-state-out" (the forward returns none),
    "request=FORM" / "chunk=C" (what the call forced); on CPU the device gets its thread count
    ("on NAME, 2 threads"). ``tags``: more key fields to show in brackets after the device, as
    ``_field_paths`` names them ("torch", "source", "spec.op", ...); ``summaries`` adds those
    that tell apart entries whose keys would otherwise read the same.
    """
    value = entry["value"]
    winner = value["form"] + (f"(C={value['chunk_size']})" if value["form"] == "chunkwise" else "")
    if value.get("config"):
        winner += "[" + ",".join(f"{k}={v}" for k, v in sorted(value["config"].items())) + "]"
    ms = "" if value["time_ms"] is None else f" {value['time_ms']:.3g} ms"
    return f"{_key_text(entry['key'], tags)} -> {winner}{ms}"


def _key_text(key: dict, tags: Sequence[str] = ()) -> str:
    """The part of ``summary`` before the winner: what the entry was tuned for."""
    spec, bucket = key["spec"], key["bucket"]
    bh, t = bucket.get("BH", "?"), bucket.get("T", "?")
    state = " state" if spec.get("state_in") else ""
    if spec.get("state_out") is False:
        state += " no-state-out"
    if spec.get("request", "auto") != "auto":
        state += f" request={spec['request']}"
    if spec.get("chunk"):
        state += f" chunk={spec['chunk']}"
    device = key["device"]
    threads = _cpu_threads(key)
    if threads is not None:
        device += f", {threads} thread{'' if threads == 1 else 's'}"
    extra = [_tag(path, _field(key, path)) for path in tags]
    if extra:
        device += " [" + ", ".join(extra) + "]"
    return (
        f"B*H<={bh} T<={t} K={spec.get('K')} V={spec.get('V')} {key['dtype']} "
        f"{spec.get('phase')}{state} {spec.get('backend')} on {device}"
    )


def summaries(found: Sequence[dict]) -> list[str]:
    """``summary`` of each entry. Entries whose keys would read the same (they differ in a key
    field the line leaves out: the torch or triton version, the source hash, the capability, a
    spec field) get the fields they differ in as tags, so that no two entries read the same."""
    groups: dict[str, list[int]] = {}
    for i, entry in enumerate(found):
        groups.setdefault(_key_text(entry["key"]), []).append(i)
    tags: list[list[str]] = [[] for _ in found]
    for members in groups.values():
        if len(members) < 2:
            continue
        paths = sorted({path for i in members for path in _field_paths(found[i]["key"])})
        differ = [
            path
            for path in paths
            if len({json.dumps(_field(found[i]["key"], path)) for i in members}) > 1
        ]
        differ.sort(key=lambda path: (_TAG_ORDER.get(path, len(_TAG_ORDER)), path))
        for i in members:
            tags[i] = differ
    return [summary(entry, tag) for entry, tag in zip(found, tags, strict=True)]


# NOTE: the usual reasons two entries read the same first (another torch, an edited source)
_TAG_ORDER = {"torch": 0, "triton": 1, "source": 2, "capability": 3, "version": 4}


def _field_paths(key: dict) -> list[str]:
    """Every field of ``key``: top-level names, and "spec.NAME" / "bucket.NAME" inside those."""
    paths = []
    for name, value in key.items():
        if isinstance(value, dict):
            paths += [f"{name}.{inner}" for inner in value]
        else:
            paths.append(name)
    return paths


def _field(key: dict, path: str):
    """The value of one ``_field_paths`` name in ``key`` (None when it has no such field)."""
    outer, _, inner = path.partition(".")
    value = key.get(outer)
    if inner:
        return value.get(inner) if isinstance(value, dict) else None
    return value


def _tag(path: str, value) -> str:
    if path == "source" and isinstance(value, str):
        return f"source {value[:8]}"  # NOTE: a short hash, like git's
    if path in ("torch", "triton", "capability"):
        return f"{path} {value}"
    return f"{path}={json.dumps(value)}"


def _cpu_threads(key: dict) -> int | None:
    """The thread count a CPU entry was tuned with (its capability "ISA/Nthreads"), else None."""
    capability = key.get("capability")
    if not isinstance(capability, str) or not capability.endswith("threads"):
        return None
    count = capability.rpartition("/")[2].removesuffix("threads")
    return int(count) if count.isdigit() else None


def stale(entry_id: str, key: dict) -> str | None:
    """Why this installation's planner never reads the entry ``entry_id`` with ``key`` (it was
    tuned with another rtpcompile source, torch or triton version, or its file name is not its
    key's id), or None when it can be read. Another device or thread count is not stale: the
    entry is for another machine or setting, and is read there."""
    import torch

    from ..lowering import plan

    why = []
    backend = key["spec"].get("backend")
    if backend not in ("aten", "triton") or key["source"] != plan.source_hash(backend):
        why.append("other rtpcompile source")
    if key["torch"] != torch.__version__:
        why.append("other torch")
    if key["triton"] != plan._triton_version():
        why.append("other triton")
    if entry_id != cache.key_id(key):
        why.append("file name is not its key's id")
    return ", ".join(why) or None


def _list(args) -> int:
    found = cache.entries()
    if args.json:
        rows = [
            {"id": i, "entry": e, "stale": None if e is None else stale(i, e["key"])}
            for i, _, e in found
        ]
        print(json.dumps(rows, indent=1))
        return 0
    if not found:
        print(f"no entries in {cache.directory()}")
    valid = [entry for _, _, entry in found if entry is not None]
    lines = iter(summaries(valid))
    for entry_id, _, entry in found:
        if entry is None:
            print(f"{entry_id}  <invalid entry: ignored>")
            continue
        why = stale(entry_id, entry["key"])
        print(f"{entry_id}  {next(lines)}" + (f"  (stale: {why})" if why else ""))
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
    entries_only = getattr(args, "entries_only", False)
    try:
        removed = cache.clear()
        modules = 0 if entries_only else cache.clear_kernels()
    except (OSError, ValueError) as exc:
        print(f"rtpcompile cache clear: {exc}", file=sys.stderr)
        return 1
    line = f"removed {removed} file(s) from {cache.directory()}"
    if not entries_only:
        line += f" and {modules} generated kernel module(s) from {cache.kernel_directory()}"
    print(line)
    return 0


def _export(args) -> int:
    # NOTE: counted before the export, which reads the same files; export_entries has no filter
    old = sum(e is not None and stale(i, e["key"]) is not None for i, _, e in cache.entries())
    try:
        count = cache.export_entries(args.file)
    except OSError as exc:
        print(f"rtpcompile cache export: cannot write {args.file!r} ({exc})", file=sys.stderr)
        return 1
    # NOTE: with FILE "-" the entries went to stdout; the count goes to stderr
    where = "stdout" if args.file == "-" else args.file
    out = sys.stderr if args.file == "-" else sys.stdout
    note = ""
    if old:
        note = f" ({old} stale: never read by this installation's planner, see cache list)"
    print(f"exported {count} entr{'y' if count == 1 else 'ies'} to {where}{note}", file=out)
    return 0


def _import(args) -> int:
    try:
        imported, skipped = cache.import_entries(args.file)
    except (OSError, ValueError) as exc:
        print(f"rtpcompile cache import: {exc}", file=sys.stderr)
        return 1
    print(f"imported {imported} entr{'y' if imported == 1 else 'ies'}, skipped {skipped}")
    return 0
