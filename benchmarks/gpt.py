"""The benchmark workload: a nanoGPT-style byte-level decoder in plain torch, and its corpus.

The corpus is built in (the Python standard library's own source, found through ``sysconfig``)
so that every machine can rerun the numbers without a download; a user's text file also works.
Model sizes span ~1M to ~50M parameters so that the same code can put communication above or
below compute on a given network.
"""

from __future__ import annotations

import os
import pathlib
import sysconfig
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # bytes


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 128
    tied: bool = True  # the head shares the token embedding (GPT-2); False: a head of its own


# Parameter counts (tied embeddings): tiny ~0.8M, small ~3.3M, medium ~19M, large ~43M, gpt125m
# ~127M (GPU runs: block 1024, head size 64); nano (~22k) only exercises the code paths (smoke tests).
# tiny64u (~0.85M) is issue 22's second setup: tiny's depth and width, context 64, untied head; tiny64 and
# tinyu change one of the two alone (to tell which one moves zero1's best rate).
MODELS: dict[str, GPTConfig] = {
    "nano": GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32),
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128),
    "tiny64u": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, tied=False),
    "tiny64": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "tinyu": GPTConfig(n_layer=4, n_head=4, n_embd=128, tied=False),
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=256),
    "medium": GPTConfig(n_layer=6, n_head=8, n_embd=512),
    "large": GPTConfig(n_layer=6, n_head=12, n_embd=768),
    "gpt125m": GPTConfig(n_layer=10, n_head=16, n_embd=1024, block_size=1024),
}


def model_config(name: str) -> GPTConfig:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def config_dict(config: GPTConfig) -> dict:
    return asdict(config)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer over bytes; ``forward(idx, targets)`` returns the mean loss."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        c = config
        self.tok_emb, self.pos_emb = nn.Embedding(VOCAB, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c.n_embd, c.n_head) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, VOCAB, bias=False)
        if c.tied:
            self.head.weight = self.tok_emb.weight  # as in GPT-2
        self.register_buffer("positions", torch.arange(c.block_size), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb(self.positions[: idx.shape[1]])
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def build_model(config: GPTConfig, seed: int) -> GPT:
    """The same initial weights on every rank and for every method (seeded)."""
    torch.manual_seed(seed)
    return GPT(config)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's rule: decay matrices, not biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- corpus
def read_corpus(path: Optional[str], max_bytes: int, skip: int = 0) -> bytes:
    """The user's file, or the stdlib's .py files in sorted order (identical on every rank), from
    byte ``skip`` on: another slice of the same corpus (at 12 MB, the stdlib's own test suite)."""
    if path is not None:
        return pathlib.Path(path).read_bytes()[skip:skip + max_bytes]
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        # installed packages differ between machines; the stdlib does not (and skipping them is faster)
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
        files += [pathlib.Path(folder, n) for n in names if n.endswith(".py")]
    chunks, total = [], 0
    for f in sorted(files):
        chunks.append(f.read_bytes())
        total += len(chunks[-1])
        if total >= skip + max_bytes:
            break
    return b"".join(chunks)[skip:skip + max_bytes]


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # int64 bytes
    val: torch.Tensor


def load_corpus(path: Optional[str] = None, max_bytes: int = 4_000_000, skip: int = 0) -> Corpus:
    """Deterministic 90/10 split by interleaved chunks: a head/tail cut would give validation
    only the last files (codec tables), a different distribution."""
    data = torch.frombuffer(bytearray(read_corpus(path, max_bytes, skip)), dtype=torch.uint8).long()
    chunks = data.split(max(1, min(8192, len(data) // 100)))
    train = torch.cat([c for i, c in enumerate(chunks) if i % 10 != 9])
    val = torch.cat([c for i, c in enumerate(chunks) if i % 10 == 9])
    return Corpus(train=train, val=val)


class Batches:
    """Random windows of ``block_size + 1`` bytes: inputs and next-byte targets. The stream is
    reproducible from (seed, rank), and differs between ranks, as data-parallel shards do."""

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int, rank: int) -> None:
        if len(data) <= block_size + 1:
            raise ValueError(f"corpus of {len(data)} bytes is too small for block size {block_size}")
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        self._offsets = torch.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(len(self.data) - self.block_size - 1, (self.batch_size, 1), generator=self.generator)
        window = self.data[start + self._offsets]
        return window[:, :-1], window[:, 1:]
