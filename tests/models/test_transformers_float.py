"""Capture + canonicalize only (recipe "float"): tiny random transformers models match
eager exactly, with dynamic shapes, and the report says nothing was quantized and why."""

import pytest
import torch

import qcompile

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg), "logits"


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg), "last_hidden_state"


def _bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64)
    return transformers.BertModel(cfg), "last_hidden_state"


@pytest.mark.parametrize("make", [_llama, _gpt2, _bert], ids=["llama", "gpt2", "bert"])
def test_float_pipeline_matches_eager_exactly(make):
    torch.manual_seed(0)
    model, key = make()
    model.eval()
    cm = torch.compile(model, backend="qcompile", options={"recipe": "float"})
    with torch.no_grad():
        for shape in [(2, 9), (3, 5)]:  # the second shape recompiles (dynamic)
            ids = torch.randint(0, 64, shape)
            assert torch.equal(getattr(cm(ids), key), getattr(model(ids), key))
    rep = qcompile.report(cm)
    assert rep.layers and not rep.quantized
    assert {layer.kind for layer in rep.layers} == {"linear", "attention"}
    assert all("quantizes nothing" in layer.reason for layer in rep.layers)
    assert "quantized: 0" in str(rep)
    counters = rep.graphs[0].counters
    assert counters["freeze-params.frozen"] > 0
