"""What a valid autotune cache entry holds: its fields, their JSON types and allowed values.

Standard library only, like ``cache`` (the tests load it in many processes at once). An entry is
``{"key": ..., "value": ..., "created": ...}``; ``check_key`` and ``check_value`` say why a key
or a tuning result is unusable (None when it is fine), and ``cache.check_entry`` adds the format
version, which lives with the reader.
"""

from __future__ import annotations

from typing import Any

FORMS = ("parallel", "chunkwise", "recurrent")

# field -> allowed JSON types; a key or entry with any other field is a miss
KEY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "version": int,
    "source": str,
    "spec": dict,
    "device": str,
    "capability": str,
    "torch": str,
    "triton": str,
    "dtype": str,
    "bucket": dict,
}
VALUE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "form": str,
    "chunk_size": int,
    "config": dict,
    "time_ms": (float, int, type(None)),
    "timings": dict,
}
ENTRY_FIELDS: dict[str, type | tuple[type, ...]] = {"key": dict, "value": dict, "created": float}
# NOTE: the chunk sizes the tuner tries (lowering/tune.py CHUNKS, TRITON_CHUNKS: powers of two in
# [16, 256]); under a key that forces a chunk (key.spec.chunk, any positive size) it writes that
# chunk and no other
MIN_CHUNK = 16
MAX_CHUNK = 256
# NOTE: what the tuner writes for a parallel winner when no chunk is forced (plan.DEFAULT_CHUNK;
# this module cannot import plan, which needs torch; tests/test_cache_files.py checks they agree)
PARALLEL_CHUNK = 64
# the forms the tuner compares under a key that forces none (tune.candidates): recurrent is only
# ever a rule (decoding) or forced, never tuned or stored
TUNED_FORMS = ("parallel", "chunkwise")


def check_fields(obj: Any, fields: dict, what: str) -> str | None:
    if not isinstance(obj, dict):
        return f"{what} is {type(obj).__name__}, expected an object"
    missing = sorted(set(fields) - set(obj))
    unknown = sorted(set(obj) - set(fields))
    if missing or unknown:
        return f"{what} has missing fields {missing} / unknown fields {unknown}"
    for name, kinds in fields.items():
        value = obj[name]
        # NOTE: bool is an int subclass in Python; a JSON true is never a valid number here.
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"{what}.{name} is {type(value).__name__}"
    return None


def _scalar_map(obj: dict, what: str, kinds: tuple[type, ...]) -> str | None:
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, kinds):
            return f"{what}[{name!r}] is {type(value).__name__}"
    return None


def check_key(key: Any) -> str | None:
    """None when ``key`` is a well-formed cache key, else why not."""
    reason = check_fields(key, KEY_FIELDS, "key")
    if reason is None:
        reason = _scalar_map(key["spec"], "key.spec", (str, int, bool))
    if reason is None and not all(type(v) is int for v in key["bucket"].values()):
        reason = "key.bucket values must be integers"
    return reason


def value_shape(value: Any) -> str | None:
    """None when ``value`` has the fields and types of a tuning result, else why not."""
    reason = check_fields(value, VALUE_FIELDS, "value")
    if reason is not None:
        return reason
    if value["form"] not in FORMS:
        return f"value.form {value['form']!r} is not one of {list(FORMS)}"
    if value["chunk_size"] < 0:
        return f"value.chunk_size {value['chunk_size']} is negative"
    if not all(isinstance(k, str) and type(v) is int for k, v in value["config"].items()):
        return "value.config must map names to integers"
    return _scalar_map(value["timings"], "value.timings", (float, int, type(None)))


def check_value(value: Any, key: dict[str, Any] | None = None) -> str | None:
    """None when ``value`` is a usable tuning result (for ``key`` when given), else why not.

    Beyond its shape, for ``key`` it must be a result the tuner could have stored under that key
    (``lowering/tune.py``, ``candidates``): the form the key forces (its spec's ``request``), or
    without one parallel or chunkwise (never recurrent, which is only a rule or forced); the chunk
    the key forces (its spec's ``chunk``) when it forces one, else for chunkwise a power of two in
    [MIN_CHUNK, MAX_CHUNK] and for parallel PARALLEL_CHUNK. Without ``key`` any form and a chunk
    in that range. The config must pass ``kernels.check_config`` and be empty for the aten
    backend, which has no kernel blocks. (The kernels' resource rule needs torch: the planner
    applies it, ``plan._config_problem``.)
    """
    reason = value_shape(value) or _form_problem(value["form"], key)
    reason = reason or _chunk_problem(value["chunk_size"], value["form"], key)
    return reason or _config_problem(value["config"], key)


def _form_problem(form: str, key: dict[str, Any] | None) -> str | None:
    if key is None:
        return None
    request = key["spec"].get("request", "auto")
    if request in FORMS:
        if form != request:
            return f"value.form {form!r} differs from the form the key forces ({request!r})"
    elif form not in TUNED_FORMS:
        return f"value.form {form!r} is not one the tuner compares ({list(TUNED_FORMS)})"
    return None


def _chunk_problem(chunk: int, form: str, key: dict[str, Any] | None) -> str | None:
    forced = key["spec"].get("chunk") if key is not None else None
    if type(forced) is int and forced > 0:
        if chunk != forced:
            return f"value.chunk_size {chunk} differs from the chunk the key forces ({forced})"
        return None
    if form == "parallel" and key is not None:
        if chunk != PARALLEL_CHUNK:
            return f"value.chunk_size of a parallel winner must be {PARALLEL_CHUNK}, got {chunk}"
        return None
    if MIN_CHUNK <= chunk <= MAX_CHUNK and not chunk & (chunk - 1):
        return None
    return f"value.chunk_size must be a power of two in [{MIN_CHUNK}, {MAX_CHUNK}], got {chunk}"


def _config_problem(config: dict, key: dict[str, Any] | None) -> str | None:
    # NOTE: blocks.py is standard-library only, like this module
    from .blocks import check_config

    if config and key is not None and key["spec"].get("backend") == "aten":
        return f"value.config must be empty for the aten backend, got {config}"
    try:
        check_config(config)
    except ValueError as exc:
        return f"value.config: {exc}"
    return None
