"""Train a byte-level GPT (nanoGPT-style: one file, plain torch) with DDP + AdamW, torch ZeRO-1 or ACCO.

    python examples/train_gpt.py                                           # one process
    torchrun --nproc-per-node 2 examples/train_gpt.py --optimizer acco     # 2 workers (gloo on CPU, NCCL on GPUs)
    torchrun --nproc-per-node 2 examples/train_gpt.py --optimizer zero1    # the same run with torch's ZeRO-1
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --max-restarts 3 --nproc-per-node 2 \
        examples/train_gpt.py --ckpt gpt.pt --resume   # preemptible: one command line for the first start and every restart
    torchrun --nproc-per-node 8 examples/train_gpt.py --ckpt gpt_ckpt --ckpt-format dcp   # sharded: each rank writes its shard

The data is the Python standard library's own source code, read as bytes (or --data FILE).
--optimizer switches between:
  adamw-ddp  DistributedDataParallel + torch.optim.AdamW
  zero1      DistributedDataParallel + torch ZeroRedundancyOptimizer(AdamW)
  acco       AccoOptimizer(AdamW): ZeRO-1 whose communication runs while the next gradients are computed
  dpu        AccoOptimizer(AdamW, mode="dpu"): delayed parameter update (an ablation)
  acco-muon  ACCO with per-group optimizers: Muon for the blocks' 2-D weight matrices, AdamW for the
             embeddings (and the tied head), norms and biases, as modded-nanogpt splits them
--batch-size and --updates count optimizer *updates*, so every optimizer sees the same samples per
update and the same number of updates. ACCO splits each update into two step() calls of half the batch.
"""

import argparse
import gc
import math
import os
import pathlib
import shutil
import signal
import sysconfig
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from acco import AccoOptimizer

try:
    from tqdm import tqdm  # optional: pip install acco[examples]
except ImportError:
    tqdm = None

# ----------------------------------------------------------------------------- configuration
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--optimizer", choices=["adamw-ddp", "zero1", "acco", "dpu", "acco-muon"], default="acco")
parser.add_argument("--updates", type=int, default=200, help="optimizer updates")
parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank per update (ACCO: half per step() call)")
parser.add_argument("--block-size", type=int, default=128, help="context length in bytes")
parser.add_argument("--n-layer", type=int, default=3)
parser.add_argument("--n-head", type=int, default=4)
parser.add_argument("--n-embd", type=int, default=128)
parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to lr * this")
parser.add_argument("--warmup", type=int, default=20, help="warm-up updates")
parser.add_argument("--weight-decay", type=float, default=0.1)
parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the averaged gradient's global norm")
parser.add_argument("--dtype", choices=["fp32", "bf16-autocast", "bf16"], default="fp32",
                    help="bf16-autocast: fp32 parameters, bf16 matmuls; bf16: bf16 parameters (ACCO keeps fp32 master shards)")
parser.add_argument("--data", type=str, default=None, help="a text file to train on (default: the stdlib's sources)")
parser.add_argument("--max-bytes", type=int, default=4_000_000, help="cap on corpus bytes read")
parser.add_argument("--eval-every", type=int, default=50, help="validate every this many updates")
parser.add_argument("--eval-batches", type=int, default=4, help="validation batches (of --batch-size sequences) per rank")
parser.add_argument("--ckpt", type=str, default=None, help="checkpoint file (saved every --ckpt-every updates and at the end)")
parser.add_argument("--ckpt-format", choices=["file", "dcp"], default="file",
                    help="file: one file written by rank 0 (consolidated); dcp: a directory of torch.distributed.checkpoint "
                         "in which every rank writes its own shard (ACCO optimizers); both load at any world size")
parser.add_argument("--ckpt-every", type=int, default=100)
parser.add_argument("--resume", action="store_true",
                    help="start from --ckpt if it exists, else start fresh (one command line for a first start and its restarts)")
parser.add_argument("--stop-after", type=int, default=None, help="end this run after this many updates (the schedule still spans --updates)")
parser.add_argument("--plot", type=str, default="loss.png", help="loss curve PNG written at the end ('' for none)")
parser.add_argument("--seed", type=int, default=1337)
args = parser.parse_args()
if args.resume and not args.ckpt:
    parser.error("--resume needs --ckpt PATH")
if args.ckpt_format == "dcp" and args.optimizer not in ("acco", "dpu", "acco-muon"):
    parser.error("--ckpt-format dcp saves AccoOptimizer's sharded state: use an ACCO --optimizer")

# ----------------------------------------------------------------------------- distributed setup
# One GPU per process when there are GPUs (NCCL), else CPU (gloo). Without torchrun: a world of one.
cuda = torch.cuda.is_available()
local_rank = int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
backend = "nccl" if cuda else "gloo"
if "RANK" in os.environ:
    dist.init_process_group(backend)
else:
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
rank, world_size = dist.get_rank(), dist.get_world_size()
master = rank == 0
if master and args.plot:  # before training: a missing folder must not cost the run its plot at the end
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
if not cuda and "LOCAL_WORLD_SIZE" in os.environ:  # CPU workers on one machine share its cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
uses_acco = args.optimizer in ("acco", "dpu", "acco-muon")
calls_per_update = 2 if args.optimizer in ("acco", "acco-muon") else 1  # ACCO: one update = an estimate call + a commit call
assert args.batch_size % calls_per_update == 0, "ACCO splits each update's batch in two: use an even --batch-size"
micro_batch = args.batch_size // calls_per_update


def log(message):
    if master:
        (tqdm.write if tqdm else print)(message)


# ----------------------------------------------------------------------------- data
def read_corpus(path, max_bytes):
    """Bytes of the user's file, or of the stdlib's .py files in sorted order (the same on every rank)."""
    if path is not None:
        return pathlib.Path(path).read_bytes()[:max_bytes]
    chunks, total = [], 0
    for f in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in f.parts or "dist-packages" in f.parts:  # installed packages differ between machines
            continue
        chunks.append(f.read_bytes())
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


corpus = torch.frombuffer(bytearray(read_corpus(args.data, args.max_bytes)), dtype=torch.uint8).long()
# Every 10th chunk is validation: a head/tail cut would validate on the last few files only.
chunks = corpus.split(max(1, min(8192, len(corpus) // 100)))
train_data = torch.cat([c for i, c in enumerate(chunks) if i % 10 != 9])
val_data = torch.cat([c for i, c in enumerate(chunks) if i % 10 == 9])
assert len(val_data) > args.block_size + 1, f"corpus too small ({len(corpus)} bytes) for --block-size {args.block_size}"


def get_batch(data, n, *seed):
    """n random windows of block_size + 1 bytes, drawn from a generator seeded by `seed` (resume needs no state)."""
    gen = torch.Generator().manual_seed(hash((args.seed, *seed)) % 2**63)
    ix = torch.randint(len(data) - args.block_size - 1, (n,), generator=gen)
    window = torch.stack([data[i : i + args.block_size + 1] for i in ix.tolist()]).to(device)
    return window[:, :-1], window[:, 1:]


def train_micro_batch(call):
    """Call c draws part c % calls_per_update of update c // calls_per_update's batch: every optimizer
    sees the same sequences in the same update; each rank draws its own."""
    update, part = divmod(call, calls_per_update)
    x, y = get_batch(train_data, args.batch_size, 0, rank, update)
    return x[part * micro_batch : (part + 1) * micro_batch], y[part * micro_batch : (part + 1) * micro_batch]


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
        self.head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


torch.manual_seed(args.seed)  # the same initial weights on every rank
raw_model = GPT(256, args.block_size, args.n_layer, args.n_head, args.n_embd).to(device)
if args.dtype == "bf16":
    raw_model = raw_model.to(torch.bfloat16)
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16-autocast")

# ----------------------------------------------------------------------------- optimizer + schedule
# nanoGPT's rule: weight-decay the matrices (dim >= 2), not the biases and LayerNorm gains.
params = [p for p in raw_model.parameters() if p.requires_grad]
groups = [
    {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
]
device_ids = [local_rank] if cuda else None
if args.optimizer == "adamw-ddp":
    model = DDP(raw_model, device_ids=device_ids)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
elif args.optimizer == "zero1":
    model = DDP(raw_model, device_ids=device_ids)
    opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=args.lr, betas=(0.9, 0.95))
elif args.optimizer == "acco-muon":
    model = raw_model
    # Muon orthogonalises the update of each hidden weight matrix (whole tensors, sharded by tensor); AdamW takes the
    # embeddings (the head is tied to one), LayerNorm gains and biases (flat). "match_rms_adamw" scales Muon's update to
    # AdamW's size (Moonshot's rule), so both share the peak rate, the weight decay and the schedule.
    hidden = {id(p) for block in raw_model.blocks for p in block.parameters() if p.dim() == 2}
    groups = [
        {"params": [p for p in params if id(p) in hidden], "optimizer": torch.optim.Muon, "lr": args.lr,
         "weight_decay": args.weight_decay, "adjust_lr_fn": "match_rms_adamw"},
        {"params": [p for p in params if id(p) not in hidden and p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # ================================================================= per-group optimizers: a group's "optimizer" key
    # overrides the class given here, which (with its hyper-parameters) is the default for the other groups
    opt = AccoOptimizer(groups, torch.optim.AdamW, lr=args.lr, betas=(0.9, 0.95), mode="acco", max_grad_norm=args.max_grad_norm,
                        batch_rule_applied=True)  # the loop below gives each call half an update's batch
else:
    model = raw_model  # no DDP: the optimizer averages (and clips) the gradients itself, in the background
    # ================================================================= THE ACCO SWITCH: wrap AdamW, no DDP
    opt = AccoOptimizer(torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95)), mode=args.optimizer, max_grad_norm=args.max_grad_norm,
                        batch_rule_applied=True)  # the loop below gives each call half an update's batch (calls_per_update)


def lr_factor(call):
    """Linear warm-up, then cosine decay to min_lr_ratio. Counted in step() calls: ACCO makes two per update,
    so its warm-up and its schedule are twice as long in calls (and the same in updates)."""
    warmup, total = args.warmup * calls_per_update, args.updates * calls_per_update
    if call < warmup:
        return (call + 1) / warmup
    progress = min(1.0, (call - warmup) / max(1, total - warmup))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

# ----------------------------------------------------------------------------- evaluation, checkpoints
@torch.no_grad()
def evaluate():
    """Mean validation loss over all ranks, on the same batches every time."""
    raw_model.eval()
    losses = []
    for i in range(args.eval_batches):  # batches of one update's size, in micro-batches (the same for every optimizer)
        x, y = get_batch(val_data, args.batch_size, 1, rank, i)
        for xm, ym in zip(x.split(micro_batch), y.split(micro_batch)):
            with autocast:
                losses.append(raw_model(xm, ym).float())
    raw_model.train()
    mean = torch.stack(losses).mean()
    dist.all_reduce(mean)  # the default group: ACCO runs its own collectives on a private one
    return mean.item() / world_size


def save_checkpoint(path, update, history):
    """One file, written by rank 0, loadable at any world size. Collective (every rank calls it)."""
    if args.ckpt_format == "dcp":
        return save_sharded(path, update, history)
    if uses_acco:
        opt_state = opt.consolidated_state_dict(to=0)  # commits what is in flight; the model then holds it
    elif args.optimizer == "zero1":
        opt.consolidate_state_dict(to=0)
        opt_state = opt.state_dict() if master else None
    else:
        opt_state = opt.state_dict()
    if master:
        state = {"model": raw_model.state_dict(), "optimizer": opt_state, "scheduler": sched.state_dict(),
                 "update": update, "history": history, "args": vars(args)}
        with open(path + ".tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a node that dies after it leaves a whole file
        kill_point("save", update)
        os.replace(path + ".tmp", path)  # atomic: a kill at any moment leaves the previous checkpoint whole


def sharded_state(update=0, history=None):
    """What --ckpt-format dcp saves, and the template a load fills: every rank's own shard of the optimizer."""
    return {"model": raw_model.state_dict(), "optimizer": opt.sharded_state_dict(), "scheduler": sched.state_dict(),
            "progress": {"update": update, "history": history or {"train": [], "val": []}}}


def save_sharded(path, update, history):
    """--ckpt-format dcp: PATH/update-N/, each rank writing its own shard (no gather), then PATH/latest naming it,
    replaced atomically once every rank has written (dcp.save returns on every rank after the metadata): a kill at
    any moment leaves `latest` naming a whole checkpoint. Older ones are removed after. Collective."""
    folder = f"update-{update}"
    dcp.save(sharded_state(update, history), checkpoint_id=os.path.join(path, folder))  # commits what is in flight first
    if master:
        kill_point("save", update)
        with open(os.path.join(path, "latest.tmp"), "w") as f:
            f.write(folder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(path, "latest.tmp"), os.path.join(path, "latest"))
        for old in os.listdir(path):
            if old.startswith("update-") and old != folder:
                shutil.rmtree(os.path.join(path, old), ignore_errors=True)


def kill_point(where, number):
    """Test hook for preemption (tests/test_examples.py). ACCO_EXAMPLE_KILL="RANK:WHERE:N,..." : on torchrun attempt i
    (TORCHELASTIC_RESTART_COUNT), item i makes rank RANK SIGKILL itself at WHERE N ("call": after step() call N;
    "save": the checkpoint of update N written to .tmp, not yet renamed). Attempts past the list run through."""
    plan = os.environ.get("ACCO_EXAMPLE_KILL", "").split(",")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt < len(plan) and plan[attempt] == f"{rank}:{where}:{number}":
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_exists():
    return os.path.isfile(os.path.join(args.ckpt, "latest") if args.ckpt_format == "dcp" else args.ckpt)


def checkpoint_to_resume():
    """--resume: True where --ckpt exists (resume), False where it does not (start fresh); every rank takes the same
    decision, and a checkpoint that only some ranks see is an error on every rank (collective)."""
    seen = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(world_size)]
    dist.all_gather(seen, torch.tensor([checkpoint_exists()], dtype=torch.int32, device=device))
    ranks = [r for r, flag in enumerate(seen) if flag.item()]
    if ranks and len(ranks) < world_size:
        raise RuntimeError(f"--resume: {args.ckpt} exists on ranks {ranks} only, of {world_size}: every rank loads the "
                           "checkpoint (put it on a filesystem that all nodes share)")
    return bool(ranks)


# history: (update, loss) pairs, and (update, gradient noise scale in sequences) at each evaluation, for the plot
# (a --ckpt-format dcp resume keeps the losses only: its template names the keys it loads)
start_update, history = 0, {"train": [], "val": [], "noise": []}
resume = args.resume and checkpoint_to_resume()
if resume and args.ckpt_format == "dcp":
    with open(os.path.join(args.ckpt, "latest")) as f:
        folder = os.path.join(args.ckpt, f.read().strip())
    state = sharded_state()  # the template: each rank reads the parts of the saved shards that overlap its own
    dcp.load(state, checkpoint_id=folder)
    raw_model.load_state_dict(state["model"])
    opt.load_sharded_state_dict(state["optimizer"])  # collective; also writes the committed parameters into the model
    sched.load_state_dict(state["scheduler"])
    start_update, history = state["progress"]["update"], state["progress"]["history"]
    log(f"resumed from {folder} at update {start_update}")
elif resume:
    state = torch.load(args.ckpt, map_location=device, weights_only=True)
    raw_model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])  # ACCO: collective; also writes the committed parameters into the model
    sched.load_state_dict(state["scheduler"])
    start_update, history = state["update"], state["history"]
    log(f"resumed from {args.ckpt} at update {start_update}")
elif args.resume:
    log(f"--resume: {args.ckpt} does not exist (yet): starting fresh")

# ----------------------------------------------------------------------------- training loop
log(f"GPT {sum(p.numel() for p in params) / 1e6:.2f}M params | {len(train_data):,} train / {len(val_data):,} val bytes | "
    f"{args.optimizer} | {world_size} rank(s) on {device.type} | {args.dtype} | {args.batch_size * world_size} seq/update | "
    f"{calls_per_update} step() call(s) of {micro_batch} seq per update")
end_update = min(args.updates, args.stop_after or args.updates)
if start_update == 0:
    history["val"].append((0, evaluate()))
    log(f"update 0 | val loss {history['val'][-1][1]:.6f} (ln 256 = {math.log(256):.4f})")
bar = tqdm(total=end_update, initial=start_update, unit="update", disable=not master) if tqdm else None
train_loss, t_last, tokens = torch.zeros((), device=device), time.time(), 0
for call in range(start_update * calls_per_update, end_update * calls_per_update):
    x, y = train_micro_batch(call)
    with autocast:
        loss = model(x, y)
    loss.backward()
    if not uses_acco:  # DDP has averaged the gradients, so this clips the global gradient
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    opt.step()  # ACCO: hands the gradients to a background round, takes the previous round's parameters
    sched.step()
    opt.zero_grad(set_to_none=True)
    kill_point("call", call + 1)
    train_loss += loss.detach() / calls_per_update
    tokens += x.numel() * world_size

    update, part = divmod(call + 1, calls_per_update)
    if part:  # ACCO: mid-update (the estimate half)
        continue
    history["train"].append((update, train_loss.item()))  # rank 0's own loss, no collective
    train_loss.zero_()
    if bar:
        bar.update(1)
        bar.set_postfix(loss=f"{history['train'][-1][1]:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    if update % args.eval_every == 0 or update == end_update:
        tokens_per_s = tokens / (time.time() - t_last)
        if update == end_update and uses_acco:
            opt.finish()  # commit everything: the model holds the final parameters, nothing in flight
        if uses_acco:
            with opt.committed_parameters():  # exact: the last committed parameters, not ACCO's estimate
                history["val"].append((update, evaluate()))
        else:
            history["val"].append((update, evaluate()))
        noise = ""
        if uses_acco and opt.noise_scale is not None:  # ACCO measures it from each update's two halves, for free
            b_simple = opt.noise_scale.per_sample(micro_batch).b_simple  # in sequences (a step() call is micro_batch of them)
            history.setdefault("noise", []).append((update, b_simple))
            noise = f" | noise scale {b_simple:,.0f} seq ({args.batch_size * world_size} per update)"
        log(f"update {update} | {call + 1} step() calls | train loss {history['train'][-1][1]:.4f} | "
            f"val loss {history['val'][-1][1]:.6f} | {tokens_per_s:,.0f} tokens/s{noise}")
        tokens, t_last = 0, time.time()
    if args.ckpt and (update % args.ckpt_every == 0 or update == end_update):
        save_checkpoint(args.ckpt, update, history)
if bar:
    bar.close()

# ----------------------------------------------------------------------------- the end
log(f"done: {end_update} updates | "
    f"val loss {history['val'][0][1]:.4f} -> {history['val'][-1][1]:.4f}")
if master and args.plot:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install acco[examples])")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*history["train"]), label="train (rank 0)", alpha=0.6)
        ax.plot(*zip(*history["val"]), "o-", label="validation")
        ax.set(xlabel="update", ylabel="loss (nats/byte)", title=f"byte-level GPT, {args.optimizer}, {world_size} rank(s)")
        ax.legend(loc="upper right")
        if history.get("noise"):  # the gradient noise scale against the batch: below it, acco's estimate is noisier
            noise_ax = ax.twinx()
            noise_ax.plot(*zip(*history["noise"]), "s--", color="tab:green", label="gradient noise scale B_simple")
            noise_ax.axhline(args.batch_size * world_size, color="tab:green", alpha=0.4, label="sequences per update")
            noise_ax.set_ylabel("sequences")
            noise_ax.legend(loc="center right")
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        log(f"loss plot: {args.plot}")
if uses_acco:
    opt.close()
# Gloo's worker threads stop only when the process group is freed, and destroy_process_group() frees it only
# if nothing else holds it: DDP, ZeRO-1 and ACCO do (the collection also clears any reference cycle). A
# worker still alive at exit may drop its last collective's tensors while the interpreter shuts down, which
# aborts the process ("terminate called without an active exception"). Dropped here, destroy_process_group()
# frees the group, and that waits for the workers.
del model, opt, sched
gc.collect()
dist.destroy_process_group()
