"""The persistent autotune cache: one small JSON file per tuned shape bucket.

Layout: ``<root>/autotune/<id>.json`` where ``root`` is ``$RTP_CACHE_DIR`` (a relative value is
resolved once per process, at its first read) or the user cache directory
(``$XDG_CACHE_HOME/rtpcompile``, ``~/.cache/rtpcompile``, ``~/Library/Caches/...`` on macOS,
``%LOCALAPPDATA%\\rtpcompile\\Cache`` on Windows) and ``id`` hashes the key. A key is a
plain dict: cache format version, implementation source hash, spec, device name and capability,
torch and triton versions, dtype and shape bucket (see ``KEY_FIELDS``). Bumping
``FORMAT_VERSION`` changes every id, so every old entry becomes a miss.

Entries are plain JSON validated on read -- never pickle, never code. A wrong type, a missing or
unknown field, a key that is not the one asked for, a form, chunk size or kernel config the tuner
never writes under that key (``check_value``), or an unreadable file (even one nested too deeply
to parse) is a miss (logged once per file); the next ``store`` rewrites it. A missing directory,
or a file in its place, is a silent miss. Writes go to a temporary file in the same directory
and ``os.replace`` it into place, so concurrent writers never expose a partial entry. A
read-only or unusable directory works without persisting (one RuntimeWarning, at the first
failed write; ``why_not_writable`` asks beforehand).
``RTP_CACHE=off`` disables the cache, ``RTP_CACHE=readonly`` reads without writing; with either,
nothing is written under ``root`` (the generated kernel modules, ``<root>/kernels``, then go to a
private temporary directory of the process, ``codegen.cache_dir``).

This module only imports the standard library (the tests load it in many processes at once).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from .cache_schema import (  # noqa: F401 - re-exported: the schema's names predate its module
    ENTRY_FIELDS,
    FORMS,
    KEY_FIELDS,
    MAX_CHUNK,
    MIN_CHUNK,
    VALUE_FIELDS,
    check_fields,
    check_key,
    check_value,
    value_shape,
)

log = logging.getLogger("rtpcompile")

FORMAT_VERSION = 1
EXPORT_FORMAT = "rtpcompile-autotune"
MODES = ("on", "off", "readonly")
_MODE_ALIASES = {"1": "on", "true": "on", "yes": "on", "": "on", "0": "off", "false": "off",
                 "no": "off", "ro": "readonly"}  # fmt: skip

_TMP_PREFIX = ".tmp-"
# NOTE: what a file written for users (an export) gets, before the umask (0644 under umask 022)
_SHARED_MODE = 0o666

_reported: set[str] = set()  # files / directories already logged or warned about
# NOTE: every store that failed to write (warned once per directory); ``rtpcompile tune`` reads it
write_failures = 0


def mode() -> str:
    """``RTP_CACHE``: "on" (default), "off", or "readonly"."""
    raw = os.environ.get("RTP_CACHE", "on").strip().lower()
    value = _MODE_ALIASES.get(raw, raw)
    if value not in MODES:
        raise ValueError(
            f"environment variable RTP_CACHE must be one of {list(MODES)} (or 1/0), got {raw!r}"
        )
    return value


def root() -> Path:
    """The cache root: ``$RTP_CACHE_DIR`` or the per-user cache directory, always absolute.

    A relative value (of ``RTP_CACHE_DIR``, ``XDG_CACHE_HOME``, ``LOCALAPPDATA``) is resolved
    against the working directory the first time this process reads that value, and kept: an
    ``os.chdir`` later does not move the cache (the autotune entries and the kernel modules stay
    in one directory)."""
    override = os.environ.get("RTP_CACHE_DIR")
    if override:
        return _absolute(override)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return _absolute(base) / "rtpcompile" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "rtpcompile"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return _absolute(base) / "rtpcompile"


_ABSOLUTE: dict[str, Path] = {}  # a relative directory value -> where it was first resolved


def _absolute(raw: str) -> Path:
    """``raw`` with ``~`` expanded; a relative path joined to the working directory of the
    first call with that value (memoised per value, so a later ``os.chdir`` does not split
    the cache over two directories)."""
    try:
        path = Path(raw).expanduser()
    except RuntimeError as exc:  # NOTE: "~nosuchuser/x", or "~" without a home directory
        raise ValueError(f"cannot use {raw!r} as a cache directory: {exc}") from None
    if path.is_absolute():
        return path  # NOTE: not memoised: "~/x" follows HOME, as it always did
    found = _ABSOLUTE.get(raw)
    if found is None:
        found = _ABSOLUTE.setdefault(raw, Path(os.path.abspath(path)))
    return found


def directory() -> Path:
    """Where the autotune entries live: ``root()/autotune``."""
    return root() / "autotune"


KERNELS = "kernels"  # NOTE: the generated modules' directory under root() (kernels/codegen.py)
_GENERATED = re.compile(r"rtp_[0-9a-f]{24}\.py")  # NOTE: codegen's names, rtp_<sha256[:24]>
_LEFTOVER = re.compile(re.escape(_TMP_PREFIX) + r".*\.py")  # an interrupted write's temporary
_ENTRY = re.compile(r"[0-9a-f]{24}\.json")  # NOTE: key_id's names
_ENTRY_LEFTOVER = re.compile(re.escape(_TMP_PREFIX) + r".*\.json")


def kernel_directory() -> Path:
    """Where the generated kernel modules live: ``root()/kernels`` (``codegen.cache_dir``;
    with ``RTP_CACHE`` off or readonly a process writes them to a temporary directory)."""
    return root() / KERNELS


def key_id(key: dict[str, Any]) -> str:
    """A stable file name for ``key``: the sha256 of its canonical JSON, 24 hex digits."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------- validation


def check_entry(entry: Any) -> str | None:
    """None when ``entry`` is a valid cache entry of the current format version, else why not."""
    reason = check_fields(entry, ENTRY_FIELDS, "entry")
    if reason is None:
        reason = check_key(entry["key"]) or check_value(entry["value"], entry["key"])
    if reason is None and entry["key"]["version"] != FORMAT_VERSION:
        reason = f"format version {entry['key']['version']} != {FORMAT_VERSION}"
    return reason


# ----------------------------------------------------------------------------- read / write


def _report_once(tag: str, message: str, *, warn: bool = False) -> None:
    """Log ``message`` once per ``tag``; ``warn``: a RuntimeWarning instead (shown once, not
    twice: the logger's last-resort handler would print the log record too)."""
    if tag in _reported:
        return
    _reported.add(tag)
    if warn:
        log.debug("rtpcompile cache: %s", message)
        # NOTE: a fixed stacklevel pointed into this file: the frames between the user's call
        # and here vary (an op call, a compiled graph, autograd, torch's dispatch)
        warnings.warn(f"rtpcompile cache: {message}", RuntimeWarning, stacklevel=_user_level())
    else:
        log.warning("rtpcompile cache: %s", message)


def _user_level() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller) of the innermost frame outside
    rtpcompile, torch and generated code (torch.fx's, Inductor's, frozen modules): the
    user's line that led here. The outermost frame when there is none (``rtpcompile tune``)."""
    inside = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep]
    torch = sys.modules.get("torch")  # NOTE: not imported here: standard library only
    if getattr(torch, "__file__", None):
        inside.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    # NOTE: sys._getframe(n) here is the caller's stacklevel n (1: the caller, which warns)
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and _internal(frame, inside):
        frame, level = frame.f_back, level + 1
    return level


def _internal(frame, inside: list[str]) -> bool:
    name = frame.f_code.co_filename
    # NOTE: frozen modules (runpy), torch.fx's generated forwards, Inductor's output code
    if name.startswith(("<frozen", "<eval_with_key")) or "torchinductor" in name:
        return True
    module = frame.f_globals.get("__name__") or ""
    return module.partition(".")[0] == "torch" or os.path.abspath(name).startswith(tuple(inside))


def read_file(path: Path) -> dict | None:
    """The validated entry stored at ``path``, or None (missing, unreadable, corrupt)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        # NOTE: NotADirectoryError: a file where the directory should be; a miss like a missing
        # directory, and the first store warns once, naming it
        return None
    except OSError as exc:  # NOTE: not "rewritten": the directory may not be writable either
        _report_once(str(path), f"ignoring unreadable entry {path} ({exc})")
        return None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # NOTE: RecursionError: json nests one Python frame per level ("[[[[..." is valid JSON)
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        _report_once(str(path), f"ignoring corrupt entry {path} ({reason}); it will be rewritten")
        return None
    reason = check_entry(entry)
    if reason is not None:
        _report_once(str(path), f"ignoring invalid entry {path} ({reason}); it will be rewritten")
        return None
    return entry


def load(key: dict[str, Any]) -> dict | None:
    """The stored value for ``key``, or None on a miss (or when the cache is off)."""
    if mode() == "off":
        return None
    entry = read_file(directory() / f"{key_id(key)}.json")
    if entry is None or entry["key"] != key:
        return None
    return entry["value"]


def _write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place; ``mode``
    None keeps mkstemp's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".json", dir=path.parent)
    try:
        if mode is not None:
            os.chmod(tmp, mode)  # NOTE: not fchmod, which Windows lacks before Python 3.13
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store(key: dict[str, Any], value: dict[str, Any]) -> bool:
    """Persist ``value`` under ``key``; False when the cache is off, read-only or unusable.

    A malformed key or value (a missing field, a wrong type) is a ValueError; a well-formed value
    the tuner would never choose (``check_value``) is stored, and read back as a miss.
    """
    # NOTE: tests plant such entries through store() to check that readers reject them
    reason = check_key(key) or value_shape(value)
    if reason is not None:
        raise ValueError(f"refusing to store an invalid cache entry: {reason}")
    if mode() != "on":
        return False
    entry = {"key": key, "value": value, "created": time.time()}
    return _persist(directory() / f"{key_id(key)}.json", entry)


def why_not_writable() -> str | None:
    """None when ``store`` can persist entries now, else why not: the mode, or the directory
    and the OS error (``rtpcompile tune`` checks before benchmarking). Creates the directory
    and leaves no file in it."""
    if mode() != "on":
        return f"RTP_CACHE={mode()!r} never writes the cache (unset it or set it to 'on')"
    try:
        directory().mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".json", dir=directory())
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"cannot write to {directory()} ({exc})"
    return None


def _persist(path: Path, entry: dict) -> bool:
    global write_failures
    try:
        _write_atomic(path, json.dumps(entry, sort_keys=True, indent=1))
    except OSError as exc:
        write_failures += 1
        where = path if path.is_dir() else path.parent  # NOTE: a directory in the entry's place
        _report_once(
            f"dir:{where}",
            f"cannot write to {where} ({exc}); tuned plans are kept in memory only",
            warn=True,
        )
        return False
    return True


# ----------------------------------------------------------------------------- management


def entries() -> list[tuple[str, Path, dict | None]]:
    """Every entry file as (id, path, entry or None when invalid), sorted by id."""
    d = directory()
    if not d.is_dir():
        return []
    found = []
    for path in sorted(d.glob("*.json")):
        if not path.name.startswith(_TMP_PREFIX):
            found.append((path.stem, path, read_file(path)))
    return found


def find(prefix: str) -> list[tuple[str, Path, dict | None]]:
    """Entries whose id starts with ``prefix``."""
    return [e for e in entries() if e[0].startswith(prefix)]


def clear() -> int:
    """Delete every entry (a ``<24 hex digits>.json``, or a file that reads as an entry under
    another name) and leftover temporary file; returns how many files were removed. Anything
    else there is left alone (until 2026-11-25 every ``*.json``: an ``autotune`` directory
    linked to a project lost its ``package.json``).

    Refused unless the cache is writable ``RTP_CACHE=on``, like ``import_entries``: readonly
    means no write, and deleting is one."""
    if mode() != "on":
        raise ValueError(f"cannot clear with RTP_CACHE={mode()!r}; the cache must be 'on'")
    d = directory()
    removed = 0
    if d.is_dir():
        for path in d.glob("*.json"):
            named = _ENTRY.fullmatch(path.name) or _ENTRY_LEFTOVER.fullmatch(path.name)
            if not named and not _reads_as_entry(path):
                continue
            if path.is_dir() and not path.is_symlink():
                log.warning("rtpcompile cache: %s is a directory, not an entry: left alone", path)
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    _reported.clear()
    return removed


def _reads_as_entry(path: Path) -> bool:
    """A regular file holding a valid entry (one stored under another name), read quietly:
    ``read_file`` would log another JSON file as an invalid entry "to be rewritten"."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        return check_entry(json.loads(path.read_text(encoding="utf-8"))) is None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False


def clear_kernels() -> int:
    """Delete the generated kernel modules (``rtp_<24 hex digits>.py``) and leftover temporary
    files of ``kernel_directory()``; returns how many files were removed. Anything else there is
    left alone. Refused unless ``RTP_CACHE=on``, like ``clear``.

    Safe while other processes run: each runs its kernels from verified text it holds, and the
    next process to need one writes it again (one writing a module at that very moment may
    lose it and fall back, with one warning, to a temporary directory)."""
    if mode() != "on":
        raise ValueError(f"cannot clear with RTP_CACHE={mode()!r}; the cache must be 'on'")
    d = kernel_directory()
    removed = 0
    if d.is_dir():
        for path in d.iterdir():
            # NOTE: a user's file that merely starts with rtp_ is not a generated module
            ours = _GENERATED.fullmatch(path.name) or _LEFTOVER.fullmatch(path.name)
            # NOTE: is_dir follows links; a link (to anything) is only unlinked, not followed
            if not ours or (path.is_dir() and not path.is_symlink()):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def export_entries(path: str | os.PathLike) -> int:
    """Write every valid entry to one JSON file (to ship tuned configs with a model).

    ``path`` "-" is stdout. A symlink of this user's is written through (its target is replaced
    atomically; another user's link is refused); an
    existing file that is not a regular one (a fifo, a device, ``/dev/stdout``) is written
    directly; a new file gets 0666 less the umask (0644 usually), an existing one keeps its mode.
    """
    valid = [entry for _, _, entry in entries() if entry is not None]
    doc = {"format": EXPORT_FORMAT, "version": FORMAT_VERSION, "entries": valid}
    text = json.dumps(doc, sort_keys=True, indent=1) + "\n"
    if os.fspath(path) == "-":
        if sys.stdout is None:  # NOTE: the process was started with its stdout closed
            raise OSError(errno.EBADF, "standard output is closed")
        sys.stdout.write(text)
        sys.stdout.flush()
        return len(valid)
    target = Path(path)
    if target.is_symlink() and hasattr(os, "getuid") and target.lstat().st_uid != os.getuid():
        # NOTE: like the kernel's protected_symlinks: a link another user planted (in /tmp, say)
        # must not redirect our write onto a file of ours
        raise PermissionError(
            f"cache export: {target} is a symlink owned by uid {target.lstat().st_uid}, not by "
            "this user; refusing to write through it"
        )
    try:
        st = target.stat()  # NOTE: follows symlinks: the file the user means
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(target, "w", encoding="utf-8") as f:  # NOTE: a device cannot be renamed onto
            f.write(text)
        return len(valid)
    mode = stat.S_IMODE(st.st_mode) if st is not None else _SHARED_MODE & ~_umask()
    _write_atomic(target.resolve(), text, mode)
    return len(valid)


def _umask() -> int:
    """The process umask: from /proc on Linux, else by setting it and restoring it at once."""
    # NOTE: os.umask has no read-only form; /proc avoids changing it under other threads
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def import_entries(path: str | os.PathLike) -> tuple[int, int]:
    """Store every valid entry of an exported file; returns (imported, skipped).

    A file that is not an export is a ValueError; a cache directory that cannot be written is an
    OSError naming it.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an rtpcompile autotune export (format {EXPORT_FORMAT!r})")
    if not isinstance(doc.get("entries"), list):
        raise ValueError(f"{path}: 'entries' must be a list")
    if mode() != "on":
        raise ValueError(f"cannot import with RTP_CACHE={mode()!r}; the cache must be 'on'")
    imported = skipped = 0
    for entry in doc["entries"]:
        reason = check_entry(entry)
        if reason is not None:
            log.warning("rtpcompile cache: skipping imported entry (%s)", reason)
            skipped += 1
            continue
        target = directory() / f"{key_id(entry['key'])}.json"
        try:
            _write_atomic(target, json.dumps(entry, sort_keys=True, indent=1))
        except OSError as exc:
            raise OSError(f"cannot write to the cache directory {directory()} ({exc})") from None
        imported += 1
    return imported, skipped
