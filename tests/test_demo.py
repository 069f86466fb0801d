"""``rtpcompile demo`` in its tiny configuration, run in process."""

from __future__ import annotations

import pytest

from rtpcompile.bench import models, optional
from rtpcompile.cli import main


def _check_common(out: str) -> None:
    assert "rtpcompile demo" in out and "torch" in out
    explain_missing = optional.explain_fn()[0] is None
    assert ("explain: not available" in out) if explain_missing else ("regions claimed:" in out)
    assert "vs eager: max abs diff" in out and "MISMATCH" not in out
    assert "OK" in out
    assert "hybrid (rtp, type B)" in out and "full attention" in out


def test_demo_tiny(capsys):
    backends = "eager,rtp" if optional.rtp_backend_note() is None else "eager,inductor"
    argv = ["demo", "--tiny", "--backends", backends, "--no-train", "--no-plot", "--reps", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    _check_common(out)
    if optional.explain_fn()[0] is not None:
        assert "claimed" in out and "regions claimed: 0" not in out
    assert "prefill" in out and "T=16" in out


@pytest.mark.slow
def test_demo_tiny_all_backends_with_training_and_plot(capsys, tmp_path):
    plot = tmp_path / "demo.png"
    assert main(["demo", "--tiny", "--reps", "1", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    _check_common(out)
    assert "train step" in out
    assert plot.exists() == (optional.pyplot() is not None)


def test_demo_rejects_bad_options():
    with pytest.raises(SystemExit):
        main(["demo", "--backends", "inductor"])  # eager is the baseline and must be there
    with pytest.raises(SystemExit):
        main(["demo", "--lengths", "0,16"])


def test_regional_compile_leaves_the_model_eager():
    model = models.build_model(models.tiny_config())
    twin, note = models.compile_for(model, "inductor")
    assert note == "" and twin is not model
    assert all(not hasattr(b, "_orig_mod") for b in model.blocks)
    assert all(hasattr(b, "_orig_mod") for b in twin.blocks)
    assert twin.embed is model.embed  # parameters are shared, not copied


def test_cache_projection_and_synthetic_cache():
    model = models.build_model(models.tiny_config())
    cache = models.synthetic_cache(model, context=40)
    sizes = cache.nbytes()
    assert cache.seq_len == 40 and sizes["kv"] > 0 and sizes["state"] > 0
    assert models.kv_bytes_at(sizes, 40, 80) == sizes["state"] + 2 * sizes["kv"]
