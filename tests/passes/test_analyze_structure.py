"""analyze-structure: what it finds on tiny transformers models (pre-norm with RoPE and
grouped KV, fused QKV with tied embeddings, post-norm, patch convolutions) and on small
graphs where there is no residual stream to find. The graph never changes."""

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.passes._shapes import index_on_last
from qcompile.passes._structure import layer_name

transformers = pytest.importorskip("transformers")


def analyzed(model, *inputs):
    cap = qcompile.capture(model.eval(), *inputs, options={"recipe": "w8a8", "rotate": True})
    before = cap.run(until="canonicalize-norm").code
    cap.run(until="analyze-structure")
    assert cap.gm.code == before and not cap.ctx.history[-1].modified
    return cap.ctx.analysis["structure"], cap.ctx.counters


def test_llama_pre_norm_rope_grouped_kv():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2)
    s, counters = analyzed(transformers.LlamaForCausalLM(cfg), torch.randint(0, 64, (2, 7)))
    assert s.style == "pre-norm"
    [stream] = s.streams
    assert stream.hidden == 32 and len(stream.adds) == 2
    assert sorted(w.kind for w in stream.writers) == ["embedding", "linear", "linear"]
    assert sorted(w.role for w in stream.writers if w.kind == "linear") == ["attn_out",
                                                                          "mlp_down"]
    assert [r.kind for r in stream.readers] == ["norm"] * 3
    assert [len(n.linears) for n in s.norms] == [3, 2, 1]  # q/k/v, gate/up, lm_head
    assert all(n.position == "pre" for n in s.norms)
    [att] = s.attention
    assert (att.num_heads, att.num_kv_heads, att.head_dim, att.grouped) == (4, 2, 8, True)
    assert att.q.rope and att.k.rope and not att.v.rope
    assert (att.v.offset, att.v.width, att.v.head_dim) == (0, 16, 8)
    assert len(att.o_linears) == 1 and s.mlp_down[0].name == "down_proj"
    assert counters["analyze-structure.rope"] == 1 and counters["analyze-structure.grouped_kv"] == 1
    assert not s.tied


def test_gpt2_fused_qkv_and_tied_embeddings():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    s, _ = analyzed(transformers.GPT2LMHeadModel(cfg), torch.randint(0, 64, (2, 7)))
    [att] = s.attention
    assert att.q_linear is att.k_linear is att.v_linear  # c_attn, split in three
    assert [(f.offset, f.width) for f in (att.q, att.k, att.v)] == [(0, 32), (32, 32), (64, 32)]
    [stream] = s.streams
    assert sorted(w.kind for w in stream.writers) == ["embedding", "embedding", "linear", "linear"]
    assert len(s.tied) == 1 and s.tied[0][1].target is F.linear  # lm_head reads wte
    assert s.style == "pre-norm"


def test_bert_is_post_norm():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64)
    s, counters = analyzed(transformers.BertModel(cfg), torch.randint(0, 64, (2, 7)))
    assert s.style == "post-norm" and counters["analyze-structure.post_norm"] == 1
    assert [n.position for n in s.norms] == ["post", "post", "pre"]
    assert sum(st.post_norm for st in s.streams) == 2
    assert len(s.mlp_down) == 1 and len(s.attention) == 1


def test_vit_patch_conv_and_constants_write_the_stream():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, image_size=16, patch_size=4)
    s, _ = analyzed(transformers.ViTModel(cfg), torch.randn(2, 3, 16, 16))
    [stream] = s.streams
    kinds = sorted(w.kind for w in stream.writers)
    assert kinds == ["constant", "constant", "conv", "linear", "linear"]  # cls, positions
    conv = next(w for w in stream.writers if w.kind == "conv")
    assert conv.source.target is F.conv2d and s.style == "pre-norm"


class NoResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.norm(x)).relu()


class NonLinearWriter(torch.nn.Module):
    """x + relu(fc(x)): the writer is a relu, which nothing can fold into."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.fc(x).relu())


def test_no_residual_stream():
    s, _ = analyzed(NoResidual(), torch.randn(2, 16))
    assert s.style == "none" and not s.streams and not s.attention
    [norm] = s.norms
    assert norm.all_linear and norm.position == "none"


def test_non_linear_writer_and_input_are_recorded():
    s, _ = analyzed(NonLinearWriter(), torch.randn(2, 16))
    [stream] = s.streams
    assert sorted(w.kind for w in stream.writers) == ["other", "other"]  # relu, graph input
    assert not any(w.foldable for w in stream.writers)


@pytest.mark.parametrize("index, expected", [
    ((slice(None), 0), "untouched"),
    ((Ellipsis, slice(None, 4)), (None, 4)),
    ((Ellipsis, slice(0, 8)), "untouched"),
    ((slice(None), slice(None), slice(2, None)), (2, None)),
    ((Ellipsis, 0), None),
    ((Ellipsis, None), None),
    ((slice(None), None), "untouched"),
])
def test_index_on_last(index, expected):
    assert index_on_last(index, 3, 8) == expected


def tiny_gemma3():
    """Gemma 3's sandwich norms (a norm before and after attention and the MLP), q/k norms,
    GeGLU, a sliding-window layer, the embedding scaled by sqrt(d), norm weights stored as
    offsets from 1."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def test_gemma3_sandwich_norms_write_the_stream():
    s, counters = analyzed(tiny_gemma3(), torch.randint(0, 64, (2, 7)))
    assert s.style == "post-norm" and counters["analyze-structure.post_norm"] == 1
    [stream] = s.streams
    # the norms after attention and after the MLP write the stream, through their weights
    # (1 + w, a constant once canonicalized); the scaled embedding is not a plain writer
    assert sorted(w.kind for w in stream.writers) == ["norm"] * 4 + ["other"]
    # the MLP down projections are found behind the norms of their outputs
    assert [layer_name(n) for n in s.mlp_down] == [f"model.layers.{i}.mlp.down_proj"
                                                   for i in range(2)]
    assert counters["analyze-structure.mlp_down"] == 2
    assert len(s.attention) == 2
    assert sorted(n.position for n in s.norms).count("post") == 4
