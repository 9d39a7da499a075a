"""Train a tiny byte-level GPT on CPU with AccoOptimizer (nanoGPT-style, one file, no framework).

    torchrun --nproc-per-node 2 examples/train_tiny_gpt.py     # two data-parallel workers
    python examples/train_tiny_gpt.py --steps 10               # a single worker

The built-in corpus is the Python standard library's own source code (or --data FILE).
The model is NOT wrapped in DDP: AccoOptimizer reduces the gradients itself, in the background.
"""

import argparse
import math
import os
import pathlib
import sysconfig
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from acco import AccoOptimizer

# ----------------------------------------------------------------------------- configuration
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=240, help="optimizer step() calls (in mode acco, 2 calls = 1 update)")
parser.add_argument("--batch-size", type=int, default=12, help="sequences per rank per step")
parser.add_argument("--block-size", type=int, default=128, help="context length in bytes")
parser.add_argument("--n-layer", type=int, default=3)
parser.add_argument("--n-head", type=int, default=4)
parser.add_argument("--n-embd", type=int, default=128)
parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
parser.add_argument("--warmup", type=int, default=10, help="warm-up step() calls")
parser.add_argument("--mode", choices=["acco", "dpu", "sync"], default="acco")
parser.add_argument("--data", type=str, default=None, help="a text file to train on (default: stdlib sources)")
parser.add_argument("--max-bytes", type=int, default=4_000_000, help="cap on corpus bytes read")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--max-grad-norm", type=float, default=1.0)
parser.add_argument("--eval-every", type=int, default=60, help="evaluate every this many step() calls")
parser.add_argument("--eval-batches", type=int, default=8, help="validation batches per rank per evaluation")
args = parser.parse_args()

# ----------------------------------------------------------------------------- distributed setup
distributed = "WORLD_SIZE" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank = dist.get_rank() if distributed else 0
world_size = dist.get_world_size() if distributed else 1
master = rank == 0
if distributed:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # don't oversubscribe the cores

# ----------------------------------------------------------------------------- data
def read_corpus(path, max_bytes):
    """Bytes of the user's file, or of the stdlib's .py files in sorted order (same on every rank)."""
    if path is not None:
        return pathlib.Path(path).read_bytes()[:max_bytes]
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts:  # installed packages differ between machines; the stdlib does not
            continue
        chunks.append(f.read_bytes())
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


corpus = torch.frombuffer(bytearray(read_corpus(args.data, args.max_bytes)), dtype=torch.uint8).long()
# 90/10 split by interleaved chunks (every 10th chunk is validation): a plain head/tail cut would
# leave only the last few files (here: codec tables) for validation, a very different distribution.
chunks = corpus.split(max(1, min(8192, len(corpus) // 100)))
train_data = torch.cat([c for i, c in enumerate(chunks) if i % 10 != 9])
val_data = torch.cat([c for i, c in enumerate(chunks) if i % 10 == 9])
assert len(val_data) > args.block_size + 1, f"corpus too small ({len(corpus)} bytes) for --block-size {args.block_size}"


def get_batch(data, gen):
    """Random windows of block_size + 1 bytes: inputs and next-byte targets."""
    ix = torch.randint(len(data) - args.block_size - 1, (args.batch_size,), generator=gen)
    window = torch.stack([data[i : i + args.block_size + 1] for i in ix.tolist()])
    return window[:, :-1], window[:, 1:]


# Each rank draws different training batches, but its stream is reproducible from (seed, rank).
train_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)

# ----------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying: fewer parameters, a classic GPT choice
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


torch.manual_seed(args.seed)  # same initial weights on every rank (the optimizer also broadcasts rank 0's)
model = GPT(256, args.block_size, args.n_layer, args.n_head, args.n_embd)

# ----------------------------------------------------------------------------- optimizer + schedule
# nanoGPT's rule: weight-decay the matrices (dim >= 2), not the biases and LayerNorm gains.
params = [p for p in model.parameters() if p.requires_grad]
groups = [
    {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
]
# >>> The one line that matters: wrap a plain AdamW in AccoOptimizer. It shards AdamW's state across
# >>> ranks (ZeRO-1) and averages/clips the gradients in the background while the next ones are computed.
opt = AccoOptimizer(torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95)), mode=args.mode, max_grad_norm=args.max_grad_norm)


def lr_factor(step):
    """Linear warm-up, then cosine decay to 10% of the peak, over step() calls."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

# ----------------------------------------------------------------------------- evaluation
def mean_over_ranks(value):
    t = torch.tensor([float(value)], dtype=torch.float64)
    if distributed:
        dist.all_reduce(t)  # default group: the optimizer keeps its own private group for its rounds
    return t.item() / world_size


@torch.no_grad()
def evaluate():
    """Exact validation loss of the committed parameters (in mode acco the model normally holds an
    estimate between the two halves of an update; committed_parameters() swaps the committed ones in)."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + 500 + rank)  # the same batches every time
    model.eval()
    with opt.committed_parameters():
        loss = sum(model(*get_batch(val_data, gen)).item() for _ in range(args.eval_batches)) / args.eval_batches
    model.train()
    return mean_over_ranks(loss)


if master:
    n_params = sum(p.numel() for p in params)
    print(f"tiny GPT: {n_params / 1e6:.2f}M params | {len(train_data):,} train / {len(val_data):,} val bytes | "
          f"mode {args.mode} | {world_size} rank(s) | {args.steps} steps")

# ----------------------------------------------------------------------------- training loop
first_val = evaluate()
if master:
    print(f"step 0 | updates 0 | val loss {first_val:.4f} (ln 256 = {math.log(256):.4f})")
tokens_per_step = args.batch_size * args.block_size * world_size
train_losses, t_start, t_last, val = [], time.time(), time.time(), first_val
for step in range(1, args.steps + 1):
    x, y = get_batch(train_data, train_gen)
    loss = model(x, y)
    loss.backward()
    opt.step()  # gradients go to a background round; the model gets the previous round's parameters
    sched.step()
    opt.zero_grad(set_to_none=True)
    train_losses.append(loss.item())

    if step % args.eval_every == 0 or step == args.steps:
        if step == args.steps:
            opt.finish()  # drain the pipeline: commit the last gradients, nothing left in flight
        tokens_per_s = len(train_losses) * tokens_per_step / (time.time() - t_last)  # training time only
        train_loss = mean_over_ranks(sum(train_losses) / len(train_losses))
        val = evaluate()
        if master:
            print(f"step {step} | updates {opt.num_updates} | train loss {train_loss:.4f} | val loss {val:.4f} | "
                  f"{tokens_per_s:.0f} tokens/s")
        train_losses, t_last = [], time.time()

if master:
    elapsed = time.time() - t_start
    print(f"done: {args.steps} steps, {opt.num_updates} committed updates, mode {args.mode}, {world_size} rank(s) | "
          f"val loss {first_val:.4f} -> {val:.4f} | {elapsed:.1f}s wall-clock (evaluations included)")
opt.close()
if distributed:
    dist.destroy_process_group()
