"""Run a function on N local processes joined in one process group (CPU, gloo by default).

    from rtpcompile.distributed import run_local
    results = run_local(my_fn, world_size=2, args=(data,))   # my_fn(rank, world_size, *args)

Meant for tests, examples and debugging on one machine; real jobs use ``torchrun``. ``my_fn``
must be importable by name (a module-level function), since the workers are spawned.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, fn, args, init_file, out_dir, backend, threads) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        result = fn(rank, world_size, *args)
        # NOTE: written whole or not at all (renamed into place): run_local trusts a file it finds
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    backend: str = "gloo",
    threads_per_rank: int = 1,
) -> list[Any]:
    """Spawn ``world_size`` processes running ``fn(rank, world_size, *args)``; return their results.

    Each result must be picklable by ``torch.save`` (tensors, lists, dicts). An exception in any
    worker is re-raised here (torch.multiprocessing.ProcessRaisedException).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    with tempfile.TemporaryDirectory(prefix="rtp-dist-") as tmp:
        # NOTE: a file store needs no free TCP port, so parallel test runs cannot collide.
        init_file = os.path.join(tmp, "store")
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        try:
            mp.spawn(
                _worker,
                args=(world_size, fn, args, init_file, tmp, backend, threads_per_rank),
                nprocs=world_size,
                join=True,
            )
        except mp.ProcessExitedException as exc:
            # NOTE: on the 2-core CI machine a rank has died of SIGABRT ("terminate called
            # without an active exception") after its work, in gloo's teardown (2026-11-25, three
            # times in ~ten runs, two different tests). A signal death after every rank wrote
            # its result loses nothing: warn and return them. Anything else propagates.
            if exc.exit_code is None or exc.exit_code >= 0 or not all(map(os.path.exists, paths)):
                raise
            warnings.warn(
                f"rtpcompile.distributed.run_local: {exc} after every rank wrote its result; "
                "returning the results",
                RuntimeWarning,
                stacklevel=2,
            )
        return [torch.load(path, weights_only=False) for path in paths]
