"""A grammar of small random models: the ops qcompile's passes match and the ops around them.

A model is a `Case`: an input width, a tuple of blocks, and how it is run (batch, sequence,
dtype, contiguity, dynamic shapes, kernels, recipe options). Every spec is a frozen
dataclass whose repr is valid Python, so the minimal failing example hypothesis prints can
be pasted into a regression test as it stands (tests/fuzz/test_regressions.py).

Blocks map a hidden state x [B, S, D] to [B, S, D'] (the grammar tracks D):

  Linear     every spelling of "x times a constant weight": nn.Linear, F.linear (positional,
             keywords, without bias), x @ w.t(), x @ w.T, x @ w.transpose(0, 1),
             torch.matmul against a [K, N] weight, torch.mm and torch.addmm on the 2-D view,
             GPT-2's Conv1D (addmm with a [K, N] weight, then a view back)
  Norm       nn.LayerNorm, nn.RMSNorm, F.layer_norm, torch.rms_norm, decomposed RMSNorm
             (x * rsqrt(mean(x**2) + eps) * w, with LLaMA's float32 round trip or not),
             decomposed LayerNorm ((x - mean) / sqrt(var + eps) * w + b)
  Act        GELU (exact, tanh, GPT-2's spelled-out tanh form), SiLU, ReLU
  MLP        up -> act -> down, or gated (SwiGLU: down(act(gate(x)) * up(x)))
  Residual   x + inner(norm(x)) (pre-norm) or norm(x + inner(x)) (post-norm)
  Attention  q / k / v projections (separate, or one fused projection split or chunked),
             heads through view + transpose, then F.scaled_dot_product_attention (masks,
             is_causal, scale, GQA through enable_gqa or repeat_interleave) or the explicit
             softmax(q @ k.transpose(-2, -1) * scale [+ mask]) @ v; out projection
  Layout     shape-preserving round trips: transpose / permute / view / reshape / flatten
  SplitCat   split or chunk the last dim, a linear per part, cat
  Broadcast  x * gain[D] + shift[1, 1, D], or x + mean over the sequence
  Break      torch._dynamo.graph_break(), a print, or a data-dependent branch

Weights use PyTorch's default initialization (well-conditioned: outputs stay O(1) through a
few blocks), seeded per case so a case always builds the same model.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

LINEAR_SPELLINGS = ("module", "F.linear", "F.linear-kw", "t", "T", "transpose", "matmul",
                    "mm", "addmm", "conv1d")
NORMS = ("LayerNorm", "RMSNorm", "F.layer_norm", "torch.rms_norm", "rms-decomposed",
         "rms-llama", "ln-decomposed")
ACTS = ("relu", "gelu", "gelu-tanh", "gelu-gpt2", "silu")
LAYOUTS = ("transpose", "permute", "view", "reshape-flatten", "contiguous-T")
BREAKS = ("graph_break", "print", "branch")
ATTENTION_SPELLINGS = ("sdpa", "sdpa-positional", "explicit", "explicit-div", "explicit-mT")
MASKS = (None, "causal", "bool", "additive", "padding")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------
# block specs (frozen, printable as Python)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    out: int
    spelling: str = "module"
    bias: bool = True


@dataclass(frozen=True)
class Norm:
    kind: str = "LayerNorm"


@dataclass(frozen=True)
class Act:
    kind: str = "relu"


@dataclass(frozen=True)
class MLP:
    hidden: int
    act: str = "relu"
    gated: bool = False
    spelling: str = "module"


@dataclass(frozen=True)
class Residual:
    inner: tuple = ()
    norm: str | None = None
    post_norm: bool = False


@dataclass(frozen=True)
class Attention:
    heads: int = 1
    kv_heads: int | None = None  # None: as many as heads
    spelling: str = "sdpa"
    mask: str | None = None
    scale: float | None = None
    fused_qkv: str | None = None  # None, "split" or "chunk"
    gqa: str = "enable_gqa"  # how fewer kv heads are spread: "enable_gqa" or "repeat"
    bias: bool = True


@dataclass(frozen=True)
class Layout:
    kind: str = "transpose"


@dataclass(frozen=True)
class SplitCat:
    kind: str = "split"  # "split" or "chunk"


@dataclass(frozen=True)
class Broadcast:
    kind: str = "affine"  # "affine" or "seq-mean"


@dataclass(frozen=True)
class Break:
    kind: str = "graph_break"


@dataclass(frozen=True)
class Conv:
    """A convolution over the sequence: [B, S, D] as channels D (conv1d over S, or conv2d
    over [S, 1]), optionally followed by eval-mode batch norm and an activation."""

    kind: str = "conv1d"  # "conv1d", "conv2d", "F.conv1d"
    k: int = 3  # odd: "same" length
    groups: int = 1  # 1, 2 or D (depthwise)
    bn: bool = False
    act: str | None = None  # None, "relu", "relu6", "hardswish", "silu"


@dataclass(frozen=True)
class Case:
    """One random model and how it is compiled and run."""

    d: int = 16
    blocks: tuple = (Linear(16),)
    batch: int = 2
    seq: int = 3
    dtype: str = "float32"
    contiguous: bool = True
    dynamic: bool = False
    kernels: str = "cpu"
    options: tuple = ()  # extra recipe options as (name, value) pairs
    tuple_output: bool = False
    seed: int = 0
    calib_seq: int = 4  # calibration batches are [8, calib_seq, d]
    loop: bool = False  # run the blocks in a for loop (see run_blocks)


# ----------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------


class LinearOp(torch.nn.Module):
    """y = x W^T + b in one of the spellings; W is stored the way the spelling reads it."""

    def __init__(self, k: int, n: int, spelling: str, bias: bool):
        super().__init__()
        self.spelling, self.k, self.n = spelling, k, n
        if spelling in ("addmm", "conv1d"):
            bias = True  # addmm adds its first operand
        ref = torch.nn.Linear(k, n, bias=bias)
        if spelling == "module":
            self.fc = ref
            return
        w = ref.weight.detach().clone()
        if spelling in ("matmul", "mm", "addmm", "conv1d"):
            w = w.t().contiguous()  # [K, N], as Conv1D stores it
        self.weight = torch.nn.Parameter(w)
        self.bias = torch.nn.Parameter(ref.bias.detach().clone()) if bias else None

    def forward(self, x):
        s, w, b = self.spelling, getattr(self, "weight", None), getattr(self, "bias", None)
        if s == "module":
            return self.fc(x)
        if s == "F.linear":
            return F.linear(x, w, b) if b is not None else F.linear(x, w)
        if s == "F.linear-kw":
            return F.linear(input=x, weight=w, bias=b)
        if s in ("t", "T", "transpose"):
            wt = w.t() if s == "t" else w.T if s == "T" else w.transpose(0, 1)
            y = x @ wt
        elif s == "matmul":
            y = torch.matmul(x, w)
        elif s == "mm":
            y = torch.mm(x.reshape(-1, self.k), w).view(*x.shape[:-1], self.n)
        else:  # addmm / conv1d (GPT-2's Conv1D.forward)
            size_out = x.size()[:-1] + (self.n,)
            # GPT-2 views its (always contiguous) input; a strided one needs the copy
            y = torch.addmm(b, x.contiguous().view(-1, x.size(-1)) if s == "conv1d"
                            else x.reshape(-1, self.k), w)
            return y.view(size_out)
        return y + b if b is not None else y


class NormOp(torch.nn.Module):
    def __init__(self, d: int, kind: str):
        super().__init__()
        self.kind, self.eps = kind, 1e-5
        if kind == "LayerNorm":
            self.norm = torch.nn.LayerNorm(d)
        elif kind == "RMSNorm":
            self.norm = torch.nn.RMSNorm(d, eps=1e-6)
        else:
            self.weight = torch.nn.Parameter(1.0 + 0.1 * torch.randn(d))
            if kind in ("F.layer_norm", "ln-decomposed"):
                self.bias = torch.nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        k = self.kind
        if k in ("LayerNorm", "RMSNorm"):
            return self.norm(x)
        if k == "F.layer_norm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if k == "torch.rms_norm":
            return torch.rms_norm(x, [x.shape[-1]], self.weight, self.eps)
        if k == "rms-decomposed":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        if k == "rms-llama":
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * h.to(x.dtype)
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def activation(x, kind: str):
    if kind == "relu":
        return torch.relu(x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu-tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "gelu-gpt2":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
                                           * (x + 0.044715 * torch.pow(x, 3.0))))
    return F.silu(x)


class ActOp(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return activation(x, self.kind)


class MLPOp(torch.nn.Module):
    def __init__(self, d: int, spec: MLP):
        super().__init__()
        self.act, self.gated = spec.act, spec.gated
        self.up = LinearOp(d, spec.hidden, spec.spelling, True)
        if spec.gated:
            self.gate = LinearOp(d, spec.hidden, spec.spelling, False)
        self.down = LinearOp(spec.hidden, d, spec.spelling, True)

    def forward(self, x):
        h = activation(self.up(x), self.act) if not self.gated else \
            activation(self.gate(x), self.act) * self.up(x)
        return self.down(h)


class ResidualOp(torch.nn.Module):
    def __init__(self, d: int, spec: Residual, loop: bool = False):
        super().__init__()
        self.post = spec.post_norm
        self.norm = NormOp(d, spec.norm) if spec.norm else None
        modules = []
        for block in spec.inner:
            module, d_out = build_block(block, d, loop)
            assert d_out == d, "residual blocks keep the width"
            modules.append(module)
        self.inner = Sequence(modules, loop)

    def forward(self, x):
        h = self.norm(x) if self.norm is not None and not self.post else x
        h = self.inner(h)
        y = x + h
        return self.norm(y) if self.norm is not None and self.post else y


class AttentionOp(torch.nn.Module):
    def __init__(self, d: int, spec: Attention):
        super().__init__()
        self.spec = spec
        self.h = spec.heads
        self.kvh = spec.kv_heads or spec.heads
        self.dh = d // spec.heads
        kv = self.kvh * self.dh
        if spec.fused_qkv:
            self.qkv = torch.nn.Linear(d, d + 2 * kv, bias=spec.bias)
        else:
            self.q = torch.nn.Linear(d, d, bias=spec.bias)
            self.k = torch.nn.Linear(d, kv, bias=spec.bias)
            self.v = torch.nn.Linear(d, kv, bias=spec.bias)
        self.o = torch.nn.Linear(d, d, bias=spec.bias)

    def _mask(self, x, s: int):
        kind = self.spec.mask
        keep = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        if kind == "bool":
            return keep
        if kind == "additive":
            return torch.zeros(s, s, dtype=x.dtype, device=x.device).masked_fill(
                ~keep, float("-inf"))
        if kind == "padding":  # the last key is padding for every query but the first key
            pad = torch.ones(x.shape[0], 1, 1, s, dtype=torch.bool, device=x.device)
            if s > 1:
                pad[..., -1] = False
            return pad
        return None

    def forward(self, x):
        b, s, d = x.shape
        spec, kvd = self.spec, self.kvh * self.dh
        if spec.fused_qkv == "split":
            q, k, v = self.qkv(x).split([d, kvd, kvd], dim=-1)
        elif spec.fused_qkv == "chunk":  # equal parts only when kv heads == heads
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, s, self.h, self.dh).transpose(1, 2)  # [B, H, S, Dh]
        k = k.view(b, s, self.kvh, self.dh).transpose(1, 2)  # [B, KVH, S, Dh]
        v = v.view(b, s, self.kvh, self.dh).transpose(1, 2)
        gqa = self.kvh != self.h
        if gqa and (spec.gqa == "repeat" or spec.spelling.startswith("explicit")):
            k = k.repeat_interleave(self.h // self.kvh, dim=1)
            v = v.repeat_interleave(self.h // self.kvh, dim=1)
            gqa = False
        mask = self._mask(x, s)
        causal = spec.mask == "causal"
        scale = spec.scale
        if spec.spelling == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               scale=scale, enable_gqa=gqa)
        elif spec.spelling == "sdpa-positional":
            o = F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale=scale,
                                               enable_gqa=gqa)
        else:
            kt = k.mT if spec.spelling == "explicit-mT" else k.transpose(-2, -1)
            sm = scale if scale is not None else 1.0 / math.sqrt(self.dh)
            if spec.spelling == "explicit-div":
                scores = (q @ kt) / (1.0 / sm)
            else:
                scores = torch.matmul(q, kt) * sm
            if causal:
                mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                    ~mask, float("-inf"))
            if mask is not None:
                scores = scores + mask
            o = F.softmax(scores, dim=-1) @ v
        o = o.transpose(1, 2).reshape(b, s, d)  # [B, S, D]
        return self.o(o)


class ConvOp(torch.nn.Module):
    def __init__(self, d: int, spec: Conv):
        super().__init__()
        self.spec = spec
        groups = d if spec.groups == -1 else spec.groups
        pad = spec.k // 2
        if spec.kind == "conv2d":
            self.conv = torch.nn.Conv2d(d, d, (spec.k, 1), padding=(pad, 0), groups=groups)
            self.bn = torch.nn.BatchNorm2d(d) if spec.bn else None
        else:
            self.conv = torch.nn.Conv1d(d, d, spec.k, padding=pad, groups=groups)
            self.bn = torch.nn.BatchNorm1d(d) if spec.bn else None
        if self.bn is not None:  # statistics as after training
            with torch.no_grad():
                self.bn.running_mean.uniform_(-0.5, 0.5)
                self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):  # [B, S, D]
        y = x.transpose(1, 2)  # [B, D, S]
        if self.spec.kind == "conv2d":
            y = self.conv(y.unsqueeze(-1)).squeeze(-1)  # [B, D, S, 1] -> [B, D, S]
            y = self.bn(y.unsqueeze(-1)).squeeze(-1) if self.bn is not None else y
        else:
            if self.spec.kind == "F.conv1d":
                y = F.conv1d(y, self.conv.weight, self.conv.bias, padding=self.spec.k // 2,
                             groups=self.conv.groups)
            else:
                y = self.conv(y)
            y = self.bn(y) if self.bn is not None else y
        act = self.spec.act
        if act == "relu":
            y = F.relu(y)
        elif act == "relu6":
            y = F.relu6(y)
        elif act == "hardswish":
            y = F.hardswish(y)
        elif act == "silu":
            y = F.silu(y)
        return y.transpose(1, 2)  # [B, S, D]


class LayoutOp(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        b, s, d = x.shape
        k = self.kind
        if k == "transpose":
            return (x.transpose(0, 1) * 1.0).transpose(0, 1)
        if k == "permute":
            return x.permute(2, 0, 1).permute(1, 2, 0)
        if k == "view":
            return x.contiguous().view(b, s, 2, d // 2).view(b, s, d)
        if k == "reshape-flatten":
            return x.flatten(0, 1).reshape(b, s, d)
        return x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous result


class SplitCatOp(torch.nn.Module):
    def __init__(self, d: int, kind: str):
        super().__init__()
        self.kind, self.half = kind, d // 2
        self.a = torch.nn.Linear(d // 2, d // 2)
        self.b = torch.nn.Linear(d - d // 2, d - d // 2)

    def forward(self, x):
        if self.kind == "chunk" and x.shape[-1] % 2 == 0:
            left, right = x.chunk(2, dim=-1)
        else:
            left, right = x.split([self.half, x.shape[-1] - self.half], dim=-1)
        return torch.cat([self.a(left), self.b(right)], dim=-1)


class BroadcastOp(torch.nn.Module):
    def __init__(self, d: int, kind: str):
        super().__init__()
        self.kind = kind
        self.gain = torch.nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.shift = torch.nn.Parameter(0.1 * torch.randn(1, 1, d))

    def forward(self, x):
        if self.kind == "affine":
            return x * self.gain + self.shift
        return x + x.mean(dim=1, keepdim=True)  # [B, 1, D] broadcast over the sequence


class BreakOp(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.sink = io.StringIO()  # print's output goes nowhere

    def forward(self, x):
        if self.kind == "graph_break":
            torch._dynamo.graph_break()
        elif self.kind == "print":
            print("qcompile fuzz", file=self.sink)
        elif x.abs().sum() >= 0:  # data-dependent: always taken (finite x)
            x = x * 1.0
        else:
            x = x + 0.0
        return x


def build_block(spec, d: int, loop: bool = False) -> tuple[torch.nn.Module, int]:
    """The module for one block spec and its output width."""
    if isinstance(spec, Linear):
        return LinearOp(d, spec.out, spec.spelling, spec.bias), spec.out
    if isinstance(spec, Norm):
        return NormOp(d, spec.kind), d
    if isinstance(spec, Act):
        return ActOp(spec.kind), d
    if isinstance(spec, MLP):
        return MLPOp(d, spec), d
    if isinstance(spec, Residual):
        return ResidualOp(d, spec, loop), d
    if isinstance(spec, Attention):
        return AttentionOp(d, spec), d
    if isinstance(spec, Layout):
        return LayoutOp(spec.kind), d
    if isinstance(spec, Conv):
        return ConvOp(d, spec), d
    if isinstance(spec, SplitCat):
        return SplitCatOp(d, spec.kind), d
    if isinstance(spec, Broadcast):
        return BroadcastOp(d, spec.kind), d
    if isinstance(spec, Break):
        return BreakOp(spec.kind), d
    raise TypeError(f"unknown block spec {spec!r}")


MAX_BLOCKS = 6


class Sequence(torch.nn.Module):
    """Blocks applied in turn. Unrolled unless `loop`: a graph break inside a for loop makes
    Dynamo skip the looping frame and compile each block's frame on its own, with parameter
    names relative to the block (tests/fuzz/test_regressions.py has that case). A method,
    not a helper function taking the blocks: Dynamo then compiles frames whose module is
    `self` (test_regressions.py has the helper-function case too)."""

    def __init__(self, blocks: list[torch.nn.Module], loop: bool):
        super().__init__()
        assert len(blocks) <= MAX_BLOCKS
        self.blocks, self.loop = torch.nn.ModuleList(blocks), loop

    def forward(self, x):
        if self.loop:
            for block in self.blocks:
                x = block(x)
            return x
        n = len(self.blocks)
        if n > 0:
            x = self.blocks[0](x)
        if n > 1:
            x = self.blocks[1](x)
        if n > 2:
            x = self.blocks[2](x)
        if n > 3:
            x = self.blocks[3](x)
        if n > 4:
            x = self.blocks[4](x)
        if n > 5:
            x = self.blocks[5](x)
        return x


class FuzzModel(torch.nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        self.tuple_output = case.tuple_output
        modules, d = [], case.d
        for spec in case.blocks:
            module, d = build_block(spec, d, case.loop)
            modules.append(module)
        self.body = Sequence(modules, case.loop)

    def forward(self, x):
        x = self.body(x)
        if self.tuple_output:
            return x, x.sum(dim=-1)
        return x


def build_model(case: Case) -> torch.nn.Module:
    """The case's model, in eval mode and the case's dtype; the same weights every time."""
    with torch.random.fork_rng():
        torch.manual_seed(case.seed)
        model = FuzzModel(case)
    return model.eval().to(DTYPES[case.dtype])


def make_input(case: Case, batch: int, seq: int, seed: int) -> torch.Tensor:
    """x [batch, seq, d] in the case's dtype; non-contiguous when the case says so."""
    g = torch.Generator().manual_seed(seed)
    if case.contiguous:
        x = torch.randn(batch, seq, case.d, generator=g)
    else:
        x = torch.randn(seq, batch, 2 * case.d, generator=g).transpose(0, 1)[..., ::2]
    return x.to(DTYPES[case.dtype])


def model_linears(model: torch.nn.Module) -> list[str]:
    """The report's name of every linear the model computes: its weight's path, less
    `.weight` (nn.Linear modules, and the functional spellings' own weights)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.append(name)
        elif isinstance(module, LinearOp) and module.spelling != "module":
            names.append(name)  # its own `weight` parameter
    return names


def count_attention(blocks) -> int:
    n = 0
    for block in blocks:
        if isinstance(block, Attention):
            n += 1
        elif isinstance(block, Residual):
            n += count_attention(block.inner)
    return n


# ----------------------------------------------------------------------------------------
# strategies (the first choice of each is the simplest: hypothesis shrinks towards it)
# ----------------------------------------------------------------------------------------

WIDTHS = (16, 8, 32, 24, 12)
HIDDEN = (16, 32, 8, 24, 9)


@st.composite
def attention_specs(draw, d: int):
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0 and d // h >= 2]))
    kv = draw(st.sampled_from([None] + [k for k in (1, 2) if k < heads and heads % k == 0]))
    spelling = draw(st.sampled_from(ATTENTION_SPELLINGS))
    mask = draw(st.sampled_from(MASKS))
    fused = draw(st.sampled_from((None, "split", "chunk") if kv is None else (None, "split")))
    return Attention(heads=heads, kv_heads=kv, spelling=spelling, mask=mask,
                     scale=draw(st.sampled_from((None, 0.5, 0.125))), fused_qkv=fused,
                     gqa=draw(st.sampled_from(("enable_gqa", "repeat"))),
                     bias=draw(st.booleans()))


@st.composite
def width_blocks(draw, d: int, depth: int = 0):
    """A block that keeps the width d."""
    kinds = ["mlp", "act", "norm", "attention", "layout", "broadcast", "break", "splitcat",
             "linear", "conv"]
    if depth == 0:
        kinds.append("residual")
    kind = draw(st.sampled_from(kinds))
    if kind == "mlp":
        return MLP(hidden=draw(st.sampled_from(HIDDEN)), act=draw(st.sampled_from(ACTS)),
                   gated=draw(st.booleans()), spelling=draw(st.sampled_from(LINEAR_SPELLINGS)))
    if kind == "act":
        return Act(draw(st.sampled_from(ACTS)))
    if kind == "norm":
        return Norm(draw(st.sampled_from(NORMS)))
    if kind == "attention":
        return draw(attention_specs(d))
    if kind == "layout":
        return Layout(draw(st.sampled_from(LAYOUTS if d % 2 == 0 else LAYOUTS[:2])))
    if kind == "broadcast":
        return Broadcast(draw(st.sampled_from(("affine", "seq-mean"))))
    if kind == "break":
        return Break(draw(st.sampled_from(BREAKS)))
    if kind == "splitcat":
        return SplitCat(draw(st.sampled_from(("split", "chunk"))))
    if kind == "linear":
        return Linear(d, draw(st.sampled_from(LINEAR_SPELLINGS)), draw(st.booleans()))
    if kind == "conv":
        return Conv(draw(st.sampled_from(("conv1d", "conv2d", "F.conv1d"))),
                    draw(st.sampled_from((3, 1, 5))), draw(st.sampled_from((1, 2, -1))),
                    draw(st.booleans()),
                    draw(st.sampled_from((None, "relu", "relu6", "hardswish", "silu"))))
    inner = draw(st.lists(width_blocks(d, depth + 1), min_size=1, max_size=2))
    norm = draw(st.sampled_from((None,) + NORMS))
    return Residual(tuple(inner), norm, post_norm=draw(st.booleans()))


@st.composite
def block_lists(draw, d: int, max_blocks: int = 4):
    """1..max_blocks blocks; a width-changing Linear may appear anywhere."""
    blocks, width = [], d
    for _ in range(draw(st.integers(1, max_blocks))):
        if draw(st.integers(0, 4)) == 0:
            out = draw(st.sampled_from(WIDTHS))
            blocks.append(Linear(out, draw(st.sampled_from(LINEAR_SPELLINGS)),
                                 draw(st.booleans())))
            width = out
        else:
            blocks.append(draw(width_blocks(width)))
    return tuple(blocks)


# options a recipe may take on top of its defaults (the first value is the default)
RECIPE_OPTIONS = {
    "w8a8": {"smooth": (None, True)},
    "w8a8-static": {"observer": (None, "moving-minmax", "percentile", "mse"),
                    "integer_nonlinear": (None, True), "smooth": (None, True),
                    "rotate": (None, True)},
    "w4a16": {"gptq": (None, True)},
    "w4a8": {"rotate": (None, False), "online_hadamard": (None, False)},
    "w4a4": {"gptq": (None, False)},
    "w4a4-static": {"gptq": (None, False), "observer": (None, "minmax")},
    "float": {},
}


def has_parameters(blocks) -> bool:
    """Whether the model computes with a parameter (a seq-mean Broadcast holds some, unused:
    Dynamo's graphs do not see them)."""
    return any(has_parameters(b.inner) or b.norm is not None if isinstance(b, Residual)
               else b.kind == "affine" if isinstance(b, Broadcast)
               else not isinstance(b, (Act, Layout, Break)) for b in blocks)


@st.composite
def cases(draw, recipe: str, max_blocks: int = 4):
    d = draw(st.sampled_from(WIDTHS))
    options = []
    for name, values in RECIPE_OPTIONS[recipe].items():
        value = draw(st.sampled_from(values))
        if value is not None:
            options.append((name, value))
    blocks = draw(block_lists(d, max_blocks))
    if not has_parameters(blocks):
        # a model without parameters cannot be calibrated (test_regressions.py has it)
        blocks += (Linear(d),)
    return Case(
        d=d,
        blocks=blocks,
        batch=draw(st.sampled_from((2, 1, 0, 3))),
        seq=draw(st.sampled_from((3, 1, 2, 5))),
        dtype=draw(st.sampled_from(tuple(DTYPES))),
        contiguous=draw(st.booleans()),
        dynamic=draw(st.booleans()),
        kernels=draw(st.sampled_from(("cpu", "reference", "auto"))),
        options=tuple(options),
        tuple_output=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        calib_seq=draw(st.sampled_from((4, 1, 3))),
        loop=draw(st.booleans()),
    )
