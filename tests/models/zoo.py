"""Tiny random models of the architectures qcompile is tested on, with input makers.

Each entry: name -> (build() -> model, make_inputs(batch, seq) -> tuple, output key).
Sizes stay tiny so the whole matrix of models x recipes runs in CI on 2 cores.
"""

from __future__ import annotations

import torch

VOCAB = 96


def _ids(b, s):
    return (torch.randint(0, VOCAB, (b, s)),)


def _hf(name):
    import transformers

    return getattr(transformers, name)


def llama():
    cfg = _hf("LlamaConfig")(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return _hf("LlamaForCausalLM")(cfg)


def mistral():
    cfg = _hf("MistralConfig")(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2)
    return _hf("MistralForCausalLM")(cfg)


def qwen2():
    cfg = _hf("Qwen2Config")(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return _hf("Qwen2ForCausalLM")(cfg)


def gpt2():
    cfg = _hf("GPT2Config")(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
    return _hf("GPT2LMHeadModel")(cfg)


def opt():
    cfg = _hf("OPTConfig")(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                           num_attention_heads=4, max_position_embeddings=64,
                           word_embed_proj_dim=64, pad_token_id=1, bos_token_id=0,
                           eos_token_id=0)
    return _hf("OPTForCausalLM")(cfg)


def bert():
    cfg = _hf("BertConfig")(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128)
    return _hf("BertModel")(cfg)


def vit():
    cfg = _hf("ViTConfig")(image_size=16, patch_size=4, num_channels=3, hidden_size=64,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return _hf("ViTModel")(cfg)


def mixtral():
    """Mixture of experts: a router picks 2 of 4 expert MLPs per token (top-k, gather)."""
    cfg = _hf("MixtralConfig")(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2)
    return _hf("MixtralForCausalLM")(cfg)


def gpt_neox():
    """Parallel attention and MLP off one residual, fused qkv, RoPE on a quarter of each
    head."""
    cfg = _hf("GPTNeoXConfig")(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4)
    return _hf("GPTNeoXForCausalLM")(cfg)


def bloom():
    """ALiBi position biases in the attention scores, fused qkv, embedding LayerNorm."""
    cfg = _hf("BloomConfig")(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)
    return _hf("BloomForCausalLM")(cfg)


def t5_encoder():
    """Relative position buckets added to the scores, scale-only RMSNorm, ReLU MLP."""
    cfg = _hf("T5Config")(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                          num_heads=4)
    return _hf("T5EncoderModel")(cfg)


def gemma2():
    """Norms before and after attention and MLP (1 + gamma), GeGLU, logit soft-capping,
    the embedding scaled by sqrt(hidden)."""
    cfg = _hf("Gemma2Config")(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16)
    return _hf("Gemma2ForCausalLM")(cfg)


class SmallCNN(torch.nn.Module):
    """Convolutions (left in float, and reported) feeding a quantized classifier head."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc1 = torch.nn.Linear(16 * 8 * 8, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _pixels(b, s):
    return (torch.randn(b, 3, 16, 16),)


MODELS = {
    "llama": (llama, _ids, "logits"),
    "mistral": (mistral, _ids, "logits"),
    "qwen2": (qwen2, _ids, "logits"),
    "gpt2": (gpt2, _ids, "logits"),
    "opt": (opt, _ids, "logits"),
    "bert": (bert, _ids, "last_hidden_state"),
    "vit": (vit, _pixels, "last_hidden_state"),
    "mixtral": (mixtral, _ids, "logits"),
    "gpt_neox": (gpt_neox, _ids, "logits"),
    "bloom": (bloom, _ids, "logits"),
    "t5_encoder": (t5_encoder, _ids, "last_hidden_state"),
    "gemma2": (gemma2, _ids, "logits"),
    "cnn": (SmallCNN, _pixels, None),
}


def output(out, key):
    return out if key is None else getattr(out, key)
