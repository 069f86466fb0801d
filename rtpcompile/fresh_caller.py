"""A throwaway Dynamo frame to trace a model through, for explain() and export.

Dynamo keys its cache entries (and its recompile limit, 8 by default) on the code object of the
frame it compiles. Compiling ``model`` itself would add an entry to ``type(model).forward`` per
trace (the 9th explain or export of a model class would fail), and dropping them (``reset_code``)
would drop the user's own compiled entries too. So each trace compiles a fresh copy of a
one-line caller that inlines the model, and drops only that copy's entries afterwards.

A graph break inside the model leaves the rest of its forward to a resume function that Dynamo
generates once per (code, break) and shares between compiles: a trace would add an entry to the
resume function the user's compiled model runs. So a trace generates resume functions of its own
(``own_resume_functions``), thrown away with the caller.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import itertools
import types
from collections.abc import Callable, Iterator

_COPIES = itertools.count()


def _call_model(model, *args, **kwargs):
    return model(*args, **kwargs)


@contextlib.contextmanager
def fresh_caller() -> Iterator[Callable]:
    """A new ``caller(model, *args, **kwargs)`` to pass to ``torch.compile``; its Dynamo cache
    entries are dropped on exit, and resume functions of graph breaks inside the model traced
    meanwhile are its own (``own_resume_functions``).

    NOTE: a name of its own too: Dynamo remembers automatic-dynamic shapes per (file, line, name)
    of a code object, and one trace's shapes must not change how the next one traces.
    """
    code = _call_model.__code__
    name = f"{code.co_name}_{next(_COPIES)}"
    scope = {"__builtins__": builtins, "__name__": __name__}
    caller = types.FunctionType(code.replace(co_name=name, co_qualname=name), scope)
    try:
        with own_resume_functions(), own_shape_memory():
            yield caller
    finally:
        try:
            from torch._dynamo.eval_frame import reset_code

            reset_code(caller.__code__)
        except Exception:  # noqa: BLE001 - best effort; only the cache entry count is at stake
            pass
        # NOTE: Dynamo deletes the globals it installs for a compiled frame (its graphs, the
        # resume functions of its graph breaks) when the frame's compiled code dies, and a
        # resume function installed there keeps that code alive (through Dynamo's C++ state,
        # which the garbage collector cannot see): one trace's graphs per explain were never
        # freed. Dropping the values (not the names: Dynamo deletes those) frees them.
        for key in scope.keys() - {"__builtins__", "__name__"}:
            scope[key] = None


@contextlib.contextmanager
def own_resume_functions() -> Iterator[None]:
    """Inside: a graph break makes Dynamo generate new resume functions, not reuse the ones it
    generated before (for the user's compiled models); outside: it reuses those again.

    NOTE: private Dynamo state, best effort: ``ContinueExecutionCache.cache`` (torch 2.x:
    torch/_dynamo/resume_execution.py) maps a code object to the resume code objects generated
    for its graph breaks. A trace that reused them would add a cache entry (its own backend) to a
    code object the user's compiled model runs; the 9th such trace hits Dynamo's recompile limit
    for it and Dynamo then runs it eagerly for good, the user's compile included. Entries cannot
    be dropped one by one (``reset_code`` drops all, the user's too; an invalidated entry still
    counts), so the trace gets a cache of its own; the resume functions it generates die with the
    trace's caller. Without that attribute (another torch), resume functions are shared as before.
    A compile in another thread meanwhile gets new resume functions too: a recompile more at worst.
    """
    try:
        from torch._dynamo.eval_frame import reset_code
        from torch._dynamo.resume_execution import ContinueExecutionCache

        shared = ContinueExecutionCache.__dict__["cache"]
        own = ContinueExecutionCache.cache = type(shared)()
    except Exception:  # noqa: BLE001 - best effort: resume functions are then shared
        yield
        return
    try:
        yield
    finally:
        ContinueExecutionCache.cache = shared
        # NOTE: and drop the entries of the resume functions generated here: they too keep the
        # caller's compiled code, so the trace's graphs, alive (fresh_caller)
        try:
            for generated in list(own.values.values()):  # {code: {key: resume code}}
                for code in list(generated.values()):
                    reset_code(code)
        except Exception:  # noqa: BLE001 - best effort; a leak of one trace's graphs at worst
            pass


@contextlib.contextmanager
def own_shape_memory() -> Iterator[None]:
    """Inside: Dynamo remembers the shapes a trace sees, as for any compile; on exit: it forgets
    them, its memory is as before.

    NOTE: private Dynamo state, best effort: ``torch._dynamo.pgo.get_code_state()`` maps (file,
    line, name) of a code object to the sizes its compiles saw, and a size that changed makes
    the next compile of that code dynamic. A resume function generated for a trace has the key
    of the user's (same file, line and name), so a trace at T=7 made the user's first compile
    at T=9 of the rest of the forward dynamic. Without that function, the memory is shared.
    """
    try:
        from torch._dynamo import pgo

        state = pgo.get_code_state()
        saved = copy.deepcopy(dict(state))
    except Exception:  # noqa: BLE001 - best effort: the trace's shapes are then remembered
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            for key in state.keys() - saved.keys():
                del state[key]
            state.update(saved)


def isolated() -> dict:
    """``torch.compile`` keywords that keep a trace's cache entries apart from other compiles
    of the same code: ``isolate_recompiles=True`` (torch 2.13+: its own recompile limit), or
    none on a torch without it.

    NOTE: a second line of defence for a torch without ``own_resume_functions``' private state:
    a trace's entries on a shared resume function then count against its own limit, not the
    user's (Dynamo's global ``accumulated_recompile_limit``, 256, still counts them all).
    """
    import inspect

    import torch

    try:
        supported = "isolate_recompiles" in inspect.signature(torch.compile).parameters
    except (TypeError, ValueError):
        supported = False
    return {"isolate_recompiles": True} if supported else {}
