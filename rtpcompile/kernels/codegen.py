"""Generated modules: named by the hash of their source, verified before every first import.

``load(spec)`` renders the spec, writes ``rtp_<sha256[:24]>.py`` into a directory only the
current user can write (``kernels/`` under ``cache.root()``, the autotune cache's root:
``$RTP_CACHE_DIR`` or the user cache directory; created 0700; for this process a private
temporary directory, with one warning, when that one cannot be used, and without one under
``RTP_CACHE=off`` or ``readonly``, which write nothing under the root), and imports it once per
process. The file's content must still hash to its name when it is imported; a file that does
not (tampered, truncated) is rewritten from the spec, and a directory that another user owns is
refused. The module is executed from the verified text, and that same text is what Triton's
``inspect`` reads (it is placed in ``linecache``), so nothing read later from disk can change
what runs. ``RTP_DUMP_KERNELS=<dir>`` also writes there, for reading, the source of every
kernel launched while it is set, once per directory (a kernel loaded before it was set at its
next launch); a value that is not a directory is a ValueError at the op call
(``options.check_variables``); a directory that cannot be created or written, one warning and
no dump.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import linecache
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path

from . import cache
from .spec import KernelSpec, render

log = logging.getLogger("rtpcompile")

_PREFIX = "rtp_"
_LOADED: dict[tuple[str, bool], types.ModuleType] = {}
_NAMES: dict[KernelSpec, str] = {}  # spec -> module name (the hash of its rendered source)
_LOCK = threading.Lock()
_FALLBACK: dict[str, Path] = {}  # unusable kernel cache -> this process's temporary directory
_FALLBACK_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """What explain() shows for one kernel a call would launch."""

    spec: KernelSpec
    module: str  # rtp_<hash>: the module (and file) name
    digest: str  # full sha256 of the source

    def __str__(self) -> str:
        return f"{self.module}  {self.spec.short()}"


def digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def module_name(source: str) -> str:
    return _PREFIX + digest(source)[:24]


def info(spec: KernelSpec) -> KernelInfo:
    source = render(spec)
    return KernelInfo(spec, module_name(source), digest(source))


def cache_dir() -> Path:
    """The kernel cache directory ``cache.root()/kernels``, created 0700.

    One that cannot be used (a file in the way, not writable, owned by another user) is replaced
    for this process by a private temporary directory, with one warning naming it and the reason.
    With ``RTP_CACHE=off`` or ``readonly`` (nothing is written under the cache root) it is this
    process's own temporary directory, without a warning (``_transient_dir``).
    """
    if cache.mode() != "on":
        return _transient_dir()
    path = cache.kernel_directory()
    try:
        return _private_dir(path)
    except OSError as exc:
        return _fallback_dir(path, exc)


def _private_dir(path: Path) -> Path:
    """``path`` created 0700 when missing; an OSError when this user cannot safely use it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        # NOTE: never import from a directory another user controls, however its mode reads
        raise PermissionError(f"it is owned by uid {st.st_uid}, not by this user ({os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # NOTE: we own it, so tightening is safe; anything already inside is re-verified on import
        path.chmod(0o700)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError("it is not writable")
    return path


def _remove_at_exit(path: Path, owner: int) -> None:
    """Remove a temporary kernel directory at exit, in the process that made it only: a forked
    child inherits the atexit hook, and its exit removed the directory its parent still used."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


_TRANSIENT: list[Path] = []  # RTP_CACHE off / readonly: this process's kernel directory


def _transient_dir() -> Path:
    """A private (0700) temporary directory for this process's kernel modules, removed at exit:
    the modules must be files (Triton reads its kernels' source through ``inspect``), but
    ``RTP_CACHE=off`` / ``readonly`` promise no write to the cache."""
    with _FALLBACK_LOCK:
        if not _TRANSIENT:
            found = Path(tempfile.mkdtemp(prefix="rtpcompile-kernels-"))  # NOTE: mkdtemp: 0700
            atexit.register(_remove_at_exit, found, os.getpid())
            _TRANSIENT.append(found)
            log.debug("rtpcompile: RTP_CACHE=%s: generated kernels go to %s", cache.mode(), found)
        return _TRANSIENT[0]


def _fallback_dir(path: Path, exc: OSError) -> Path:
    with _FALLBACK_LOCK:
        found = _FALLBACK.get(str(path))
        if found is not None:
            return found
        found = Path(tempfile.mkdtemp(prefix="rtpcompile-kernels-"))  # NOTE: mkdtemp: 0700
        atexit.register(_remove_at_exit, found, os.getpid())
        _FALLBACK[str(path)] = found
    message = (
        f"rtpcompile: cannot use the kernel cache {path} ({exc}); generated kernels go to the "
        f"temporary directory {found} for this process (set RTP_CACHE_DIR to a directory you own)"
    )
    log.warning("%s", message)
    warnings.warn(message, RuntimeWarning, stacklevel=cache._user_level())
    return found


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _verified_source(path: Path, source: str, name: str) -> str:
    """The file's text when it hashes to its name; otherwise rewrite it from ``source``."""
    try:
        on_disk = path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        on_disk = None
    if on_disk is not None and module_name(on_disk) == name:
        return on_disk
    _write_atomic(path, source)
    if module_name(path.read_text()) != name:
        raise RuntimeError(f"rtpcompile: generated kernel {path} does not hash to its name")
    return source


_DUMP_WARNED: set[str] = set()
_DUMPED: set[tuple[str, str]] = set()  # (RTP_DUMP_KERNELS value, module name) written


def _dump(target: str, name: str, source: str) -> None:
    """Write ``source`` into ``target`` (``$RTP_DUMP_KERNELS``) for reading, once per value and
    module; a directory that cannot be used is one warning per value and no dump (a debugging
    aid must not stop the kernels)."""
    if target in _DUMP_WARNED:
        return
    _DUMPED.add((target, name))
    try:
        out = Path(target)
        out.mkdir(parents=True, exist_ok=True)
        # NOTE: a new file renamed into place: ``write_text`` followed a link another user put
        # at the predictable name (the docs' example directory is /tmp/rtp-kernels), and
        # overwrote its target with our source; readable as write_text made it
        _write_atomic(out / f"{name}.py", source, 0o666 & ~cache._umask())
    except OSError as exc:
        if target not in _DUMP_WARNED:
            _DUMP_WARNED.add(target)
            message = (
                f"rtpcompile: cannot dump generated kernels into RTP_DUMP_KERNELS={target!r} "
                f"({exc}); the kernels run without being dumped (set it to a writable directory)"
            )
            log.warning("%s", message)
            warnings.warn(message, RuntimeWarning, stacklevel=cache._user_level())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load(spec: KernelSpec) -> types.ModuleType:
    """The imported module of ``spec`` (generated, cached and verified on first use)."""
    # NOTE: the hot path of every launch is two dict lookups: the module name is memoised per
    # spec, so the ~6 KB source is not looked up and sha256-hashed again on every pass
    name = _NAMES.get(spec)
    if name is None:
        name = _NAMES.setdefault(spec, module_name(render(spec)))
    key = (name, _interpreting())
    module = _LOADED.get(key)
    # NOTE: read at every launch, not at the first load only, so a kernel loaded before
    # RTP_DUMP_KERNELS was set is dumped at its next launch (once per value; one more lookup)
    dump = os.environ.get("RTP_DUMP_KERNELS")
    if module is not None:
        if dump and (dump, name) not in _DUMPED:
            _dump(dump, name, render(spec))
        return module
    source = render(spec)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        path = cache_dir() / f"{name}.py"
        try:
            text = _verified_source(path, source, name)
        except OSError as exc:  # e.g. the directory became unwritable or the disk is full
            path = _fallback_dir(path.parent, exc) / f"{name}.py"
            text = _verified_source(path, source, name)
        if dump and (dump, name) not in _DUMPED:
            _dump(dump, name, text)
        # NOTE: Triton reads kernel source through inspect/linecache; pin the verified text there
        # (mtime None: linecache.checkcache never reloads it from disk).
        linecache.cache[str(path)] = (len(text), None, text.splitlines(True), str(path))
        module = types.ModuleType(name)
        module.__file__ = str(path)
        sys.modules[name] = module
        exec(compile(text, str(path), "exec"), module.__dict__)  # noqa: S102 - our own, verified
        _LOADED[key] = module
    return module
