"""A compact decoder-only GPT for the evidence harness (nanoGPT-shaped, pre-norm, no biases).

    x = wte[idx] (+ wpe[pos] with learned positions)                  # (B, T, C)
    for block in blocks:                                              # an nn.ModuleList, so
        x = x + attn.c_proj(SDPA(rope(q), rope(k), v, causal))        #   fourbit.nn.convert can keep
        x = x + mlp(rms_norm(x))                                      #   the first/last blocks in HP
    logits = lm_head(rms_norm(x))                                     # lm_head.weight is wte.weight

Every GEMM a training recipe quantizes is an ``nn.Linear`` inside ``blocks``: ``attn.c_attn`` (C -> 3C),
``attn.c_proj`` (C -> C), ``mlp.c_fc`` (C -> H, or C -> 2H for SwiGLU's gate and up halves) and
``mlp.c_proj`` (H -> C). The embedding and the tied LM head stay plain ``nn.Embedding``/``nn.Linear``
outside the blocks; ``fourbit.nn.convert`` leaves them in high precision.

Sizes are multiples of 128 (C, H, 3C and B*T of every preset), so 1x16, 1x32, 1x128 and 128x128
quantization blocks tile every GEMM operand without padding.

Rotary positions (RoPE, arXiv 2104.09864) rotate each (even, odd) channel pair of q and k by the angle
``pos * base**(-2i/hs)``; SwiGLU (arXiv 2002.05202) is ``c_proj(silu(gate) * up)``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Positions", "MLPKind", "GPTConfig", "GPT", "PRESETS", "get_preset"]


class Positions(enum.Enum):
    ROPE = "rope"
    LEARNED = "learned"


class MLPKind(enum.Enum):
    SWIGLU = "swiglu"
    GELU = "gelu"


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 3406  # dense ids of the corpus under gpt2-4k (fourbit.harness.data); 19,379 under gpt2
    block_size: int = 128  # context length T
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # C
    mlp_hidden: int = 256  # H: SwiGLU's c_fc is C -> 2H, so H = 2C costs 6C^2 per MLP (GELU at 4C: 8C^2)
    positions: Positions = Positions.ROPE
    mlp: MLPKind = MLPKind.SWIGLU
    rope_base: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must split into {self.n_head} heads of even size")
        object.__setattr__(self, "positions", Positions(self.positions))  # accept "rope" from JSON
        object.__setattr__(self, "mlp", MLPKind(self.mlp))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["positions"], d["mlp"] = self.positions.value, self.mlp.value
        return d


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.hs = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def rope_tables(T: int, hs: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``pos * base**(-2i/hs)``, each ``(T, hs/2)`` in fp32."""
    inv_freq = base ** (-torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)  # (hs/2,)
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x[..., 2i], x[..., 2i+1])`` of ``x`` (B, nh, T, hs) by the tabulated angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, nh, T, hs/2)
    y = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return y.type_as(x)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        fc_out = 2 * cfg.mlp_hidden if cfg.mlp is MLPKind.SWIGLU else cfg.mlp_hidden
        self.c_fc = nn.Linear(cfg.n_embd, fc_out, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind is MLPKind.SWIGLU:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.attn(F.rms_norm(x, (x.size(-1),)), rope)
        return x + self.mlp(F.rms_norm(x, (x.size(-1),)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.positions is Positions.LEARNED else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        hs = cfg.n_embd // cfg.n_head
        cos, sin = rope_tables(cfg.block_size, hs, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(lin.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits ``(B, T, V)``, and the mean next-token cross-entropy (fp32) when ``targets`` is given."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(F.rms_norm(x, (x.size(-1),)))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# Presets (fourbit.harness.train.TRAIN_PRESETS holds the matching batch, steps and learning rate). Widths
# are multiples of 128 so fp8-blockwise's 128x128 weight blocks tile every layer. vocab_size is set from
# the data at build time (3,406 for gpt2-4k, 19,379 for gpt2).
# Depth 6 and 12 let ``HighPrecision()`` keep the paper's share of Linears in BF16: the last block of 6
# (16.7%) and the last 2 of 12 (16.7%); the paper's 12B keeps 10 of 62 blocks (16.1%). (tiny had 4 blocks,
# where one block is 25%.)
# tiny  : 6 x 128, ~1.2M non-embedding params; 5 recipes in ~15 min on 2 CPU cores (reference kernels)
# small : 6 x 256, ~3.9M non-embedding params; ~30 min per recipe on 2 CPU cores
# gpu   : 12 x 768 (GPT-2-small body), ~85M non-embedding + 15M embedding params; < 8 min on one H100
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=3406, block_size=128, n_layer=6, n_head=4, n_embd=128, mlp_hidden=256),
    "small": GPTConfig(vocab_size=3406, block_size=256, n_layer=6, n_head=4, n_embd=256, mlp_hidden=512),
    "gpu": GPTConfig(vocab_size=19379, block_size=512, n_layer=12, n_head=12, n_embd=768, mlp_hidden=2048),
}


def get_preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
