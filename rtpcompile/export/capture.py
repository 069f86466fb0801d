"""Models written in the parallel form: find their retention regions with the rtp backend.

The backend's detection runs on Dynamo FX graphs, so the model is captured once with
``torch.compile(fullgraph=True)`` and a capturing backend that runs detection and rewrite inside
the compile (where Dynamo's tracing context is live). The rewritten graph, which calls the rtp
op for every claimed region, is then replayed by :class:`ReplayModule` with the model's own
parameters and buffers, ready for ``torch.export``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..fresh_caller import fresh_caller


class ReplayModule(nn.Module):
    """Calls a captured Dynamo graph; parameters and buffers are read from ``model``.

    The model's children, parameters and buffers are registered here under their own names (the
    same objects, nothing is copied), so an exported program's state_dict keys are the model's.
    """

    def __init__(self, graph: torch.fx.GraphModule, sources: list[tuple[str, object]], model):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        skipped = getattr(model, "_non_persistent_buffers_set", set())
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in skipped)
        # NOTE: plain attributes (not submodules): the names above are the model's own
        vars(self)["_rtp_replay"] = (graph, sources)

    def forward(self, *args, **kwargs):
        graph, sources = vars(self)["_rtp_replay"]
        inputs = []
        for kind, where in sources:
            if kind == "arg":
                inputs.append(args[where])
            elif kind == "kwarg":
                inputs.append(kwargs[where])
            elif kind == "param":
                inputs.append(self.get_parameter(where))
            else:
                inputs.append(self.get_buffer(where))
        out = graph(*inputs)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


def _sources(
    example_inputs: list, model: nn.Module, args: tuple, kwargs: dict
) -> list[tuple[str, object]]:
    by_id: dict[int, tuple[str, object]] = {}
    for name, p in model.named_parameters():
        by_id[id(p)] = ("param", name)
    for name, b in model.named_buffers():
        by_id[id(b)] = ("buffer", name)
    for i, a in enumerate(args):
        by_id[id(a)] = ("arg", i)
    for name, a in kwargs.items():
        by_id[id(a)] = ("kwarg", name)
    sources = []
    for i, x in enumerate(example_inputs):
        if id(x) not in by_id:
            raise ValueError(
                f"captured graph input {i} ({type(x).__name__}) is neither an argument nor a "
                "parameter or buffer of the model; pass tensors as arguments"
            )
        sources.append(by_id[id(x)])
    return sources


def rewrite_with_backend(model: nn.Module, args: tuple, kwargs: dict | None = None):
    """(ReplayModule whose graph calls the rtp op per claimed region, regions) for ``model``.

    The ReplayModule takes the same ``*args, **kwargs`` as ``model`` (tensors only are read).
    """
    kwargs = kwargs or {}
    from .. import options
    from ..backend import detect_and_rewrite

    captured: dict = {}

    def capture(gm, example_inputs, **kwargs):
        new_gm, regions = detect_and_rewrite(gm, example_inputs, options.resolve(None))
        captured.update(gm=new_gm, regions=regions, inputs=list(example_inputs))
        return gm.forward

    # NOTE: through a throwaway frame: the user's own Dynamo caches are never touched, and the
    # 9th export of a model class does not hit the recompile limit (``fresh_caller``)
    with fresh_caller() as caller:
        torch.compile(caller, backend=capture, fullgraph=True, dynamic=False)(
            model, *args, **kwargs
        )
    if "gm" not in captured:
        raise RuntimeError("Dynamo did not produce a graph for the model")
    sources = _sources(captured["inputs"], model, args, kwargs)
    return ReplayModule(captured["gm"], sources, model), captured["regions"]
