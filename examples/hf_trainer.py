"""Train a tiny Llama with Hugging Face `transformers.Trainer`, then switch it to ACCO by changing one line.

    pip install 'acco[hf]'
    torchrun --nproc-per-node 2 examples/hf_trainer.py                 # AccoTrainer (mode acco)
    torchrun --nproc-per-node 2 examples/hf_trainer.py --trainer hf    # the same run with Trainer + AdamW on DDP
    torchrun --nproc-per-node 2 examples/hf_trainer.py --save-steps 100 --resume   # continue from --output-dir
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --max-restarts 3 --nproc-per-node 2 \
        examples/hf_trainer.py --save-steps 100 --resume   # preemptible: one command line, first start and restarts

The one line is marked `>>> ACCO`: `AccoTrainer` takes the same arguments as `Trainer`, and every
TrainingArguments field keeps its meaning (one Trainer step = one committed optimizer update of
batch-size x grad-accum x world-size sequences; the same optimizer, learning rate, schedule and clipping).
AccoTrainer(..., acco_kwargs={"mode": "sync"}) would make it plain ZeRO-1.

Nothing is downloaded: the model is built from a config with a byte-level vocabulary (256 tokens, no
tokenizer), and the data is the Python standard library's own source code (or --data FILE).
"""

import argparse
import math
import os
import pathlib
import signal
import sysconfig

import torch
import transformers

from acco.integrations.hf import AccoTrainer

# ----------------------------------------------------------------------------- configuration
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--trainer", choices=["acco", "hf"], default="acco", help="AccoTrainer, or transformers.Trainer + AdamW")
parser.add_argument("--output-dir", type=str, default="out-hf-trainer")
parser.add_argument("--max-steps", type=int, default=300, help="optimizer updates (Trainer steps)")
parser.add_argument("--batch-size", type=int, default=16, help="sequences per device per micro-batch")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update")
parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
parser.add_argument("--hidden-size", type=int, default=128)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
parser.add_argument("--warmup", type=int, default=20, help="warm-up updates")
parser.add_argument("--eval-steps", type=int, default=100, help="evaluate every this many updates")
parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every this many updates (0: only the final model)")
parser.add_argument("--resume", action="store_true",
                    help="continue from the last checkpoint in --output-dir if there is one, else start fresh")
parser.add_argument("--data", type=str, default=None, help="a text file to train on (default: the stdlib's sources)")
parser.add_argument("--max-bytes", type=int, default=2_000_000)
parser.add_argument("--seed", type=int, default=1337)
args = parser.parse_args()
cuda = torch.cuda.is_available()


# ----------------------------------------------------------------------------- data: byte windows of a corpus
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


class ByteWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of seq_len bytes; the labels are the inputs (the model shifts them)."""

    def __init__(self, tokens, seq_len):
        self.windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


tokens = torch.frombuffer(bytearray(read_text(args.data, args.max_bytes)), dtype=torch.uint8).long()
pieces = tokens.split(max(1, min(8192, len(tokens) // 100)))  # every 10th piece is validation
train_dataset = ByteWindows(torch.cat([p for i, p in enumerate(pieces) if i % 10 != 9]), args.seq_len)
eval_dataset = ByteWindows(torch.cat([p for i, p in enumerate(pieces) if i % 10 == 9]), args.seq_len)

# ----------------------------------------------------------------------------- model
torch.manual_seed(args.seed)
config = transformers.LlamaConfig(
    vocab_size=256, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
    num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=args.seq_len, tie_word_embeddings=True, use_cache=False,
)
model = transformers.LlamaForCausalLM(config)

# ----------------------------------------------------------------------------- Trainer
training_args = transformers.TrainingArguments(
    output_dir=args.output_dir,
    per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
    gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps,
    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup,
    weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
    logging_steps=10, eval_strategy="steps", eval_steps=args.eval_steps,
    save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
    bf16=cuda, use_cpu=not cuda,  # CPU: gloo, one process per torchrun rank
    dataloader_num_workers=0, report_to=[], seed=args.seed, disable_tqdm=True,
)


class KillPoint(transformers.TrainerCallback):
    """Test hook for preemption (tests/test_hf_trainer.py). ACCO_EXAMPLE_KILL="RANK:step:N,...": on torchrun attempt i
    (TORCHELASTIC_RESTART_COUNT), item i makes rank RANK SIGKILL itself at the end of Trainer step N."""

    def on_step_end(self, args, state, control, **kwargs):
        plan = os.environ.get("ACCO_EXAMPLE_KILL", "").split(",")
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt < len(plan) and plan[attempt] == f"{args.process_index}:step:{state.global_step}":
            os.kill(os.getpid(), signal.SIGKILL)


Trainer = AccoTrainer if args.trainer == "acco" else transformers.Trainer  # >>> ACCO: the one line that switches
trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                  callbacks=[KillPoint()] if "ACCO_EXAMPLE_KILL" in os.environ else None)

world = training_args.world_size
if trainer.is_world_process_zero():
    print(f"{Trainer.__name__} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {len(train_dataset):,} train / "
          f"{len(eval_dataset):,} val sequences of {args.seq_len} bytes | {world} rank(s) on {training_args.device.type} | "
          f"{args.batch_size * args.grad_accum * world} sequences per update", flush=True)
# --resume: the last checkpoint if there is one, else a fresh start, so that one torchrun command line serves the first
# start and every restart. A folder without trainer_state.json (Trainer writes it last) is a save that a kill cut short.
names = [f.parent.name.removeprefix("checkpoint-") for f in pathlib.Path(args.output_dir).glob("checkpoint-*/trainer_state.json")]
saved = [int(name) for name in names if name.isdigit()] if args.resume else []
if args.resume and trainer.is_world_process_zero():
    print(f"--resume: from {args.output_dir}/checkpoint-{max(saved)}" if saved
          else f"--resume: no checkpoint in {args.output_dir} (yet): starting fresh", flush=True)
trainer.train(resume_from_checkpoint=True if saved else None)
metrics = trainer.evaluate()  # AccoTrainer: the committed parameters
trainer.save_model()  # output_dir/model.safetensors (+ config): loadable with LlamaForCausalLM.from_pretrained
if trainer.is_world_process_zero():
    evaluations = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    for step, loss in evaluations.items():
        print(f"step {step} | eval loss {loss:.4f}")
    updates = trainer.optimizer.num_updates if hasattr(trainer.optimizer, "num_updates") else trainer.state.global_step
    print(f"done: {Trainer.__name__}, {trainer.state.global_step} Trainer steps, committed updates {updates}, "
          f"eval loss {metrics['eval_loss']:.4f} (ln 256 = {math.log(256):.4f}); saved to {os.path.abspath(args.output_dir)}", flush=True)
