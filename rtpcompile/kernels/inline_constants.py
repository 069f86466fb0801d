"""A spec's constants written into its kernels as literals.

The templates name a spec's constants once, at the top of the module (``BT = tl.constexpr(64)``),
and read them by name, which keeps them readable. Triton, though, records every constexpr global
a kernel reads and compares each with its compile-time copy at every launch (``JITFunction.run``,
``used_global_vals``): 11 to 18 ``tl.constexpr.__ne__`` calls per launch here, 8 to 12 µs of
host time per launch on the 2-core CI machine, as much as the rest of Triton's Python steps
before its C launcher (``benchmarks/triton_launch_cost.py`` times them). ``inline`` rewrites the
rendered module so that the kernels read literals (``tl.arange(0, 64)``; a literal is a constexpr to
Triton, so the compiled kernel is the same), and keeps each constant's line as a comment.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import tokenize

# NAME = tl.constexpr(VALUE)  # comment, at column 0: a spec constant of the template's header
_CONSTANT = re.compile(r"^([A-Z][A-Z0-9_]*) = tl\.constexpr\((.+?)\)(\s*#.*)?$")
_DTYPE = re.compile(r"^tl\.[a-z0-9_]+$")

NOTE = (
    "# The spec's constants, written into the kernels below as literals (a module-level\n"
    "# tl.constexpr would be compared with its compile-time copy at every launch):\n"
)


def _literal(name: str, text: str) -> str:
    """The literal text for a constant's value; a ValueError for anything but a number, a bool,
    a string or a ``tl`` dtype (``tl.float32``)."""
    if _DTYPE.match(text):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"inline_constants: {name} = tl.constexpr({text}) is no literal") from exc
    if not isinstance(value, (bool, int, float, str)):
        raise ValueError(f"inline_constants: {name} = tl.constexpr({text}) is no literal")
    return f"({text})" if text.startswith("-") else text  # NOTE: -1 ** 2 is not (-1) ** 2


def _bound_names(node: ast.AST) -> list[str]:
    """The names ``node`` binds (or names as a keyword argument)."""
    if isinstance(node, (ast.arg, ast.keyword)):
        return [node.arg] if node.arg else []
    if isinstance(node, ast.Name):
        return [] if isinstance(node.ctx, ast.Load) else [node.id]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        return list(node.names)
    if isinstance(node, ast.alias):
        return [node.asname or node.name.split(".")[0]]
    if isinstance(node, ast.ExceptHandler):
        return [node.name] if node.name else []
    return []


def _check_only_read(tree: ast.Module, names: set[str]) -> None:
    """A constant must only be read: a parameter, a keyword argument, an assignment, a def, an
    import or a ``global`` of the same name would make a textual substitution wrong, so it is
    refused."""
    for node in ast.walk(tree):
        for bound in _bound_names(node):
            if bound in names:
                raise ValueError(
                    f"inline_constants: {bound} is bound in the kernel source, not read"
                )


_inlining = True  # False inside module_constants()


@contextlib.contextmanager
def module_constants():
    """Render kernels as the templates read them, constants as module-level globals, while
    active (the benchmarks time Triton's launch both ways: ``triton_launch_cost.py``,
    ``host_overhead.py``). Kernels rendered inside are other modules (other source hashes).
    A process-wide switch (not per thread); nested blocks restore what they found."""
    from . import codegen, spec

    def forget():
        spec.render.cache_clear()
        codegen._NAMES.clear()

    global _inlining
    before, _inlining = _inlining, False
    forget()
    try:
        yield
    finally:
        _inlining = before
        forget()


def inline(source: str) -> str:
    """``source`` with its module-level ``NAME = tl.constexpr(VALUE)`` constants substituted into
    the code as literals; their lines become comments under one note. Strings, comments and
    attributes (``x.BT``) are left alone. Unchanged inside ``module_constants()``."""
    if not _inlining:
        return source
    # NOTE: lines as tokenize counts them (str.splitlines also splits at \x0c, \x85, ...)
    lines = io.StringIO(source).readlines()
    values: dict[str, str] = {}
    first = None
    for i, line in enumerate(lines):
        found = _CONSTANT.match(line.rstrip())
        if found is None:
            continue
        name, text, comment = found.group(1), found.group(2), found.group(3) or ""
        if name in values:
            raise ValueError(f"inline_constants: {name} is defined twice")
        values[name] = _literal(name, text)
        lines[i] = f"# {name} = {text}{comment}\n"
        first = i if first is None else first
    if not values:
        return source
    lines[first] = NOTE + lines[first]
    body = "".join(lines)
    _check_only_read(ast.parse(body), set(values))

    edits: list[tuple[int, int, int, str]] = []  # (row, start col, end col, text)
    after_dot = False  # the previous significant token was "." (an attribute follows)
    for token in tokenize.generate_tokens(io.StringIO(body).readline):
        if token.type == tokenize.NAME and token.string in values and not after_dot:
            row, col = token.start
            edits.append((row, col, token.end[1], values[token.string]))
        if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT):
            after_dot = token.type == tokenize.OP and token.string == "."
    out = io.StringIO(body).readlines()
    for row, start, end, text in sorted(edits, reverse=True):
        line = out[row - 1]
        out[row - 1] = line[:start] + text + line[end:]
    return "".join(out)
