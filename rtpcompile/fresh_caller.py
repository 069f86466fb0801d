"""A throwaway Dynamo frame to trace a model through, for explain() and export.

Dynamo keys its cache entries (and its recompile limit, 8 by default) on the code object of the
frame it compiles. Compiling ``model`` itself would add an entry to ``type(model).forward`` per
trace (the 9th explain or export of a model class would fail), and dropping them (``reset_code``)
would drop the user's own compiled entries too. So each trace compiles a fresh copy of a
one-line caller that inlines the model, and drops only that copy's entries afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from collections.abc import Callable, Iterator

_COPIES = itertools.count()


def _call_model(model, *args, **kwargs):
    return model(*args, **kwargs)


@contextlib.contextmanager
def fresh_caller() -> Iterator[Callable]:
    """A new ``caller(model, *args, **kwargs)`` to pass to ``torch.compile``; its Dynamo cache
    entries are dropped on exit.

    NOTE: a name of its own too: Dynamo remembers automatic-dynamic shapes per (file, line, name)
    of a code object, and one trace's shapes must not change how the next one traces.
    """
    code = _call_model.__code__
    name = f"{code.co_name}_{next(_COPIES)}"
    caller = types.FunctionType(code.replace(co_name=name, co_qualname=name), globals())
    try:
        yield caller
    finally:
        try:
            from torch._dynamo.eval_frame import reset_code

            reset_code(caller.__code__)
        except Exception:  # noqa: BLE001 - best effort; only the cache entry count is at stake
            pass
