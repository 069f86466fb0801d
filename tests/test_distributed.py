"""Data-parallel training with the rtp backend on 2 CPU processes (gloo).

``torch.compile(DDP(model), backend=...)`` and FSDP2 (``fully_shard``) must train exactly like
one process on the concatenated batch. Dynamo's DDPOptimizer splits the graph at gradient
bucket boundaries and hands each piece to the backend separately, with FAKE example inputs;
every retention region must then be claimed, or declined because a bucket boundary cut it.

The fast tests run ``backend="rtp"`` with Inductor patched out inside the workers (the rewritten
graph runs eagerly; Inductor takes minutes per graph on a 2-core CPU); the end-to-end test with
Inductor is marked slow.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)

WORLD = 2
VOCAB, T, LOCAL_BATCH, STEPS, LR = 32, 12, 2, 2, 0.1
REGIONS: list[list[tuple[bool, str | None]]] = []


def _model(dim: int = 256):
    from rtpcompile.nn import RTPHybridLM

    torch.manual_seed(0)
    # NOTE: dim 256 makes the parameters (~5 MB) span several 1 MB DDP buckets, so the
    # DDPOptimizer really splits the graph; float64 keeps the comparison tight.
    return RTPHybridLM(VOCAB, dim, num_layers=2, num_heads=2, ratio=1.0).double()


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (STEPS, WORLD * LOCAL_BATCH, T), generator=g)


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _rtp_without_inductor() -> str:
    """Make ``backend="rtp"`` skip Inductor (run the rewritten graph eagerly) and record every
    region's verdict in REGIONS. Only ever called inside spawned workers."""
    import rtpcompile.backend as backend

    detect_and_rewrite = backend.detect_and_rewrite

    def recording(gm, example_inputs, opts, *rest):
        new_gm, regions = detect_and_rewrite(gm, example_inputs, opts, *rest)
        REGIONS.append([(r.claimed, getattr(r, "reason", None)) for r in regions])
        return new_gm, regions

    backend.detect_and_rewrite = recording
    backend._inductor = lambda gm, example_inputs, mode: gm.forward
    return "rtp"


def _train(model, ids_per_step, rank: int) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for ids in ids_per_step:
        local = ids[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
        opt.zero_grad()
        loss = _loss(model, local)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"losses": losses}


def _ddp_worker(rank: int, world: int, data: torch.Tensor, backend) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    REGIONS.clear()
    model = _model()
    ddp = DDP(model, bucket_cap_mb=1)
    compiled = torch.compile(ddp, backend=backend)
    out = _train(compiled, data, rank)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["regions"] = list(REGIONS)
    return out


def _fsdp_worker(rank: int, world: int, data: torch.Tensor, backend) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    REGIONS.clear()
    model = _model(dim=32)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    compiled = torch.compile(model, backend=backend)
    out = _train(compiled, data, rank)
    out["params"] = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    out["regions"] = list(REGIONS)
    return out


def _both(rank: int, world: int, data: torch.Tensor) -> dict:
    backend = _rtp_without_inductor()
    return {
        "ddp": _ddp_worker(rank, world, data, backend),
        "fsdp": _fsdp_worker(rank, world, data, backend),
    }


def _single_process(data: torch.Tensor, dim: int) -> dict:
    """Plain eager training on the whole batch: the loss of each rank's half, averaged."""
    model = _model(dim)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for ids in data:
        opt.zero_grad()
        halves = [_loss(model, ids[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH]) for r in range(WORLD)]
        losses.append([h.detach() for h in halves])
        (sum(halves) / WORLD).backward()
        opt.step()
    return {"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def spawned():
    from rtpcompile.distributed import run_local

    data = _data()
    return data, run_local(_both, WORLD, args=(data,))


def _check_training(results: list[dict], ref: dict) -> None:
    for rank, res in enumerate(results):
        for step, loss in enumerate(res["losses"]):
            torch.testing.assert_close(loss, ref["losses"][step][rank], rtol=1e-9, atol=1e-10)
        for name, p in ref["params"].items():
            torch.testing.assert_close(
                res["params"][name], p, rtol=1e-8, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_ddp_compiled_training_matches_single_process(spawned):
    data, results = spawned
    _check_training([r["ddp"] for r in results], _single_process(data, 256))


def test_ddp_graph_is_split_at_bucket_boundaries(spawned):
    _, results = spawned
    # several graphs per rank: the DDPOptimizer split the forward into bucket-sized pieces
    assert all(len(r["ddp"]["regions"]) > 1 for r in results)


def test_fsdp2_compiled_training_matches_single_process(spawned):
    data, results = spawned
    _check_training([r["fsdp"] for r in results], _single_process(data, 32))


def _verdicts(graphs: list) -> tuple[int, list[str]]:
    flat = [v for graph in graphs for v in graph]
    claimed = sum(1 for ok, _ in flat if ok)
    other = [reason or "" for ok, reason in flat if not ok and "bucket" not in (reason or "")]
    return claimed, other


def test_ddp_regions_are_claimed_or_declined_for_a_bucket_boundary(spawned):
    _, results = spawned
    for r in results:
        claimed, other = _verdicts(r["ddp"]["regions"])
        assert other == [], f"regions declined for a reason other than a bucket cut: {other}"
        assert claimed >= 1


@pytest.mark.slow
def test_ddp_with_the_rtp_backend_and_inductor():
    """Training, not just the first forward: every step's losses and the parameters after
    ``STEPS`` (2) SGD steps equal single-process training, so a wrong gradient (backward
    kernels, DDP's all-reduce of the compiled pieces' gradients) fails it."""
    from rtpcompile.distributed import run_local

    data = _data()
    assert len(data) >= 2
    results = run_local(_ddp_worker, WORLD, args=(data, "rtp"))
    _check_training(results, _single_process(data, 256))


def _pieces_worker(rank: int, world: int, data: torch.Tensor) -> list:
    """Each DDP graph piece: (is a piece, foreign inputs, regions claimed with real inputs)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rtpcompile import options
    from rtpcompile.backend import detect_and_rewrite
    from rtpcompile.distributed.ddp import foreign_inputs, is_ddp_piece, real_example_inputs

    seen = []

    def inspect(gm, example_inputs, **kwargs):
        real = real_example_inputs(gm, example_inputs)
        fake_left = sum(isinstance(x, torch._subclasses.FakeTensor) for x in real)
        new_gm, regions = detect_and_rewrite(gm, real, options.resolve(None))
        claimed = sum(r.claimed for r in regions)
        seen.append((is_ddp_piece(gm), sorted(foreign_inputs(gm)), fake_left, claimed))
        return new_gm.forward

    compiled = torch.compile(DDP(_model(), bucket_cap_mb=1), backend=inspect)
    _loss(compiled, data[0][:LOCAL_BATCH]).backward()
    return seen


def test_ddp_pieces_get_real_inputs_and_their_regions_are_claimed():
    from rtpcompile.distributed import run_local

    pieces = run_local(_pieces_worker, 1, args=(_data(),))[0]
    assert len(pieces) > 1 and all(is_piece for is_piece, *_ in pieces)
    for _, foreign, fake_left, _ in pieces:
        # only values computed in another piece stay fake
        assert fake_left == len(foreign)
    assert sum(claimed for *_, claimed in pieces) == 2  # both retention layers


class _MaskBeforeTheCut(torch.nn.Module):
    """The decay mask is built first, then a ~1.4 MiB layer closes DDP's first bucket: the mask
    reaches the retention in the next graph piece as a value computed in this one."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", torch.tensor([0.9, 0.6]))
        self.inp, self.big = torch.nn.Linear(8, 600), torch.nn.Linear(600, 600)
        self.qkv = torch.nn.Linear(600, 3 * 8)

    def forward(self, x):
        B, T, _ = x.shape
        n = torch.arange(T, device=x.device)
        diff = (n[:, None] - n[None, :]).to(x.dtype)
        mask = (self.gamma[:, None, None] ** diff.clamp(min=0)).masked_fill(diff < 0, 0)
        h = self.big(torch.relu(self.inp(x)))
        q, k, v = self.qkv(h).view(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return (((q @ k.transpose(-1, -2)) * 0.5 * mask) @ v).transpose(1, 2).reshape(B, T, 8)


def _cut_worker(rank: int, world: int) -> tuple:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rtpcompile import options
    from rtpcompile.backend import detect_and_rewrite

    reasons = []

    def inspect(gm, example_inputs, **kwargs):
        new_gm, regions = detect_and_rewrite(gm, example_inputs, options.resolve(None))
        reasons.extend(r.reason for r in regions)
        return new_gm.forward

    torch.manual_seed(0)
    model, x = _MaskBeforeTheCut(), torch.randn(2, 6, 8)
    want = model(x)
    got = torch.compile(DDP(model, bucket_cap_mb=1), backend=inspect)(x)
    return reasons, (got - want).abs().max().item()


def test_a_mask_cut_by_a_bucket_boundary_is_declined_naming_the_bucket():
    """docs/distributed.md's promise: such a region declines with a reason saying "bucket"
    (until 2026-11-25 it said "the mask depends on activations": bucket_cut_reason was never
    called)."""
    from rtpcompile.distributed import run_local

    reasons, error = run_local(_cut_worker, 1)[0]
    assert len(reasons) == 1 and "DDP bucket boundary" in reasons[0], reasons
    assert error == 0.0


def test_bucket_cut_reason_names_the_inputs_from_other_pieces():
    import types

    import torch.fx as fx

    from rtpcompile.distributed.ddp import bucket_cut_reason, is_ddp_piece

    gm = fx.symbolic_trace(lambda scores, mask: scores * mask)
    assert not is_ddp_piece(gm) and bucket_cut_reason(gm, ["scores"]) is None
    gm.compile_subgraph_reason = types.SimpleNamespace(reason="DDPOptimizer intentional break")
    reason = bucket_cut_reason(gm, ["mask", "not_an_input"])
    assert "bucket boundary" in reason and "mask" in reason and "scores" not in reason


def _abort_after_result(rank, world_size):
    """Rank 0 dies of SIGABRT after returning its result (a thread fires once the work is done):
    what gloo's teardown did to a CI rank, 2026-11-25."""
    import os
    import threading

    if rank == 0:
        threading.Timer(0.2, os.abort).start()
    return torch.full((2,), float(rank))


def _abort_before_result(rank, world_size):
    import os

    if rank == 0:
        os.abort()
    return torch.full((2,), float(rank))


def test_a_rank_killed_by_a_signal_after_its_result_loses_nothing():
    from rtpcompile.distributed import run_local

    with pytest.warns(RuntimeWarning, match="after every rank wrote its result"):
        got = run_local(_abort_after_result, 2)
    assert [r.tolist() for r in got] == [[0.0, 0.0], [1.0, 1.0]]
    # a rank that dies before writing its result is an error, as before
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT"):
        run_local(_abort_before_result, 2)
