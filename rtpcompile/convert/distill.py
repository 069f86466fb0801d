"""distill(): recover a retrofitted model's quality from its original (the teacher).

Stage 1 (layer matching): the teacher runs on a batch; each converted layer is called on the
very inputs its original attention received in the teacher and trained so that its output
matches the attention output (MSE). Only the parameters retrofit added train (decays, output
norms), unless ``stage1_params="layer"`` also frees the layer's own projections.
Stage 2 (optional, ``stage2_steps > 0``): end-to-end fine-tuning of the whole student on the
KL divergence to the teacher's next-token distribution.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decay import param_dtype
from .layers import RetrofitRetention


@dataclass
class DistillResult:
    """Per-step losses of each stage (stage 1: mean MSE over converted layers; stage 2: KL)."""

    stage1: list[float] = field(default_factory=list)
    stage2: list[float] = field(default_factory=list)


def converted_layers(model: nn.Module) -> dict[str, RetrofitRetention]:
    """Converted modules of ``model`` by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RetrofitRetention)}


def distill(
    model: nn.Module,
    teacher: nn.Module,
    data: Iterable,
    *,
    stage1_steps: int = 100,
    stage2_steps: int = 0,
    lr1: float = 1e-2,
    lr2: float = 3e-4,
    stage1_params: str = "new",
    temperature: float = 1.0,
    log_every: int = 10,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DistillResult:
    """Train ``model`` (retrofitted) towards ``teacher`` (the unconverted original, frozen).

    ``data`` is an iterable of batches: each a [B, T] LongTensor of token ids (called as
    ``model(ids)``) or a dict of keyword arguments (a single tensor or dict is refused: wrap it,
    ``[ids]``). Re-iterable data (a list, a DataLoader) is cycled when shorter than
    ``stage1_steps + stage2_steps``; a one-shot iterator (a generator) must yield that many.
    Progress lines go to ``log`` (stderr by default) every ``log_every`` steps unless
    ``progress=False``.
    """
    model, teacher = _uncompiled(model), _uncompiled(teacher)
    layers = converted_layers(model)
    if not layers:
        raise ValueError("distill: model has no converted layers; call rtpcompile.retrofit first")
    if teacher is model:
        raise ValueError("distill: teacher must be a separate, unconverted copy of the model")
    if stage1_params not in ("new", "layer"):
        raise ValueError(f"stage1_params must be 'new' or 'layer', got {stage1_params!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
        temperature <= 0
    ):
        raise ValueError(f"distill: temperature must be a positive number, got {temperature!r}")
    for name, steps in (("stage1_steps", stage1_steps), ("stage2_steps", stage2_steps)):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"distill: {name} must be an int >= 0, got {steps!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"distill: log_every must be a positive int, got {log_every!r}")
    _check_teacher(model, teacher, layers)
    _check_trainable_dtype(model)
    _check_data(data)
    say = _logger(progress, log)
    teacher.eval().requires_grad_(False)
    batches = _cycle(data, stage1_steps + stage2_steps)
    result = DistillResult()
    if stage1_steps > 0:
        result.stage1 = _stage1(
            model, teacher, layers, batches, stage1_steps, lr1, stage1_params, log_every, say
        )
    if stage2_steps > 0:
        result.stage2 = _stage2(
            model, teacher, batches, stage2_steps, lr2, temperature, log_every, say
        )
    return result


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (distill hooks and reads its submodules by
    name; train the original, then compile it)."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


def _check_teacher(model: nn.Module, teacher: nn.Module, layers: dict) -> None:
    """The teacher has each converted layer's original at its path, unconverted, and computes
    in the student's dtype."""
    for name in layers:
        try:
            original = teacher.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"distill: the teacher has no module at {name!r}, where the model has a converted "
                "layer: pass the unconverted original of the same model (copy.deepcopy before "
                "retrofit)"
            ) from None
        if isinstance(original, RetrofitRetention):
            raise ValueError(
                f"distill: the teacher's {name!r} is converted too: pass the unconverted original "
                "(copy.deepcopy the model before retrofit, not after)"
            )
    dtypes = [param_dtype(m) for m in (model, teacher)]
    if dtypes[0] != dtypes[1]:
        raise ValueError(
            f"distill: the teacher's parameters are {dtypes[1]} and the model's {dtypes[0]}: "
            "give both one dtype (teacher.to(dtype)), the captured inputs feed the model's layers"
        )


def _check_data(data) -> None:
    if isinstance(data, (Tensor, dict)):
        what = (
            f"a single tensor of shape {tuple(data.shape)}"
            if isinstance(data, Tensor)
            else "a dict"
        )
        raise ValueError(
            "distill: data must be an iterable of batches (each a [B, T] tensor of token ids or "
            f"a dict of keyword arguments), got {what}; wrap one batch in a list, e.g. [ids]"
        )
    if not hasattr(data, "__iter__") and not hasattr(data, "__getitem__"):
        raise ValueError(f"distill: data must be an iterable of batches, got {type(data).__name__}")


def _cycle(data: Iterable, needed: int):
    """Batches forever: re-iterates ``data`` (a list, a DataLoader) when it runs out."""
    # NOTE: not itertools.cycle, which keeps a copy of every batch of the first pass.
    one_shot = isinstance(data, Iterator)
    used = 0
    while True:
        count = 0
        for batch in data:
            count += 1
            used += 1
            yield batch
        if count == 0 and used == 0:
            raise ValueError("distill: data yielded no batches (an empty or exhausted iterable)")
        if count == 0 or one_shot:
            raise ValueError(
                f"distill: data ran out after {used} batches but the steps need {needed} "
                f"(stage1_steps + stage2_steps); a one-shot iterator such as a generator is "
                "not cycled: pass a list or a re-iterable (a DataLoader), or fewer steps"
            )


def _check_trainable_dtype(model: nn.Module) -> None:
    """Refuse float16 parameters: Adam keeps its state in the parameter's dtype, where 1e-3 g^2
    underflows and eps = 1e-8 is 0, so the first step wrote inf (a float16 Llama's norm
    weights at step 1, until 2026-11-25; the projections are shared with the original model)."""
    half = [name for name, p in model.named_parameters() if p.dtype == torch.float16]
    if half:
        raise ValueError(
            f"distill: the model has float16 parameters ({half[0]}, {len(half)} in all); Adam "
            "in float16 writes inf at the first step. Distill in float32 or bfloat16 "
            "(model.float(), teacher.float()) and cast back afterwards"
        )


def _logger(progress: bool, log: Callable[[str], None] | None) -> Callable[[str], None]:
    if not progress:
        return lambda _msg: None
    return log or (lambda msg: print(msg, file=sys.stderr, flush=True))


def _call(model: nn.Module, batch):
    if isinstance(batch, Tensor) and (batch.dim() != 2 or batch.is_floating_point()):
        raise ValueError(
            f"distill: each batch must be a [B, T] tensor of token ids (or a dict of keyword "
            f"arguments), got a {batch.dtype} tensor of shape {tuple(batch.shape)}"
        )
    kwargs = dict(batch) if isinstance(batch, dict) else {"input_ids": batch}
    if hasattr(model, "config") and hasattr(model, "generate"):
        kwargs.setdefault("use_cache", False)  # NOTE: Hugging Face models; no cache in training
        return model(**kwargs)
    if isinstance(batch, dict):
        return model(**kwargs)
    return model(batch)


def _logits(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def _first(output) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def _stage1(model, teacher, layers, batches, steps, lr, which, log_every, say) -> list[float]:
    """Match every converted layer to its original attention on the teacher's inputs."""
    params = _stage1_parameters(layers, which)
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    captured: dict[str, tuple] = {}
    hooks = [
        teacher.get_submodule(name).register_forward_hook(
            _capture(captured, name), with_kwargs=True
        )
        for name in layers
    ]
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    start = time.time()
    try:
        for step in range(1, steps + 1):
            with torch.no_grad():
                _call(teacher, next(batches))
            loss = sum(_layer_loss(layers[n], *captured[n]) for n in layers) / len(layers)
            _check_finite(loss, 1, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % log_every == 0 or step == steps:
                say(
                    f"distill stage 1 step {step}/{steps}  layer MSE {losses[-1]:.5f}  "
                    f"({time.time() - start:.0f}s)"
                )
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return losses


def _check_finite(loss: Tensor, stage: int, step: int) -> None:
    """Stop before a non-finite loss reaches the parameters (one NaN step ruins them all)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"distill: stage {stage} loss is {loss.item()} at step {step}; nothing was updated "
            "at this step (lower the learning rate, check the data and the teacher)"
        )


def _stage1_parameters(layers: dict[str, RetrofitRetention], which: str) -> list[nn.Parameter]:
    params = {id(p): p for m in layers.values() for p in m.new_parameters()}
    if which == "layer":
        params.update({id(p): p for m in layers.values() for p in m.parameters()})
    return list(params.values())


def _capture(store: dict, name: str):
    def hook(_module, args, kwargs, output):
        store[name] = (args, kwargs, _first(output).detach())

    return hook


def _layer_loss(layer: RetrofitRetention, args, kwargs, target: Tensor) -> Tensor:
    # NOTE: no cache ("cache" since transformers 5.24, "past_key_values" before)
    dropped = ("past_key_values", "cache", "layer_past", "past_key_value", "use_cache")
    kwargs = {k: v for k, v in kwargs.items() if k not in dropped}
    out = _first(layer(*args, **kwargs))
    return F.mse_loss(out.float(), target.float())


def _stage2(model, teacher, batches, steps, lr, temperature, log_every, say) -> list[float]:
    """End-to-end fine-tuning on KL(teacher || student) of the next-token distributions."""
    was_training = model.training
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    start = time.time()
    try:
        for step in range(1, steps + 1):
            _stage2_step(model, teacher, next(batches), temperature, params, opt, step, losses)
            if step % log_every == 0 or step == steps:
                say(
                    f"distill stage 2 step {step}/{steps}  KL {losses[-1]:.5f}  "
                    f"({time.time() - start:.0f}s)"
                )
    finally:
        model.train(was_training)  # NOTE: also when a step raises
    return losses


def _stage2_step(model, teacher, batch, temperature, params, opt, step, losses) -> None:
    with torch.no_grad():
        target = _logits(_call(teacher, batch)).float() / temperature
    student = _logits(_call(model, batch)).float() / temperature
    loss = (
        F.kl_div(
            F.log_softmax(student, -1).flatten(0, -2),
            F.log_softmax(target, -1).flatten(0, -2),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    _check_finite(loss, 2, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    losses.append(loss.item())
