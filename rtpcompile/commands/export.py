"""``rtpcompile export``: export an RTPHybridLM to MLIR with retention lowered to one form.

rtpcompile export -o model.mlir                              chunkwise prefill, linalg-on-tensors
rtpcompile export --form recurrent --dialect torch           a one-token decoding step (states in
                                                             and out; retention-only models)
rtpcompile export --checkpoint model.pt --seq-len 2048       a torch.save'd RTPHybridLM
rtpcompile export --program                                  the decomposed torch.export program
                                                             (no torch-mlir needed)

The model comes from --checkpoint, else from the size flags (default: a small retention-only
model); size flags next to --checkpoint are a usage error (the checkpoint has its own sizes).
A summary (function signature, T x T tensor types found) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..export.decompose import DEFAULT_EXPORT_CHUNK, EXPORT_FORMS
from ..export.mlir import DIALECTS
from ._common import UsageError, positive_int

DEFAULT_SEQ_LEN = 512
DEFAULT_DIALECT = "linalg-on-tensors"
# The model size flags and their defaults (None in the parser: given or not, see _model)
SIZE_DEFAULTS = {"vocab": 256, "dim": 64, "layers": 2, "heads": 4, "ratio": 1.0}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model to MLIR (torch-mlir) with retention in one form",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--form", choices=EXPORT_FORMS, default="chunkwise")
    p.add_argument(
        "--dialect",
        choices=DIALECTS,
        default=None,
        help=f"default {DEFAULT_DIALECT}; not with --program, which prints the FX program",
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help=f"T of the exported prefill (default {DEFAULT_SEQ_LEN}; not for --form recurrent, "
        "which exports a one-token step)",
    )
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help=f"--form chunkwise only: the chunk length (default {DEFAULT_EXPORT_CHUNK})",
    )
    p.add_argument(
        "--position",
        type=positive_int,
        default=None,
        help="--form recurrent only: tokens already seen (default 1; the prompt's prefill "
        "comes first)",
    )
    p.add_argument(
        "--checkpoint",
        help="a torch.save'd model (loaded with weights_only=False); not with the size flags",
    )
    sizes = SIZE_DEFAULTS
    p.add_argument("--vocab", type=positive_int, help=f"default {sizes['vocab']}")
    p.add_argument("--dim", type=positive_int, help=f"default {sizes['dim']}")
    p.add_argument("--layers", type=positive_int, help=f"default {sizes['layers']}")
    p.add_argument("--heads", type=positive_int, help=f"default {sizes['heads']}")
    p.add_argument(
        "--ratio", type=float, help=f"fraction of retention layers (default {sizes['ratio']})"
    )
    p.add_argument("--program", action="store_true", help="print the decomposed FX program")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.set_defaults(func=run)


def _model(args):
    import torch

    from ..nn import RTPHybridLM

    # NOTE: getattr: a Namespace built in code may leave the size flags out
    given = {name: getattr(args, name, None) for name in SIZE_DEFAULTS}
    if args.checkpoint:
        flags = [f"--{name}" for name, value in given.items() if value is not None]
        if flags:
            raise UsageError(
                f"{', '.join(flags)} cannot be used with --checkpoint, whose model has its own "
                "sizes; leave them out, or leave out --checkpoint to build a model from them"
            )
        model = _load_checkpoint(args.checkpoint)
    else:
        sizes = {name: SIZE_DEFAULTS[name] if v is None else v for name, v in given.items()}
        torch.manual_seed(0)
        try:
            model = RTPHybridLM(
                sizes["vocab"], sizes["dim"], sizes["layers"], sizes["heads"], ratio=sizes["ratio"]
            )
        except ValueError as exc:  # NOTE: sizes that do not fit together are argument errors
            raise UsageError(f"model size flags: {exc}") from None
    return model.eval()


def _load_checkpoint(path: str):
    """The RTPHybridLM saved at ``path``; a UsageError when it cannot be read or is not one."""
    import pickle

    import torch

    from ..nn import RTPHybridLM

    expected = "expected a torch.save'd RTPHybridLM"
    try:
        # NOTE: a full pickled module; only load checkpoints you trust. A text file starting
        # with a pickle opcode letter ("garbage") fails as a ValueError
        model = torch.load(path, weights_only=False)
    except OSError as exc:
        raise UsageError(f"--checkpoint: cannot read {path!r} ({exc.strerror or exc})") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, ValueError) as exc:
        raise UsageError(f"--checkpoint: {expected}, {path!r} did not load ({exc})") from None
    if not isinstance(model, RTPHybridLM):
        hint = " (a state dict? torch.save the model itself)" if isinstance(model, dict) else ""
        raise UsageError(f"--checkpoint: {expected}, got a {type(model).__name__}{hint}")
    return model


def _check_recurrent(args, model) -> None:
    """--form recurrent exports ``DecodeStep``, which needs retention layers only: a model with
    attention layers is a usage error naming the flags that made it (before any export work)."""
    kinds = list(model.layer_types)
    if all(kind == "retention" for kind in kinds):
        return
    if args.checkpoint:
        source = f"the model of --checkpoint {args.checkpoint!r} has"
        fix = "a retention-only model"
    else:
        ratio, layers = (
            SIZE_DEFAULTS[name] if getattr(args, name, None) is None else getattr(args, name)
            for name in ("ratio", "layers")
        )
        source = f"--ratio {ratio:g} (of --layers {layers}) gives"
        fix = "--ratio 1 (all layers retention)"
    raise UsageError(
        f"--form recurrent exports a one-token decoding step of a retention-only model (states "
        f"in and out), but {source} attention layers (layer types {kinds}); use {fix}, "
        "or export a prefill with --form chunkwise or --form parallel"
    )


def _inputs(args, model):
    import torch

    from ..export.step import DecodeStep

    vocab = model.config.vocab_size
    if args.form == "recurrent":
        step = DecodeStep(model, args.position)
        ids = torch.randint(0, vocab, (args.batch, 1))
        return step, (ids, *step.initial_states(args.batch)), 1
    ids = torch.randint(0, vocab, (args.batch, args.seq_len))
    return model, (ids,), args.seq_len


def _signature(text: str) -> str:
    start = text.find("func.func")
    return text[start : text.find("{", start)].strip() if start >= 0 else "(no func.func found)"


def run(args) -> int:
    from .. import export

    if args.form == "recurrent" and args.seq_len not in (None, 1):
        raise UsageError(
            f"--seq-len {args.seq_len} does not apply to --form recurrent, which exports "
            "a one-token decoding step (T=1, states in and out); set the tokens already seen "
            "with --position, or export a prefill with --form chunkwise"
        )
    if args.seq_len is None:
        args.seq_len = DEFAULT_SEQ_LEN
    # NOTE: flags that do not apply were ignored silently (a byte-identical output)
    if args.form != "recurrent" and args.position is not None:
        raise UsageError(
            f"--position {args.position} applies to --form recurrent only (the tokens a "
            f"decoding step has seen); --form {args.form} exports a prefill of --seq-len tokens"
        )
    if args.program and args.dialect is not None:
        raise UsageError(
            f"--dialect {args.dialect} does not apply to --program, which prints the decomposed "
            "FX program (before any MLIR lowering)"
        )
    if args.form != "chunkwise" and args.chunk_size is not None:
        raise UsageError(
            f"--chunk-size {args.chunk_size} applies to --form chunkwise only; --form "
            f"{args.form} has no chunks"
        )
    args.chunk_size = DEFAULT_EXPORT_CHUNK if args.chunk_size is None else args.chunk_size
    args.position = 1 if args.position is None else args.position
    args.dialect = DEFAULT_DIALECT if args.dialect is None else args.dialect
    if args.output and not Path(args.output).resolve().parent.is_dir():
        parent = Path(args.output).parent
        raise UsageError(
            f"-o: expected a file in an existing folder, got {args.output!r} "
            f"({str(parent)!r} is not a folder)"
        )
    model = _model(args)
    if args.form == "recurrent":
        _check_recurrent(args, model)
    try:
        target, inputs, seq_len = _inputs(args, model)
        if args.program:
            program = export.export_program(
                target, *inputs, form=args.form, chunk_size=args.chunk_size
            )
            text = program.graph_module.print_readable(print_output=False)
            quadratic = export.quadratic_node_shapes(program, seq_len) if seq_len > 1 else []
        else:
            module = export.export_mlir(
                target, *inputs, form=args.form, dialect=args.dialect, chunk_size=args.chunk_size
            )
            text = str(module)
            quadratic = export.quadratic_tensor_types(text, seq_len) if seq_len > 1 else []
    except (ImportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output:
        try:
            with open(args.output, "w") as f:
                f.write(text)
        except OSError as exc:
            print(f"error: cannot write {args.output!r} ({exc.strerror or exc})", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    if not args.program:
        print(_signature(text), file=sys.stderr)
    print(f"T x T tensors (T={seq_len}): {len(quadratic)} {quadratic[:4]}", file=sys.stderr)
    if quadratic and seq_len in _widths(target, args.batch):
        print(
            f"note: T={seq_len} equals a model width (a weight size, a head count or head dim) "
            f"or the batch, so [.., T, width] values count too; export at another --seq-len to "
            f"see only T x T ones",
            file=sys.stderr,
        )
    if quadratic and args.form == "chunkwise" and seq_len <= args.chunk_size:
        print(
            f"note: T={seq_len} <= --chunk-size {args.chunk_size}: one chunk of C = T tokens, "
            f"whose C x C scores are T x T; export with a --seq-len above the chunk size to see "
            f"the chunkwise form's O(T * C) memory",
            file=sys.stderr,
        )
    return 0


def _widths(model, batch: int) -> set[int]:
    """Sizes that make a ``[.., T, size]`` value look T x T when T equals one: the weights'
    sizes, each attention or retention layer's head count and head widths (K, V; a reshaped
    ``[B, H, T, K]`` has no weight of size K), and the batch."""
    sizes = {int(d) for p in model.parameters() for d in p.shape}
    for module in model.modules():
        for name in ("num_heads", "head_dim", "head_dim_k", "head_dim_v"):
            value = getattr(module, name, None)
            if isinstance(value, int):
                sizes.add(value)
    return sizes | {batch}
