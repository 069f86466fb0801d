"""distill(): stage 1 lowers the layer-matching MSE training only new parameters; stage 2 the KL."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rtpcompile.convert import distill, retrofit

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face models need the transformers extra"
)


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches(n=2, batch=2, length=16):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 97, (batch, length), generator=gen) for _ in range(n)]


def test_stage1_lowers_mse_and_touches_only_new_parameters():
    model = _llama()
    teacher = copy.deepcopy(model)
    ids = _batches(1)[0]
    with torch.no_grad():
        original = teacher(ids).logits
    handle = retrofit(model, ratio=0.5)
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not any(p is q for q in handle.new_parameters())
    }
    lines = []
    result = distill(
        model, teacher, _batches(), stage1_steps=15, lr1=3e-2, log_every=5, log=lines.append
    )
    assert len(result.stage1) == 15 and result.stage2 == []
    assert result.stage1[-1] < 0.9 * result.stage1[0]
    assert len(lines) == 3 and "stage 1 step 15/15" in lines[-1]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
            assert p.requires_grad  # flags restored
    handle.undo()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original)


def test_stage2_lowers_kl():
    model = _llama()
    teacher = copy.deepcopy(model)
    retrofit(model, ratio=0.5)
    data = _batches(1)
    result = distill(
        model, teacher, data, stage1_steps=3, stage2_steps=10, lr2=3e-3, progress=False
    )
    assert len(result.stage2) == 10
    assert result.stage2[-1] < result.stage2[0]


def test_distill_plain_multihead_model():
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 50)

        def forward(self, ids):
            x = self.emb(ids)
            mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
            return self.head(x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])

    model = LM()
    teacher = copy.deepcopy(model)
    retrofit(model, ratio=1.0)
    data = [torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))]
    result = distill(model, teacher, data, stage1_steps=20, stage2_steps=3, progress=False)
    assert result.stage1[-1] < result.stage1[0]
    assert all(torch.isfinite(torch.tensor(result.stage2)))


def test_distill_rejects_bad_arguments():
    model = _llama()
    with pytest.raises(ValueError, match="no converted layers"):
        distill(model, copy.deepcopy(model), _batches())
    retrofit(model)
    with pytest.raises(ValueError, match="separate"):
        distill(model, model, _batches())
    with pytest.raises(ValueError, match="stage1_params"):
        distill(model, copy.deepcopy(model), _batches(), stage1_params="all")
