"""Train a Hugging Face `transformers` causal LM with ACCO: a plain loop, `transformers.get_scheduler`,
exact evaluation and saving with the committed parameters.

    pip install 'acco[hf,examples]'
    torchrun --nproc-per-node 2 examples/hf_causal_lm.py                        # a tiny Llama built from a config
    torchrun --nproc-per-node 2 examples/hf_causal_lm.py --pretrained DIR       # a local checkpoint (and its tokenizer)
    torchrun --nproc-per-node 2 examples/hf_causal_lm.py --resume               # continue from --out-dir

Nothing is downloaded. Without --pretrained the model is built from a config with a byte-level vocabulary
(256 tokens, no tokenizer needed). The data is the Python standard library's source code (or --data FILE).
--out-dir receives `save_pretrained` files, the optimizer's consolidated state and the scheduler's state.
"""

import argparse
import gc
import math
import os
import pathlib
import sysconfig

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before init_process_group: see the end of the script
import transformers

from acco import AccoOptimizer

try:
    from tqdm import tqdm  # optional: pip install acco[examples]
except ImportError:
    tqdm = None

# ----------------------------------------------------------------------------- configuration
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--pretrained", type=str, default=None, help="a local directory written by save_pretrained")
parser.add_argument("--out-dir", type=str, default="out-hf")
parser.add_argument("--resume", action="store_true", help="continue from --out-dir")
parser.add_argument("--mode", choices=["acco", "dpu", "sync"], default="acco")
parser.add_argument("--updates", type=int, default=200, help="optimizer updates")
parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank per update (mode acco: half per step() call)")
parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
parser.add_argument("--hidden-size", type=int, default=128, help="config-built model only")
parser.add_argument("--layers", type=int, default=2, help="config-built model only")
parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
parser.add_argument("--scheduler", type=str, default="cosine", help="any transformers.get_scheduler name")
parser.add_argument("--warmup", type=int, default=20, help="warm-up updates")
parser.add_argument("--weight-decay", type=float, default=0.1)
parser.add_argument("--max-grad-norm", type=float, default=1.0)
parser.add_argument("--dtype", choices=["fp32", "bf16-autocast", "bf16"], default="fp32")
parser.add_argument("--eval-every", type=int, default=50, help="validate every this many updates")
parser.add_argument("--eval-batches", type=int, default=4, help="validation batches (of --batch-size sequences) per rank")
parser.add_argument("--save-every", type=int, default=100, help="save every this many updates (and at the end)")
parser.add_argument("--stop-after", type=int, default=None, help="end this run after this many updates (the schedule still spans --updates)")
parser.add_argument("--data", type=str, default=None, help="a text file to train on (default: the stdlib's sources)")
parser.add_argument("--max-bytes", type=int, default=2_000_000)
parser.add_argument("--seed", type=int, default=1337)
args = parser.parse_args()

# ----------------------------------------------------------------------------- distributed setup
cuda = torch.cuda.is_available()
local_rank = int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
if "RANK" in os.environ:  # launched by torchrun
    dist.init_process_group("nccl" if cuda else "gloo")
else:  # plain `python hf_causal_lm.py`: a world of one
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
rank, world_size = dist.get_rank(), dist.get_world_size()
master = rank == 0
if not cuda and "LOCAL_WORLD_SIZE" in os.environ:  # CPU workers on one machine share its cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
calls_per_update = 2 if args.mode == "acco" else 1  # mode acco: one update = an estimate call + a commit call
assert args.batch_size % calls_per_update == 0, "mode acco splits each update's batch in two: use an even --batch-size"
micro_batch = args.batch_size // calls_per_update
out_dir = pathlib.Path(args.out_dir)


def log(message):
    if master:
        (tqdm.write if tqdm else print)(message)


# ----------------------------------------------------------------------------- model and tokens
source = out_dir if args.resume else args.pretrained and pathlib.Path(args.pretrained)
torch.manual_seed(args.seed)  # the same initial weights on every rank (the optimizer also broadcasts rank 0's)
if source:
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
else:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
model.config.use_cache = False
model = model.to(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)  # bf16: ACCO keeps fp32 master shards
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16-autocast")
tokenizer = None
if source and (source / "tokenizer_config.json").exists():
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)


def read_text(path, max_bytes):
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


raw = read_text(args.data, args.max_bytes)
if tokenizer is not None:
    tokens = torch.tensor(tokenizer(raw.decode("utf-8", errors="replace"))["input_ids"], dtype=torch.long)
else:
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()  # byte-level: token id = byte
pieces = tokens.split(max(1, min(8192, len(tokens) // 100)))  # every 10th piece is validation
train_tokens = torch.cat([p for i, p in enumerate(pieces) if i % 10 != 9])
val_tokens = torch.cat([p for i, p in enumerate(pieces) if i % 10 == 9])
assert len(val_tokens) > args.seq_len, f"corpus too small ({len(tokens)} tokens) for --seq-len {args.seq_len}"


def get_batch(data, n, *seed):
    """n random windows of seq_len tokens from a generator seeded by `seed` (resume needs no state)."""
    gen = torch.Generator().manual_seed(hash((args.seed, *seed)) % 2**63)
    ix = torch.randint(len(data) - args.seq_len, (n,), generator=gen)
    return torch.stack([data[i : i + args.seq_len] for i in ix.tolist()]).to(device)


# ----------------------------------------------------------------------------- optimizer + schedule
no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or "norm" in n)]
decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() < 2 or "norm" in n)]
groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
# >>> ACCO: wrap AdamW; no DDP. Clipping is max_grad_norm= (global norm of the averaged gradient).
opt = AccoOptimizer(torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95)), mode=args.mode, max_grad_norm=args.max_grad_norm,
                    batch_rule_applied=True)  # the loop below gives each call half an update's batch (calls_per_update)
# The scheduler is stepped once per step() call: in mode acco, two calls per update.
sched = transformers.get_scheduler(
    args.scheduler, optimizer=opt,
    num_warmup_steps=args.warmup * calls_per_update, num_training_steps=args.updates * calls_per_update,
)

start_update = 0
if args.resume:
    opt.load_state_dict(torch.load(out_dir / "optimizer.pt", map_location=device, weights_only=True))  # collective
    trainer_state = torch.load(out_dir / "trainer_state.pt", weights_only=True)
    sched.load_state_dict(trainer_state["scheduler"])
    start_update = trainer_state["update"]
    log(f"resumed from {out_dir} at update {start_update}")


@torch.no_grad()
def evaluate():
    """Mean validation loss over all ranks, on the same batches every time."""
    model.eval()
    losses = []
    for i in range(args.eval_batches):
        for x in get_batch(val_tokens, args.batch_size, 1, rank, i).split(micro_batch):
            with autocast:
                losses.append(model(input_ids=x, labels=x).loss.float())
    model.train()
    mean = torch.stack(losses).mean()
    dist.all_reduce(mean)  # default group: ACCO's own collectives run on a private one
    return mean.item() / world_size


def save(update):
    """Collective. consolidated_state_dict() commits what is in flight (so the model then holds the
    committed parameters) and gathers the whole optimizer state on rank 0: loadable at any world size."""
    opt_state = opt.consolidated_state_dict(to=0)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        torch.save(opt_state, out_dir / "optimizer.pt")
        torch.save({"update": update, "scheduler": sched.state_dict()}, out_dir / "trainer_state.pt")
        log(f"saved to {out_dir} at update {update}")


# ----------------------------------------------------------------------------- training loop
log(f"{type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | "
    f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens | mode {args.mode} | {world_size} rank(s) on {device.type} | "
    f"{args.batch_size * world_size} seq/update in {calls_per_update} step() call(s)")
end_update = min(args.updates, args.stop_after or args.updates)
with opt.committed_parameters():
    log(f"update {start_update} | val loss {evaluate():.6f}")
bar = tqdm(total=end_update, initial=start_update, unit="update", disable=not master) if tqdm else None
for call in range(start_update * calls_per_update, end_update * calls_per_update):
    update, part = divmod(call, calls_per_update)
    x = get_batch(train_tokens, args.batch_size, 0, rank, update)[part * micro_batch : (part + 1) * micro_batch]
    with autocast:
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()  # no clip_grad_norm_ here: it would clip local gradients; max_grad_norm= clips the averaged one
    sched.step()
    opt.zero_grad(set_to_none=True)

    update, part = divmod(call + 1, calls_per_update)
    if part:  # mode acco: the first half of an update
        continue
    if bar:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    if update == end_update:
        opt.finish()  # commit everything: the model holds the final parameters, nothing in flight
    if update % args.eval_every == 0 or update == end_update:
        with opt.committed_parameters():  # exact: the last committed parameters, not ACCO's estimate
            log(f"update {update} | train loss {loss.item():.4f} | val loss {evaluate():.6f}")
    if update % args.save_every == 0 or update == end_update:
        save(update)
if bar:
    bar.close()
log(f"done: {end_update} updates, {opt.num_updates} committed (ln {tokenizer.vocab_size if tokenizer else 256} = "
    f"{math.log(tokenizer.vocab_size if tokenizer else 256):.4f})")
opt.close()
# Gloo's worker threads stop only when the process group is freed, and destroy_process_group() frees it only if
# nothing else holds it. A worker still alive at exit may drop its last collective's tensors while the interpreter
# shuts down, which aborts the process ("terminate called without an active exception"). The collection clears any
# reference cycle that would keep the group; torch.distributed.nn, which transformers imports, would hold it in its
# functions' defaults (group=group.WORLD) had it been imported after init_process_group, hence the import above.
del opt, sched
gc.collect()
dist.destroy_process_group()
