"""rtpcompile.nn: a cache from another model, a cache with its state or keys gone, past keys of
the wrong length, a cache or input ids of the wrong type are refused with a clear error (they
decoded silently without context, or failed deep in SDPA / nn.Embedding), also under
torch.compile and without new graph breaks or recompiles; log_gamma stays float32 on .half()."""

from __future__ import annotations

import pytest
import torch

from rtpcompile.nn import (
    CausalSelfAttention,
    HybridCache,
    LayerCache,
    MultiScaleRetention,
    RTPHybridLM,
    retnet_decay,
)

F64 = torch.float64


def _lm(layout: str, ratio: float = 0.5, **kw) -> RTPHybridLM:
    torch.manual_seed(0)
    return RTPHybridLM(61, 32, 4, 4, layout=layout, ratio=ratio, **kw).to(F64).eval()


def _ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- bug 1: a cache of another layer plan / with its state or keys gone --------------------------


@torch.no_grad()
def test_a_cache_of_another_layer_plan_is_refused():
    """Layout A [A,A,R,R] filled a cache, layout B [R,R,A,A] continued it: the retention layers
    found no state and restarted, the logits were those of the last token alone."""
    a, b = _lm("A"), _lm("B")
    ids = _ids()
    cache = a.new_cache(2)
    a(ids[:, :8], cache=cache)
    assert repr(cache).startswith("HybridCache(batch=2, seq_len=8, layers=[A,A,R,R]")
    with pytest.raises(ValueError, match=r"cache layer 0 is of kind 'attention' but the model's"):
        b(ids[:, 8:], cache=cache)
    assert cache.seq_len == 8  # nothing consumed
    # also refused when empty: new_cache of the other model is the fix the message names
    with pytest.raises(ValueError, match=r"another layer plan .*build it with model.new_cache"):
        b(ids[:, :8], cache=a.new_cache(2))


@torch.no_grad()
def test_a_hybrid_cache_of_other_head_split_is_refused_once_continued():
    """Type C with 1 vs 2 retention heads: same kinds, other state and key shapes."""
    c1, c2 = _lm("C", 0.25), _lm("C", 0.5)
    assert c1.layer_types == c2.layer_types == ["hybrid"] * 4
    ids = _ids()
    cache = c1.new_cache(2)
    c1(ids[:, :8], cache=cache)
    with pytest.raises(ValueError, match=r"past keys must have shape \[2, 2, P, 8\]"):
        c2(ids[:, 8:], cache=cache)


@pytest.mark.parametrize(
    "layout,field,match",
    [
        ("B", "state", "no retention state for this layer, but offset=6"),
        ("A", "keys", "no attention keys/values for this layer, but offset=6"),
        ("C", "state", "no retention state"),
        ("C", "values", "no attention keys/values"),
    ],
)
@torch.no_grad()
def test_a_missing_state_or_keys_after_the_start_is_refused(layout, field, match):
    """At offset > 0 a missing state / keys is never a fresh start (it dropped the context)."""
    model = _lm(layout)
    ids = _ids()
    cache = model.new_cache(2)
    model(ids[:, :6], cache=cache)
    layer = next(lc for lc in cache.layers if getattr(lc, field) is not None)
    setattr(layer, field, None)
    with pytest.raises(ValueError, match=match):
        model(ids[:, 6:7], cache=cache)


@pytest.mark.parametrize("layout", ["A", "B", "C"])
@torch.no_grad()
def test_fresh_and_continued_caches_still_decode_exactly(layout):
    model = _lm(layout)
    ids = _ids(length=11)
    cache = model.new_cache(2)
    parts = [model(ids[:, :5], cache=cache)] + [
        model(ids[:, t : t + 1], cache=cache) for t in range(5, 8)
    ]
    parts.append(model(ids[:, 8:], cache=cache))  # a chunk continuing from the cache
    torch.testing.assert_close(torch.cat(parts, dim=1), model(ids), rtol=1e-9, atol=1e-10)
    sizes = cache.nbytes()
    assert [d["kind"] for d in sizes["layers"]] == model.layer_types
    kinds = ",".join(k[0].upper() for k in model.layer_types)
    assert f"seq_len=11, layers=[{kinds}]" in repr(cache)
    # seq_len back to 0 restarts: the cached state and keys are replaced, not continued
    cache.seq_len = 0
    torch.testing.assert_close(model(ids[:, :5], cache=cache), model(ids[:, :5]))


def _decode(fn, model, ids, prefill: int):
    cache = model.new_cache(ids.shape[0])
    outs = [fn(ids[:, :prefill], cache=cache)]
    outs += [fn(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(outs, dim=1)


@torch.no_grad()
def test_compiled_checks_add_no_graph_break_or_recompile(fresh_compile, inductor_graphs):
    """backend="rtp" (Inductor's compile replaced by the graph run eagerly, for speed): prefill
    plus 8 decode steps compile 3 graphs (prefill, first step, the dynamic step; as before the
    checks) with no graph break, and a foreign cache is still refused compiled."""
    from torch._dynamo.utils import counters

    model = _lm("C", 0.5).float()
    ids = _ids(length=14)
    compiled = torch.compile(model, backend="rtp")
    got = _decode(compiled, model, ids, 6)
    torch.testing.assert_close(got, model(ids), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]
    graphs = counters["stats"]["unique_graphs"]
    _decode(compiled, model, _ids(length=14, seed=2), 6)  # a second sequence: no new graph
    assert counters["stats"]["unique_graphs"] == graphs
    other = _lm("A").float()
    cache = other.new_cache(2)
    other(ids[:, :6], cache=cache)
    with pytest.raises(ValueError, match="another layer plan"):
        torch.compile(_lm("B").float(), backend="rtp")(ids[:, 6:7], cache=cache)


# -- bug 2: past keys / values of the wrong length -----------------------------------------------


def test_past_keys_and_values_of_different_lengths_are_refused():
    att = CausalSelfAttention(32, 4)
    x = torch.randn(2, 3, 32)
    past = (torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 4, 8))
    with pytest.raises(ValueError, match="same number of positions P, got 3 keys and 4 values"):
        att(x, past=past, offset=3)


def test_past_length_must_equal_offset():
    """offset is the position of the first new token; past holds every earlier position."""
    torch.manual_seed(0)
    att = CausalSelfAttention(32, 4).to(F64)
    x = torch.randn(2, 7, 32, dtype=F64)
    k, v = torch.zeros(2, 4, 5, 8, dtype=F64), torch.zeros(2, 4, 5, 8, dtype=F64)
    with pytest.raises(ValueError, match="offset=2 .* needs 2 cached keys/values, got 5 .*window"):
        att(x[:, 5:], past=(k, v), offset=2)
    with pytest.raises(ValueError, match="offset=0 .* needs 0 cached keys/values, got 5"):
        att(x[:, 5:], past=(k, v))
    # the agreeing call continues the sequence exactly
    full = att(x)
    y0, past = att(x[:, :5], return_kv=True)
    y1, _ = att(x[:, 5:], past=past, offset=5)
    torch.testing.assert_close(torch.cat([y0, y1], dim=1), full, rtol=1e-10, atol=1e-12)


@torch.no_grad()
def test_a_cache_whose_seq_len_disagrees_with_its_keys_is_refused():
    model = _lm("B")
    ids = _ids()
    cache = model.new_cache(2)
    model(ids[:, :6], cache=cache)
    cache.seq_len = 4
    with pytest.raises(ValueError, match="offset=4 .* needs 4 cached keys/values, got 6"):
        model(ids[:, 6:7], cache=cache)


# -- bug 3: cache / input ids of the wrong type ----------------------------------------------------


def test_a_cache_that_is_not_a_hybrid_cache_is_refused():
    model = _lm("B")
    ids = _ids()
    with pytest.raises(TypeError, match="cache must be a HybridCache .*, got list"):
        model(ids, cache=[None] * 4)
    cache = HybridCache([None] * 4, 2)
    with pytest.raises(TypeError, match="cache layer 0 must be a LayerCache, got NoneType"):
        model(ids, cache=cache)
    model(ids, cache=HybridCache([LayerCache(k) for k in model.layer_types], 2))  # no state: ok


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int16, torch.float32])
def test_input_ids_of_a_non_index_dtype_are_refused(dtype):
    model = _lm("B")
    with pytest.raises(ValueError, match=rf"integer input_ids .*got \(2, 3\) {dtype}"):
        model(torch.ones(2, 3, dtype=dtype))


def test_input_ids_that_are_not_a_tensor_are_refused():
    model = _lm("B")
    with pytest.raises(TypeError, match="input_ids must be a tensor .*got list"):
        model([[1, 2, 3]])
    assert model(_ids().int()).shape == (2, 9, 61)  # int32 ids are fine


# -- bug 4: log_gamma keeps float32 on .half() / .bfloat16() ---------------------------------------


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to"])
def test_log_gamma_stays_float32_in_a_16_bit_module(cast):
    """float16 flushed log gamma of heads >= 20 to 0 (gamma = 1, no decay at all)."""
    m = MultiScaleRetention(256, 32)
    want = m.log_gamma.clone()
    if cast == "to":
        m = m.to(torch.float16)
    else:
        m = getattr(m, cast)()
    assert m.q_proj.weight.dtype in (torch.float16, torch.bfloat16)
    assert m.log_gamma.dtype == torch.float32 and torch.equal(m.log_gamma, want)
    assert (m.log_gamma < 0).all()
    assert torch.equal(m.float().log_gamma, want)  # and back, nothing lost
    assert m.double().log_gamma.dtype == F64
    torch.testing.assert_close(
        m.log_gamma, torch.log(retnet_decay(32)), rtol=1e-7, atol=0
    )  # float32 precision


def test_a_16_bit_module_still_runs_and_loads_state_dicts():
    torch.manual_seed(0)
    ref = MultiScaleRetention(64, 32, rotary=True)
    half = MultiScaleRetention(64, 32).half()
    half.load_state_dict(ref.state_dict())
    assert half.log_gamma.dtype == torch.float32
    x = torch.randn(1, 40, 64)
    with torch.no_grad():
        y, s = half(x.half(), return_state=True)
        want, want_s = ref.double()(x.double(), return_state=True)
    assert y.dtype == torch.float16 and s.dtype == torch.float32
    assert (s.double() - want_s).norm() < 2e-3 * want_s.norm()
    assert (y.double() - want).norm() < 5e-3 * want.norm()
    # learnable decays are a parameter: cast with the module as before
    assert MultiScaleRetention(64, 4, learnable_decay=True).half().decay_logit.dtype == (
        torch.float16
    )


# -- docs: rollback by keeping references -------------------------------------------------------


def _snapshot(cache: HybridCache):
    return cache.seq_len, [(lc.state, lc.keys, lc.values) for lc in cache.layers]


def _restore(cache: HybridCache, snap) -> None:
    cache.seq_len, tensors = snap
    for lc, (state, keys, values) in zip(cache.layers, tensors, strict=True):
        lc.state, lc.keys, lc.values = state, keys, values


@pytest.mark.parametrize("compiled", [False, True])
@torch.no_grad()
def test_rollback_by_keeping_references(compiled, fresh_compile, inductor_graphs):
    """Calls replace the cached tensors, never write into them: references taken after a call
    restore the cache to that point (what docs/modules.md promises in place of crop())."""
    model = _lm("C", 0.5)
    fn = torch.compile(model, backend="rtp") if compiled else model
    ids, other = _ids(length=9), _ids(length=9, seed=5)
    cache = model.new_cache(2)
    fn(ids[:, :6], cache=cache)
    snap = _snapshot(cache)
    first = [fn(other[:, t : t + 1], cache=cache) for t in range(6, 9)]  # a branch to drop
    _restore(cache, snap)
    again = torch.cat([fn(ids[:, t : t + 1], cache=cache) for t in range(6, 9)], dim=1)
    torch.testing.assert_close(again, model(ids)[:, 6:], rtol=1e-9, atol=1e-10)
    assert len(first) == 3 and cache.seq_len == 9


@torch.no_grad()
@pytest.mark.parametrize("layout", ["A", "C"])
def test_own_tensors_copies_every_tensor_and_decoding_goes_on_exactly(layout):
    """``HybridCache.own_tensors()`` (needed between calls under mode="reduce-overhead", where a
    call's new states and K/V live in a CUDA graph's pool): every state and K/V becomes a new
    storage with the same values, and decoding from the owned cache equals decoding without."""
    lm, ids = _lm(layout), _ids(length=7)
    plain, owned = lm.new_cache(2), lm.new_cache(2)
    lm(ids[:, :5], cache=plain)
    lm(ids[:, :5], cache=owned)
    before = [(n, getattr(layer, n)) for layer in owned.layers for n in ("state", "keys", "values")]
    assert owned.own_tensors() is owned
    after = [getattr(layer, n) for layer in owned.layers for n in ("state", "keys", "values")]
    assert sum(t is not None for _, t in before) >= 3
    for (name, old), new in zip(before, after, strict=True):
        if old is None:
            assert new is None, name
            continue
        assert new.untyped_storage().data_ptr() != old.untyped_storage().data_ptr(), name
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    for t in range(5, 7):
        want = lm(ids[:, t : t + 1], cache=plain)
        got = lm(ids[:, t : t + 1], cache=owned.own_tensors())
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert owned.seq_len == plain.seq_len == 7


# -- a call that raises part-way leaves the cache as it was (found 2026-11-25) ---------------------


@torch.no_grad()
@pytest.mark.parametrize("layout", ["A", "B", "C"])
def test_a_call_that_raises_in_a_later_layer_leaves_the_cache_unchanged(layout):
    """The layers before the failing one had already replaced their state or keys while
    ``seq_len`` stayed: a retry ran the chunk through them twice (layout B: logits off by 0.28,
    no error). Now the retry equals the full forward."""
    model = _lm(layout)
    ids = _ids(length=14)
    full = model(ids)
    cache = model.new_cache(2)
    first = model(ids[:, :9], cache=cache)
    before = [(lc.state, lc.keys, lc.values) for lc in cache.layers]

    def out_of_memory(module, args):
        raise RuntimeError("simulated out of memory")

    for where in (model.blocks[-1], model.norm):  # the last layer, or after every layer
        hook = where.register_forward_pre_hook(out_of_memory)
        with pytest.raises(RuntimeError, match="simulated out of memory"):
            model(ids[:, 9:], cache=cache)
        hook.remove()
        assert cache.seq_len == 9
        for lc, old in zip(cache.layers, before, strict=True):
            assert all(a is b for a, b in zip((lc.state, lc.keys, lc.values), old, strict=True))
    rest = model(ids[:, 9:], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-10, atol=1e-12)
