"""Retrofit a small Transformer LM to a Retention-Transformer hybrid and distill it back, on CPU.

1. Train a byte-level Transformer LM (nn.MultiheadAttention blocks) from scratch on the Python
   standard library's own source code (always available offline).
2. Retrofit half of its layers to retention with "front" placement (rtpcompile.retrofit).
3. Distill: stage 1 matches each converted layer to its original attention (MSE, new
   parameters only), stage 2 fine-tunes end to end on the KL to the original's logits.
4. Report validation perplexity of the original, the retrofitted model before distillation,
   and after; and the memory report of the hybrid.

    python examples/distill_stdlib/distill_stdlib.py            # about 8 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import math
import pathlib
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

import rtpcompile


def load_corpus(max_bytes: int) -> bytes:
    """The stdlib's .py files in a fixed order (tests and site-packages excluded)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in "/" + rel or rel.startswith("idlelib"):
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(chunks)[:max_bytes]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """A GPT-style byte-level LM built from plain nn.MultiheadAttention blocks."""

    def __init__(self, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1)
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x) @ self.tok.weight.t()


def batches(data: torch.Tensor, batch: int, context: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        yield torch.stack([data[s : s + context + 1] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: nn.Module, val: torch.Tensor, context: int, max_windows: int) -> float:
    model.eval()
    windows = val[: (len(val) - 1) // context * context + 1]
    n = min(max_windows, (len(windows) - 1) // context)
    ids = windows[: n * context].view(n, context)
    tgt = windows[1 : n * context + 1].view(n, context)
    nll = sum(
        F.cross_entropy(
            model(ids[i : i + 64]).flatten(0, 1), tgt[i : i + 64].flatten(), reduction="sum"
        )
        for i in range(0, n, 64)
    )
    return math.exp(float(nll) / tgt.numel())


def pretrain(model, train, args) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay to 10%
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.55 + 0.45 * math.cos(math.pi * min(1.0, s / args.steps)))
        ),
    )
    model.train()
    start = time.time()
    for step, batch in zip(
        range(1, args.steps + 1), batches(train, args.batch, args.context, 0), strict=False
    ):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            print(
                f"pretrain step {step}/{args.steps}  loss {loss.item():.3f}  "
                f"({time.time() - start:.0f}s)"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=3_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--stage1", type=int, default=60)
    p.add_argument("--stage2", type=int, default=150)
    p.add_argument("--val-windows", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()

    corpus = torch.frombuffer(bytearray(load_corpus(args.bytes)), dtype=torch.uint8).long()
    split = int(0.95 * len(corpus))
    train, val = corpus[:split], corpus[split:]
    print(f"corpus: {len(corpus):,} bytes of stdlib source ({len(val):,} held out)")

    model = ByteLM(args.dim, args.layers, args.heads, args.context)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    pretrain(model, train, args)
    ppl_original = perplexity(model, val, args.context, args.val_windows)

    teacher = copy.deepcopy(model).eval()
    handle = rtpcompile.retrofit(model, ratio=0.5, placement="front")
    print(handle)
    ppl_retrofit = perplexity(model, val, args.context, args.val_windows)

    data = (b[:, :-1] for b in batches(train, args.batch, args.context, 1))
    rtpcompile.distill(model, teacher, data, stage1_steps=args.stage1, log_every=25)
    ppl_stage1 = perplexity(model, val, args.context, args.val_windows)
    rtpcompile.distill(model, teacher, data, stage1_steps=0, stage2_steps=args.stage2, log_every=25)
    ppl_distilled = perplexity(model, val, args.context, args.val_windows)

    print(rtpcompile.memory_report(model, seq_len=args.context, batch=1))
    print(
        f"\nvalidation perplexity (bytes): original {ppl_original:.3f} | retrofitted "
        f"{ppl_retrofit:.3f} | after stage 1 {ppl_stage1:.3f} | distilled {ppl_distilled:.3f} "
        f"({100 * (ppl_distilled / ppl_original - 1):+.1f}% vs original)"
    )
    print(f"total time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
