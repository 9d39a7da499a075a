"""ACCO for Hugging Face ``transformers.Trainer`` and ``accelerate`` (``pip install 'acco[hf]'``).

**Trainer.** Change the class name; every ``TrainingArguments`` field keeps its meaning::

    from acco.integrations.hf import AccoTrainer
    trainer = AccoTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val)  # was: Trainer(...)
    trainer.train()
    trainer.save_model()          # the committed parameters

``acco_kwargs={"mode": "sync"}`` (or ``"dpu"``, ``"comm_dtype"``, ``"timeout"``, ...) goes to ``AccoOptimizer``.
One Trainer step is one committed optimizer update of ``per_device_train_batch_size x
gradient_accumulation_steps x world size`` sequences, so ``max_steps``, warm-up, logging / eval / save steps
and the learning-rate schedule mean what they mean with AdamW + DDP. What AccoTrainer changes:

* the optimizer is ``AccoOptimizer`` over the optimizer class, hyper-parameters and decay / no-decay groups
  that ``TrainingArguments`` asks for (``optim`` = ``adamw_torch``, ``adamw_torch_fused``, ``sgd``, ``adagrad``,
  ``rmsprop``, ``adafactor``, or ``optimizer_cls_and_kwargs``); the others are refused with a ``ValueError``;
* no DistributedDataParallel: the optimizer reduces the gradients itself;
* ``max_grad_norm`` clips the globally averaged gradient inside the optimizer, not each rank's local one;
* mode ``"acco"`` (default): every update is two ``step()`` calls. Trainer makes the second one after the
  last micro-batch; AccoTrainer makes the first (the estimate) in the middle of the update: after micro-batch
  ``ga/2`` for an even ``gradient_accumulation_steps`` (ga), else between the two halves of micro-batch
  ``(ga-1)//2``, split along dim 0 (a one-row micro-batch, such as an epoch's last from a loader that does not
  even out batches, goes whole to the first call, weighed so that the update is still Trainer's). The optimizer
  is built with ``batch_rule_applied=True`` (a given one gets it set): no batch-rule warning;
* fp16: Trainer's ``GradScaler`` steps the optimizer once per Trainer step (``hf_amp.ScaledAccoOptimizer``). An
  overflow on any rank, in either half of a mode-acco update, skips the whole update on every rank; the
  scheduler does not step and the scale backs off once, as with Trainer + AdamW (``optim="adamw_torch"``; with
  the fused default, accelerate cannot see the skip and Trainer steps its scheduler all the same);
* evaluation, ``predict`` and ``save_model`` see the committed parameters; a checkpoint commits the update
  in flight on every rank and stores ``consolidated_state_dict()`` as ``optimizer.pt`` (loadable at any
  world size); ``resume_from_checkpoint`` loads it on every rank. The end of ``train()`` calls ``finish()``;
* ``resume_from_checkpoint=True`` (after a preemption: README, "Checkpointing and resuming") skips a newest
  ``checkpoint-N`` whose save was cut short (no ``trainer_state.json``), and the ranks check that they all
  resume from the same checkpoint (else a ``ValueError`` on every rank).

Refused, with a ``ValueError`` at construction: DeepSpeed, FSDP, tensor / context parallelism, ``DataParallel`` (several GPUs in one process),
``fp16_full_eval`` / ``bf16_full_eval`` (they cast the parameters away from the optimizer's buffer),
``enable_jit_checkpoint`` (a per-rank signal cannot drive a collective save), and ``acco_kwargs`` with
``blocking=False`` (a ``step()`` call would then not always launch a round, so Trainer steps would stop being
updates), ``process_group`` or ``max_grad_norm`` (use ``TrainingArguments.max_grad_norm``).

Tested with transformers 5.24 / 5.25 and accelerate 1.15 / 1.16. It overrides ``Trainer._clip_grad_norm``, ``_get_grad_norm``,
``_save_checkpoint``, ``_save_optimizer_and_scheduler``, ``_load_optimizer_and_scheduler``, ``_load_best_model``
and ``_finalize_training``, which transformers has since 5.3, and refuses to import where they are missing.

**accelerate without Trainer** (the ``run_clm_no_trainer.py`` pattern)::

    accelerator = Accelerator()
    model = AutoModelForCausalLM.from_config(config).to(accelerator.device)   # final device first
    opt = AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=3e-4, weight_decay=0.1,
                        mode="sync", max_grad_norm=1.0)                         # instead of torch.optim.AdamW
    sched = get_scheduler("linear", opt, num_warmup_steps=warmup * accelerator.num_processes,
                          num_training_steps=updates * accelerator.num_processes)
    loader, sched = accelerator.prepare(loader, sched)   # NOT the model (no DDP), NOT the optimizer
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)                       # no accelerator.clip_grad_norm_: max_grad_norm= does it
        opt.step()
        sched.step()
        opt.zero_grad()
    opt.finish()                                         # the model holds the last committed parameters

* Not ``prepare(model)``: that wraps it in DDP, whose all-reduce would come on top of the optimizer's own.
  For mixed-precision autocast (or ``torch.compile``) without DDP: ``model = accelerator.prepare_model(model,
  device_placement=False, evaluation_mode=True)``, what AccoTrainer does.
* Not ``prepare(opt)``: ``AcceleratedOptimizer`` round-trips the state dict at construction (a collective
  load for ACCO), skips ``step()`` while ``sync_gradients`` is false and takes each call for an update; in mode
  ``"acco"`` the first ``step()`` through it raises a ``ValueError`` on every rank. ``accelerator.accumulate(model)``
  is not needed: accumulate by calling backward several times before ``opt.step()``. (bf16 only: fp16 through
  accelerate's ``GradScaler`` without Trainer is not tested.)
* A prepared scheduler steps ``num_processes`` times per call (accelerate's convention), hence the
  ``* accelerator.num_processes`` above, as in ``run_clm_no_trainer.py``; or step an unprepared one yourself.
* Mode ``"acco"``: two ``opt.step()`` calls per update, each with half the update's samples; a scheduler
  stepped after every call counts calls (README, "Batch size and schedule length"). Once the loop does this,
  build the optimizer with ``batch_rule_applied=True``, which silences the first step's warning about it.
* Evaluate inside ``with opt.committed_parameters():``; save with ``opt.consolidated_state_dict(to=0)``
  (collective) beside ``accelerator.unwrap_model(model).state_dict()``.

``tests/test_hf_trainer.py`` holds both to DDP + AdamW at float tolerance (mode ``"sync"``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
import weakref
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import transformers
from transformers import Trainer

from ..optimizer import AccoOptimizer
from ..policy import check_supported
from ..schedule import RoundKind
from .hf_amp import ScaledAccoOptimizer

try:  # the names Trainer itself writes and reads
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
except ImportError:  # pragma: no cover - older layouts
    OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME = "optimizer.pt", "scheduler.pt", "trainer_state.json"
try:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError:  # pragma: no cover
    PREFIX_CHECKPOINT_DIR = "checkpoint"
try:
    from transformers.trainer_pt_utils import reissue_pt_warnings
except ImportError:  # pragma: no cover
    def reissue_pt_warnings(caught_warnings: list) -> None:
        for w in caught_warnings:
            warnings.warn(w.message, w.category)

logger = logging.getLogger("acco")

__all__ = ["AccoTrainer", "ACCO_OPTIM_NAMES"]

# The Trainer methods AccoTrainer overrides; an older Trainer without them would silently keep doing the
# wrong thing (clip local gradients, save a per-rank state as if it were the whole optimizer).
_TRAINER_HOOKS = (
    "_clip_grad_norm", "_get_grad_norm", "_save_checkpoint", "_save_optimizer_and_scheduler",
    "_load_optimizer_and_scheduler", "_load_best_model", "_finalize_training", "create_accelerator_and_postprocess",
)
_missing = [name for name in _TRAINER_HOOKS if not hasattr(Trainer, name)]
if _missing:
    raise ImportError(
        f"acco.integrations.hf overrides Trainer methods that transformers {transformers.__version__} lacks ({_missing}): "
        "use transformers>=5.3"
    )

# TrainingArguments.optim values whose class AccoOptimizer wraps as Trainer would build it.
ACCO_OPTIM_NAMES: frozenset[str] = frozenset({"adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor"})
# Keys with which get_optimizer_cls_and_kwargs hands over parameter groups or the model it built itself.
_OWN_GROUPS_KEYS = ("params", "model", "optimizer_dict")
_MODES = ("acco", "dpu", "sync")


class AccoTrainer(Trainer):
    """``transformers.Trainer`` with ``AccoOptimizer`` (see the module docstring).

    Args:
        acco_kwargs: keyword arguments for ``AccoOptimizer`` (``mode``, ``comm_dtype``, ``timeout``,
            ``nonfinite``, ``partition``, ``engine``); default mode ``"acco"``.
        *args, **kwargs: those of ``transformers.Trainer``. ``optimizers=(opt, sched)`` takes an
            ``AccoOptimizer`` built over ``model``'s parameters on their final device, or ``(None, sched)``.
    """

    def __init__(self, *args: Any, acco_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.acco_kwargs: dict[str, Any] = _checked_acco_kwargs(acco_kwargs)
        self._acco_loss_factor = 1.0  # read by the accelerator's backward hook (installed in super().__init__)
        self._acco_micro_batch = 0  # index of the next micro-batch inside the current update
        super().__init__(*args, **kwargs)
        self._check_supported_setup()

    # ------------------------------------------------------------------ setup
    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's accelerator, with three hooks: no DDP wrapper, no AcceleratedOptimizer, loss factor."""
        super().create_accelerator_and_postprocess()
        _install_accelerator_hooks(self.accelerator, weakref.ref(self))

    def _check_supported_setup(self) -> None:
        args = self.args
        refusals = []
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False):
            refusals.append("DeepSpeed / FSDP (they shard the model themselves; ACCO is ZeRO-1 data parallelism)")
        if getattr(args, "parallelism_config", None) is not None or (getattr(self.model, "tp_size", None) or 1) > 1:
            refusals.append("tensor / context parallelism (parallelism_config)")
        if getattr(self, "is_distributed_loading_by_transformers", False) or self.is_model_parallel:
            refusals.append("a model sharded or spread over devices (device_map / distributed_config)")
        if args.n_gpu > 1:
            refusals.append("several GPUs in one process (DataParallel); launch one process per GPU with torchrun")
        if args.fp16_full_eval or args.bf16_full_eval:
            refusals.append("fp16_full_eval / bf16_full_eval (they cast the parameters away from the optimizer's buffer)")
        if getattr(args, "enable_jit_checkpoint", False):
            refusals.append("enable_jit_checkpoint (a per-rank signal cannot drive the collective checkpoint)")
        if refusals:
            raise ValueError("AccoTrainer does not support " + "; ".join(refusals))
        if self.optimizer is not None and not isinstance(self.optimizer, AccoOptimizer):
            raise ValueError(
                f"AccoTrainer got optimizers=({type(self.optimizer).__name__}, ...): pass an AccoOptimizer, or None and "
                "let TrainingArguments (optim, learning_rate, ...) or optimizer_cls_and_kwargs choose the inner optimizer"
            )
        if self.optimizer is not None:
            _check_acco_optimizer(self.optimizer, self.model)

    @property
    def acco_optimizer(self) -> Optional[AccoOptimizer]:
        """The ``AccoOptimizer`` once built (``create_optimizer``, at the start of ``train()``), else None.
        With fp16, ``self.optimizer`` is the ``ScaledAccoOptimizer`` around it once training started."""
        opt = self.optimizer.optimizer if isinstance(self.optimizer, ScaledAccoOptimizer) else self.optimizer
        return opt if isinstance(opt, AccoOptimizer) else None

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        """``AccoOptimizer`` over Trainer's decay / no-decay groups, with the class and hyper-parameters that
        ``TrainingArguments`` (or ``optimizer_cls_and_kwargs``) ask for, and ``max_grad_norm`` as global clipping.

        The model must be on its final device: AccoOptimizer re-points ``p.data`` at its flat buffer, so a later
        copying ``.to()`` would leave the optimizer training tensors the model no longer uses.
        """
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            source = "optimizer_cls_and_kwargs"
        else:
            optim_name = str(getattr(self.args.optim, "value", self.args.optim))
            if optim_name not in ACCO_OPTIM_NAMES:
                raise ValueError(
                    f"AccoTrainer cannot wrap optim={optim_name!r}: it is not one "
                    f"of {sorted(ACCO_OPTIM_NAMES)} (others build their own parameter groups from the model, keep "
                    "quantized or paged state, switch parameters between train and eval, or step inside backward). "
                    "For another torch.optim class, pass optimizer_cls_and_kwargs=(cls, kwargs)"
                )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            source = f"optim={optim_name!r}"
        optimizer_kwargs = dict(optimizer_kwargs)
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise ValueError(
                f"AccoTrainer cannot wrap {source} ({optimizer_cls!r}): AccoOptimizer needs a torch.optim.Optimizer "
                "class, not an optimizer factory"
            )
        check_supported(optimizer_cls)  # LBFGS, SparseAdam: a TypeError saying why, before anything is built
        own_groups = [key for key in _OWN_GROUPS_KEYS if key in optimizer_kwargs]
        if own_groups:
            raise ValueError(
                f"AccoTrainer cannot wrap {source} ({optimizer_cls.__name__}): it builds its own parameter groups "
                f"(kwargs {own_groups})"
            )
        decay_names = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay_names], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
        ]
        groups = [group for group in groups if group["params"]]
        _check_on_device([p for _, p in named], self.args.device)
        max_grad_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else None
        acco_kwargs = {**self.acco_kwargs, "batch_rule_applied": True}  # one Trainer step = one update: see training_step
        self.optimizer = AccoOptimizer(groups, optimizer_cls, **optimizer_kwargs, max_grad_norm=max_grad_norm, **acco_kwargs)
        logger.info(
            "acco: AccoTrainer built AccoOptimizer(%s, mode=%s, max_grad_norm=%s) over %d rank(s); %s",
            optimizer_cls.__name__, self.optimizer.mode, max_grad_norm, self.optimizer.world_size,
            "two step() calls per Trainer step" if self.optimizer.mode == "acco" else "one step() call per Trainer step",
        )
        return self.optimizer

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """As Trainer's, except that ``resume_from_checkpoint=True`` skips checkpoint folders whose save was cut short
        (a kill during a save leaves ``checkpoint-N`` without ``trainer_state.json``, which Trainer writes last), and
        that every rank must resume from the same checkpoint, or every rank raises (a ``ValueError``), instead of
        some ranks loading a collective state that the others never load."""
        if self.model_init is not None and self.acco_optimizer is not None:
            self.acco_optimizer.close()  # Trainer re-creates model and optimizer: free the old private group
        self._acco_micro_batch = 0
        return super().train(self._agreed_checkpoint(resume_from_checkpoint), *args, **kwargs)

    def _agreed_checkpoint(self, resume: Any) -> Any:
        """The checkpoint this rank resumes from (None: a fresh start), once every rank said it chose the same one."""
        missing = False
        if resume is True:
            resume = _last_complete_checkpoint(self.args.output_dir, warn=self.is_world_process_zero())
            missing = resume is None
        view = "no checkpoint found" if missing else None if resume in (None, False) else os.path.normpath(str(resume))
        views = _all_gather_object(view)
        if len(set(views)) > 1:
            raise ValueError(
                "AccoTrainer.train: the ranks would resume from different checkpoints ("
                + ", ".join(f"rank {rank}: {v or 'none, a fresh start'}" for rank, v in enumerate(views))
                + "): every rank must see the same output_dir (a filesystem shared by all nodes) and get the same "
                "resume_from_checkpoint"
            )
        if missing:  # Trainer's own error, on every rank alike
            raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        return resume

    def training_step(
        self, model: torch.nn.Module, inputs: Mapping[str, Any], num_items_in_batch: Any = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Mode ``"acco"``: also makes the update's first (estimate) ``step()`` call, between its two halves.

        AccoOptimizer averages the calls of an update with equal weight, so each half's loss is doubled before
        backward (the average of the two calls is then the full-update gradient Trainer would compute); the
        loss returned for logging is the unscaled one.
        """
        opt = self.acco_optimizer
        if opt is None or opt.mode != "acco":
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        calls = max(1, int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)))
        index = self._acco_micro_batch % calls
        self._acco_micro_batch = (index + 1) % calls
        if calls % 2 == 0 or index != (calls - 1) // 2:
            loss = self._backward_with_factor(model, inputs, num_items_in_batch, 2.0, args, kwargs)
            if calls % 2 == 0 and index == calls // 2 - 1:
                self._estimate_step()
            return loss
        # Odd number of micro-batches: the middle one is split in two, the estimate call between its halves.
        first, second, (rows_first, rows_second) = _split_rows(inputs)
        if self._loss_is_normalised_by_items(num_items_in_batch):
            weights = (1.0, 1.0)  # each half is already sum / (the update's item count)
        else:  # each half is a mean over its rows: weigh it by its share of the micro-batch
            weights = (rows_first / (rows_first + rows_second), rows_second / (rows_first + rows_second))
        loss = self._backward_with_factor(model, first, num_items_in_batch, 2.0 * weights[0], args, kwargs) * weights[0]
        self._estimate_step()
        if rows_second:
            loss = loss + self._backward_with_factor(model, second, num_items_in_batch, 2.0 * weights[1], args, kwargs) * weights[1]
        # else a one-row micro-batch (an epoch's last, where the loader does not even out batches): its row went
        # whole to the estimate call, weighed x2, and the commit call adds nothing, so the committed update (the
        # average of the two calls) is still Trainer's; only this update's estimate, which saw more than half of
        # the update's rows, steps on a larger gradient than the update's (twice it for ga = 1).
        return loss

    def _backward_with_factor(self, model, inputs, num_items_in_batch, factor: float, args: tuple, kwargs: dict) -> torch.Tensor:
        self._acco_loss_factor = factor
        try:
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        finally:
            self._acco_loss_factor = 1.0

    def _estimate_step(self) -> None:
        """The update's first step() call: the gradients so far go to the estimate round; the model then holds
        the parameters on which the second half's gradients must be computed."""
        opt = self.acco_optimizer
        if isinstance(self.optimizer, ScaledAccoOptimizer):
            self.optimizer.estimate_step()  # fp16: unscaled, and an overflow skips the whole update (see hf_amp)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)  # drops gradient tensors that autograd made outside the optimizer's buffer

    def _loss_is_normalised_by_items(self, num_items_in_batch: Any) -> bool:
        """The same decision Trainer.training_step makes (5.24: trainer.py, "loss_is_scaled_for_ga")."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        """No clipping of local gradients: AccoOptimizer(max_grad_norm=...) clips the averaged one."""
        return None

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> None:
        """No local norm (a model-sized reduction, and not the global norm); see ``log``."""
        return None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``grad_norm`` where the last installed round committed (modes sync and dpu): the global norm of
        its averaged gradient, before clipping. Mode acco installs an estimate at every Trainer step: omitted."""
        opt = self.acco_optimizer
        if opt is not None and "loss" in logs and "grad_norm" not in logs and opt.max_grad_norm is not None:
            last = opt.last_round
            if last is not None and last.kind is RoundKind.COMMIT and last.grad_norm is not None:
                logs["grad_norm"] = last.grad_norm
        return super().log(logs, *args, **kwargs)

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        """Commit the last update (collective) before Trainer's end-of-training work (best model, callbacks)."""
        if self.acco_optimizer is not None:
            self.acco_optimizer.finish()
        return super()._finalize_training(*args, **kwargs)

    # ------------------------------------------------------------------ evaluation and saving
    @contextlib.contextmanager
    def _committed(self) -> Iterator[None]:
        opt = self.acco_optimizer
        if opt is None:
            yield
            return
        with opt.committed_parameters():
            yield

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """On the last committed parameters (blocking mode: no collective; training resumes unchanged)."""
        with self._committed():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._committed():
            return super().predict(*args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Saves the committed parameters, also in the middle of training."""
        with self._committed():
            super().save_model(output_dir, _internal_call=_internal_call)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any, *args: Any, **kwargs: Any) -> None:
        """Every rank commits the update in flight first (at a Trainer step boundary this only waits for it),
        so the saved model, the saved optimizer and the run that goes on all hold the same parameters."""
        if self.acco_optimizer is not None:
            self.acco_optimizer.finish()
        return super()._save_checkpoint(model, trial, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """``optimizer.pt`` = ``consolidated_state_dict()`` (collective; whole, any world size), written by the
        rank(s) Trainer writes with; ``scheduler.pt`` as Trainer writes it."""
        opt = self.acco_optimizer
        if opt is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        state = None
        for writer in self._writer_ranks():
            gathered = opt.consolidated_state_dict(to=writer)
            if writer == opt.rank:
                state = gathered
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            with warnings.catch_warnings(record=True) as caught:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            reissue_pt_warnings(caught)

    def _writer_ranks(self) -> list[int]:
        """The ranks where ``args.should_save`` holds: rank 0, or one per node with ``save_on_each_node``."""
        opt = self.acco_optimizer
        if opt.world_size == 1 or not getattr(self.args, "save_on_each_node", False):
            return [0]
        flags = _all_gather_flag(self.args.should_save, opt.world_size)
        return [rank for rank, flag in enumerate(flags) if flag]

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """Every rank loads ``optimizer.pt`` into the AccoOptimizer (collective; also writes the committed
        parameters into the model), then the scheduler, as Trainer does."""
        opt = self.acco_optimizer
        if checkpoint is None or opt is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        scheduler_file = os.path.join(checkpoint, SCHEDULER_NAME)
        if not self._load_acco_state(checkpoint, also_needs=scheduler_file):
            return
        with warnings.catch_warnings(record=True) as caught:
            self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
        reissue_pt_warnings(caught)

    def _load_best_model(self) -> None:
        """Trainer loads the best checkpoint's weights; the optimizer follows, so that training can go on."""
        super()._load_best_model()
        if self.acco_optimizer is not None and self.state.best_model_checkpoint is not None:
            self._load_acco_state(self.state.best_model_checkpoint)

    def _load_acco_state(self, checkpoint: str, also_needs: Optional[str] = None) -> bool:
        """Collective. False (on every rank) where the checkpoint has no optimizer state, as Trainer skips it."""
        opt = self.acco_optimizer
        optimizer_file = os.path.join(checkpoint, OPTIMIZER_NAME)
        present = os.path.isfile(optimizer_file) and (also_needs is None or os.path.isfile(also_needs))
        flags = _all_gather_flag(present, opt.world_size)
        if not any(flags):
            logger.warning("acco: %s holds no %s: the optimizer keeps its state", checkpoint, OPTIMIZER_NAME)
            return False
        if not all(flags):
            raise ValueError(
                f"{optimizer_file} is readable on ranks {[r for r, f in enumerate(flags) if f]} only: every rank loads it "
                "(use a shared filesystem, or save_on_each_node=True)"
            )
        device = self.args.device
        map_location = device if opt.world_size > 1 and device.type != "cpu" else "cpu"
        opt.load_state_dict(torch.load(optimizer_file, map_location=map_location, weights_only=True))
        return True


# ---------------------------------------------------------------------- helpers
def _checked_acco_kwargs(acco_kwargs: Optional[dict[str, Any]]) -> dict[str, Any]:
    kwargs = dict(acco_kwargs or {})
    if "max_grad_norm" in kwargs:
        raise ValueError("acco_kwargs: set TrainingArguments.max_grad_norm instead of max_grad_norm (AccoOptimizer clips with it)")
    if "process_group" in kwargs:
        raise ValueError("acco_kwargs: process_group is not supported by AccoTrainer, which is data parallel over the whole world")
    if kwargs.get("blocking", True) is not True:
        raise ValueError(
            "acco_kwargs: AccoTrainer needs blocking=True (with blocking=False a step() call does not always launch a "
            "round, so Trainer steps would stop being optimizer updates)"
        )
    if kwargs.get("mode", "acco") not in _MODES:
        raise ValueError(f"acco_kwargs: mode must be one of {_MODES}, got {kwargs['mode']!r}")
    return kwargs


def _check_acco_optimizer(opt: AccoOptimizer, model: torch.nn.Module) -> None:
    opt.batch_rule_applied = True  # AccoTrainer makes each Trainer step one update (training_step)
    if not opt.blocking:
        raise ValueError("AccoTrainer needs an AccoOptimizer with blocking=True (see acco_kwargs)")
    optimized = {id(p) for group in opt.param_groups for p in group["params"] if p.requires_grad}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if optimized != trainable:
        raise ValueError(
            f"AccoTrainer: the AccoOptimizer holds {len(optimized)} trainable parameters, the model {len(trainable)}, "
            f"{len(optimized & trainable)} of them the same: build it over model.parameters() of the model given to AccoTrainer"
        )


def _check_on_device(params: list[torch.Tensor], device: torch.device) -> None:
    if not params:
        raise ValueError("AccoTrainer: the model has no trainable parameters")
    device = torch.device(device)
    elsewhere = sorted({str(p.device) for p in params if not _same_device(p.device, device)})
    if elsewhere:
        raise ValueError(
            f"AccoTrainer: trainable parameters on {elsewhere}, but TrainingArguments.device is {device}. The model must "
            "be on its final device before the optimizer is built (AccoOptimizer re-points p.data at its own buffer, "
            "and a later .to() would copy the parameters away from it)"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cpu`` and ``cpu:0`` (what accelerate reports) are one device; an index only matters where both have one."""
    return a.type == b.type and (a.type == "cpu" or a.index is None or b.index is None or a.index == b.index)


_CHECKPOINT_FOLDER = re.compile(rf"{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)")


def _last_complete_checkpoint(output_dir: Optional[str], warn: bool) -> Optional[str]:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that holds ``trainer_state.json``; None if there is none."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name) for name in os.listdir(output_dir)
        if (match := _CHECKPOINT_FOLDER.fullmatch(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
            return folder
        if warn:
            logger.warning("acco: %s holds no %s (its save was cut short): skipping it", folder, TRAINER_STATE_NAME)
    return None


def _all_gather_object(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _all_gather_flag(flag: bool, world_size: int) -> list[bool]:
    if world_size == 1:
        return [bool(flag)]
    return [bool(f) for f in _all_gather_object(bool(flag))]


def _split_rows(inputs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
    """Split every tensor of a micro-batch along dim 0 into a first and a second half (first gets the extra row;
    a one-row micro-batch leaves the second half empty)."""
    rows = {key: value.shape[0] for key, value in inputs.items() if isinstance(value, torch.Tensor) and value.dim() > 0}
    if not rows:
        raise ValueError("AccoTrainer (mode 'acco'): cannot split a micro-batch that holds no batched tensors")
    sizes = set(rows.values())
    if len(sizes) != 1:
        raise ValueError(f"AccoTrainer (mode 'acco'): cannot split a micro-batch whose tensors disagree on dim 0: {rows}")
    total = sizes.pop()
    cut = (total + 1) // 2  # one row: all of it, and an empty second half

    def part(select: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        return {key: select(value) if key in rows else value for key, value in inputs.items()}

    return part(lambda t: t[:cut]), part(lambda t: t[cut:]), (cut, total - cut)


def _install_accelerator_hooks(accelerator: Any, trainer_ref: "weakref.ReferenceType[AccoTrainer]") -> None:
    """Instance-level hooks on the Trainer's own Accelerator (accelerate 1.15: accelerator.py).

    * ``prepare_model``: Trainer's ``_prepare_for_training`` calls ``accelerator.prepare(model, optimizer)``,
      which wraps the model in DistributedDataParallel (``prepare_model``, DDP branch). ``evaluation_mode=True``
      applies mixed-precision autocast and ``torch.compile`` only (what Trainer itself uses for models that
      reduce their own gradients), and ``device_placement=False`` never moves it: the optimizer owns its storage.
    * ``prepare_optimizer``: an ``AcceleratedOptimizer`` would reload the state dict at construction (a
      collective load for ACCO) and skip ``step()`` while ``sync_gradients`` is false; Trainer calls
      ``self.optimizer.step()`` once per update itself, so the AccoOptimizer is used as it is. With fp16 (a
      ``GradScaler`` on the accelerator) it is wrapped in ``ScaledAccoOptimizer`` (``hf_amp``), which steps it
      through the scaler and tells Trainer when an update was skipped.
    * ``backward``: multiplies the loss by the trainer's current factor (2 for each half of an acco-mode update).
    """
    prepare_model = accelerator.prepare_model
    prepare_optimizer = accelerator.prepare_optimizer
    backward = accelerator.backward

    def prepare_model_without_ddp(
        model: torch.nn.Module, device_placement: Optional[bool] = None, evaluation_mode: bool = False
    ) -> torch.nn.Module:
        return prepare_model(model, device_placement=False, evaluation_mode=True)

    def prepare_optimizer_as_is(optimizer: torch.optim.Optimizer, device_placement: Optional[bool] = None) -> Any:
        if isinstance(optimizer, ScaledAccoOptimizer):
            return optimizer
        if isinstance(optimizer, AccoOptimizer):
            scaler = accelerator.scaler
            if scaler is None or not scaler.is_enabled():
                return optimizer
            scaled = ScaledAccoOptimizer(optimizer, scaler)
            # As prepare_optimizer does: optimizer_step_was_skipped reads them. A wrapper from an earlier train()
            # (model_init) goes: its last "skipped" would otherwise hold the scheduler still for good.
            accelerator._optimizers[:] = [o for o in accelerator._optimizers if not isinstance(o, ScaledAccoOptimizer)]
            accelerator._optimizers.append(scaled)
            return scaled
        return prepare_optimizer(optimizer, device_placement=device_placement)

    def backward_with_factor(loss: torch.Tensor, **kwargs: Any) -> Any:
        trainer = trainer_ref()
        factor = 1.0 if trainer is None else trainer._acco_loss_factor
        return backward(loss * factor if factor != 1.0 else loss, **kwargs)

    accelerator.prepare_model = prepare_model_without_ddp
    accelerator.prepare_optimizer = prepare_optimizer_as_is
    accelerator.backward = backward_with_factor
