"""The training loop: activations store -> one or more SAEs -> metrics, evals, saved SAEs.

Read :meth:`Trainer.fit` top to bottom: it is the whole algorithm. Each step pulls one shuffled
batch (all hooks from one forward pass) and takes one optimizer step per SAE. Nothing reads a
value back to the host except every ``log_every_steps`` steps, when the metrics accumulated on
device are fetched in one transfer, checked for NaN/Inf, and logged.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from drrik.checkpoint import CheckpointManager
from drrik.config import RunConfig, parse_sweep
from drrik.data import ContextStream, load_source
from drrik.errors import require
from drrik.evaluate import EvalTarget, evaluate, held_out_contexts
from drrik.geometric_median import geometric_median
from drrik.model import load_model
from drrik.run_dir import RunDir, default_run_name
from drrik.sae import SAE, DeadFeatureTracker, build_sae, resample_dead_features
from drrik.schedules import build_lr_scheduler, sparsity_coefficient
from drrik.status import write_heartbeat
from drrik.store import ActivationsStore
from drrik.wandb_logging import WandbLogger

GEOMETRIC_MEDIAN_SAMPLES = 8192


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stops before anything is saved."""


class TrainingStopped(RuntimeError):
    """A signal stopped the run after a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as plain values and tensors (safe to load)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def slot_name(hook: str, setting: dict[str, str], several_hooks: bool) -> str:
    """A readable, filesystem-safe name for one SAE of a run."""
    parts = [hook] if several_hooks or not setting else []
    parts += [f"{k}={v}" for k, v in setting.items()]
    return "__".join(parts)


@dataclass
class SAESlot:
    """One SAE being trained, with its optimizer, schedules and on-device metric sums."""

    name: str
    hook: str
    sae: SAE
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tracker: DeadFeatureTracker
    scale: float = 1.0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    nonfinite_step: torch.Tensor | None = None

    def accumulate(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def eval_target(self) -> EvalTarget:
        return EvalTarget(self.name, self.hook, self.sae, self.scale)


def batch_explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """1 - ||x - x_hat||^2 / ||x - mean(x)||^2 over a batch, as a device scalar."""
    residual = (x - x_hat.to(x.dtype)).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return 1.0 - residual / total


class Trainer:
    """Trains every SAE of a :class:`RunConfig` from one activations stream."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        model: Any = None,
        dataset: Any = None,
        verbose: bool = True,
    ) -> None:
        self.cfg, self.verbose = cfg, verbose
        self.run = RunDir(cfg.out or default_run_name(cfg))
        self.run.check_reusable(cfg)
        cfg.wandb.resolved_mode()  # a bad WANDB_MODE fails before the model loads
        self.logger: WandbLogger | None = None
        seed_everything(cfg.trainer.seed)
        self.device = torch.device(cfg.model.device)
        self.model = load_model(
            model if model is not None else cfg.model.model,
            device=self.device,
            dtype=cfg.model.model_dtype,
        )
        self.hooks = cfg.model.hook_names
        dataset = dataset if dataset is not None else load_source(cfg.data)
        self.store = ActivationsStore(
            self.model,
            self.hooks,
            cfg.data,
            cfg.store,
            dataset=dataset,
            device=self.device,
            seed=cfg.trainer.seed,
            verbose=verbose,
        )
        self.eval_contexts = self._eval_contexts(dataset)
        self.batch_size = cfg.store.train_batch_size_tokens
        self.total_steps = math.ceil(cfg.trainer.training_tokens / self.batch_size)
        self.slots = self._build_slots()
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.stop_signal: int | None = None
        self.checkpoints = CheckpointManager(self.run.path, cfg.checkpoint.keep_checkpoints)
        restored = self.checkpoints.load_latest()
        if restored is None:
            for slot in self.slots:
                self._init_slot(slot)
        else:
            state, manifest = restored
            self.load_state_dict(state)
            self.run.truncate_metrics(after_step=self.step)
            if verbose:
                print(
                    f"resuming {self.run.path} from checkpoint step {manifest['step']} "
                    f"({self.tokens:,} tokens done)"
                )

    # -- set-up ------------------------------------------------------------------------------
    def _eval_contexts(self, train_dataset: Any) -> list[torch.Tensor]:
        """The held-out contexts, fixed for the whole run: rows the training stream skips."""
        cfg = self.cfg
        if cfg.data.eval_split:
            dataset, holdout = load_source(cfg.data, cfg.data.eval_split), "all"
        else:
            dataset, holdout = train_dataset, "eval"
        stream = ContextStream(
            dataset, self.model.tokenizer, cfg.data, holdout=holdout, cycle=False
        )
        return held_out_contexts(stream, cfg.eval.eval_contexts, cfg.eval.eval_batch_size_prompts)

    def _build_slots(self) -> list[SAESlot]:
        cfg, t = self.cfg, self.cfg.trainer
        settings = parse_sweep(t.sweep)
        slots = []
        for hook in self.hooks:
            for setting in settings:
                sae_cfg = replace(cfg.sae_configs_for(setting), d_in=self.store.d_in[hook])
                torch.manual_seed(t.seed + len(slots))
                sae = build_sae(sae_cfg, device=self.device).train()
                optimizer = torch.optim.Adam(
                    sae.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2)
                )
                scheduler = build_lr_scheduler(
                    optimizer,
                    name=t.lr_scheduler_name,
                    total_steps=self.total_steps,
                    warmup_steps=t.lr_warm_up_steps,
                    decay_steps=t.lr_decay_steps,
                    lr_end_fraction=t.lr_end_fraction,
                    n_restart_cycles=t.n_restart_cycles,
                )
                name = slot_name(hook, setting, len(self.hooks) > 1)
                tracker = DeadFeatureTracker(sae.d_sae, device=self.device)
                slots.append(SAESlot(name, hook, sae, optimizer, scheduler, tracker))
        return slots

    @torch.no_grad()
    def _init_slot(self, slot: SAESlot) -> None:
        """Input scale (expected_average_only_in) and b_dec from real activations."""
        t = self.cfg.trainer
        if t.normalize_activations == "expected_average_only_in":
            slot.scale = self.store.norm_scaling_factor(slot.hook)
        if t.b_dec_init_method == "zeros":
            return
        sample = self.store.sample(slot.hook, GEOMETRIC_MEDIAN_SAMPLES) * slot.scale
        if t.b_dec_init_method == "mean":
            center = sample.mean(0)
        else:
            center = geometric_median(sample)
        slot.sae.b_dec.copy_(center.to(slot.sae.b_dec))

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, dict[str, float]]:
        """Train to the token budget, evaluate, save; return the final eval metrics per SAE."""
        self.run.write_config(self.cfg)
        run_id = self.checkpoints.latest_manifest().get("wandb_run_id")
        self.logger = WandbLogger(self.cfg.wandb, self.run.path, self.cfg.to_dict(), run_id)
        write_heartbeat(self.run.path, "running")
        try:
            self.train_to_budget()
            metrics = self.finish()
        except TrainingStopped as exc:
            write_heartbeat(self.run.path, "stopped")
            self.logger.finish(exc.exit_code)
            raise
        except BaseException:
            write_heartbeat(self.run.path, "failed")
            self.logger.finish(1)
            raise
        finally:
            self.store.close()
        write_heartbeat(self.run.path, "finished")
        self.logger.finish()
        return metrics

    def train_to_budget(self) -> None:
        """The loop: one batch, one step per SAE; log, evaluate, checkpoint when due."""
        cfg, t = self.cfg, self.cfg.trainer
        total = self.total_steps * self.batch_size
        bar = tqdm(
            total=total,
            initial=min(self.tokens, total),
            unit="tok",
            unit_scale=True,
            disable=not self.verbose,
            dynamic_ncols=True,
        )
        next_eval = self._next_multiple(cfg.eval.eval_every_tokens)
        next_resample = self._next_multiple(t.resample_every_tokens)
        next_checkpoint = self._next_multiple(cfg.checkpoint.checkpoint_every_tokens)
        checkpoint_seconds = cfg.checkpoint.checkpoint_every_minutes * 60
        last_checkpoint = window_start = time.perf_counter()
        window_tokens = 0
        with self._stop_on_signals():
            while self.tokens < t.training_tokens:
                batch = self.store.next_batch()
                coefficient = sparsity_coefficient(self.step, 1.0, t.l1_warm_up_steps)
                for slot in self.slots:
                    self._train_step(slot, batch.acts[slot.hook], coefficient)
                self.step += 1
                self.tokens += self.batch_size
                window_tokens += self.batch_size
                bar.update(self.batch_size)
                if next_resample and self.tokens >= next_resample:
                    self._resample(batch.acts)
                    next_resample += t.resample_every_tokens
                now = time.perf_counter()
                eval_due = bool(next_eval) and self.tokens >= next_eval
                checkpoint_due = (
                    (bool(next_checkpoint) and self.tokens >= next_checkpoint)
                    or (checkpoint_seconds > 0 and now - last_checkpoint >= checkpoint_seconds)
                    or self.stop_signal is not None
                    or self.tokens >= t.training_tokens
                )
                if self.step % t.log_every_steps == 0 or eval_due or checkpoint_due:
                    self.elapsed += now - window_start
                    rows = self._log_rows(
                        window_tokens / max(now - window_start, 1e-9), coefficient
                    )
                    if eval_due:
                        self._add_eval(rows)
                        next_eval += cfg.eval.eval_every_tokens
                    self.run.append_metrics(rows)
                    self.logger.log_rows(rows)
                    write_heartbeat(self.run.path, "running")
                    bar.set_postfix(_postfix(rows[0]))
                    if checkpoint_due:
                        self.save_checkpoint()
                        last_checkpoint = time.perf_counter()
                        if next_checkpoint:
                            next_checkpoint = self._next_multiple(
                                cfg.checkpoint.checkpoint_every_tokens
                            )
                    window_start, window_tokens = time.perf_counter(), 0
                if self.stop_signal is not None:
                    bar.close()
                    raise TrainingStopped(
                        f"stopped by signal {signal.Signals(self.stop_signal).name} at step "
                        f"{self.step} ({self.tokens:,} tokens); checkpoint saved. Resume with: "
                        f"drrik train --resume {self.run.path}",
                        self.stop_signal,
                    )
        bar.close()

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Any:
        """First SIGTERM/SIGINT: finish the step, checkpoint, stop. Second: exit at once.

        Exiting at once is safe because every file drrik writes is replaced atomically.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:
                print(f"\ndrrik: second {signal.Signals(signum).name}, exiting now", flush=True)
                os._exit(128 + signum)
            self.stop_signal = signum
            print(
                f"\ndrrik: {signal.Signals(signum).name} received; finishing the step and "
                "writing a checkpoint (send it again to exit at once)",
                flush=True,
            )

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        run_id = self.logger.run_id if self.logger is not None else None
        extra = {"wandb_run_id": run_id} if run_id else {}
        return self.checkpoints.save(self.state_dict(), self.step, self.tokens, extra)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly where it is."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "slots": [
                {
                    "name": slot.name,
                    "sae": slot.sae.state_dict(),
                    "optimizer": slot.optimizer.state_dict(),
                    "scheduler": slot.scheduler.state_dict(),
                    "tracker": slot.tracker.state_dict(),
                    "scale": slot.scale,
                }
                for slot in self.slots
            ],
            "store": self.store.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        for slot, saved in zip(self.slots, state["slots"], strict=True):
            require(slot.name == saved["name"], "resume", saved["name"], "SAE names differ")
            slot.sae.load_state_dict(saved["sae"])
            slot.optimizer.load_state_dict(saved["optimizer"])
            slot.scheduler.load_state_dict(saved["scheduler"])
            slot.tracker.load_state_dict(saved["tracker"])
            slot.scale = saved["scale"]
        self.store.load_state_dict(state["store"])
        set_rng_state(state["rng"])

    def _next_multiple(self, every: int) -> int:
        return (self.tokens // every + 1) * every if every else 0

    def _train_step(self, slot: SAESlot, acts: torch.Tensor, coefficient: float) -> None:
        t, sae_cfg = self.cfg.trainer, slot.sae.cfg
        x = acts.to(slot.sae.W_dec.dtype) * slot.scale
        dead = slot.tracker.dead_mask(t.dead_feature_window)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if t.autocast
            else contextlib.nullcontext()
        )
        with autocast:
            out = slot.sae.training_forward(x, coefficient * sae_cfg.l1_coefficient, dead)
        out.loss.backward()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(slot.sae.parameters(), t.max_grad_norm)
        slot.sae.remove_parallel_decoder_grad()
        slot.optimizer.step()
        slot.optimizer.zero_grad(set_to_none=True)
        slot.sae.normalize_decoder_rows()
        slot.scheduler.step()
        slot.tracker.update(out.feature_acts)
        finite = torch.isfinite(out.loss)
        step = torch.tensor(self.step, device=finite.device)
        if slot.nonfinite_step is None:
            slot.nonfinite_step = torch.full_like(step, -1)
        first_bad = (~finite) & (slot.nonfinite_step < 0)
        slot.nonfinite_step = torch.where(first_bad, step, slot.nonfinite_step)
        slot.accumulate(
            {
                "loss": out.loss,
                **out.losses,
                "l0": (out.feature_acts > 0).float().sum(-1).mean(),
                "explained_variance": batch_explained_variance(x, out.x_hat),
                "steps": torch.ones((), device=finite.device),
            }
        )

    @torch.no_grad()
    def _resample(self, acts: dict[str, torch.Tensor]) -> None:
        for slot in self.slots:
            dead = slot.tracker.dead_mask(self.cfg.trainer.dead_feature_window)
            x = acts[slot.hook].to(slot.sae.W_dec.dtype) * slot.scale
            resample_dead_features(slot.sae, slot.optimizer, dead, x)
            slot.tracker.tokens_since_fired.masked_fill_(dead, 0)

    def _log_rows(self, tokens_per_second: float, coefficient: float) -> list[dict[str, Any]]:
        """Fetch every slot's sums in one transfer, check them, and turn them into rows."""
        window = self.cfg.trainer.dead_feature_window
        keys = [sorted(s.sums) for s in self.slots]
        packed = torch.stack(
            [
                v
                for slot, names in zip(self.slots, keys, strict=True)
                for v in [slot.sums[k] for k in names]
                + [slot.nonfinite_step.float(), slot.tracker.dead_mask(window).sum().float()]
            ]
        ).tolist()
        rows, i = [], 0
        for slot, names in zip(self.slots, keys, strict=True):
            values = dict(zip(names, packed[i : i + len(names)], strict=True))
            bad_step, dead = packed[i + len(names)], packed[i + len(names) + 1]
            i += len(names) + 2
            if bad_step >= 0:
                raise TrainingDiverged(
                    f"SAE {slot.name}: the loss became NaN or Inf at step {int(bad_step)}; "
                    "nothing was saved over earlier results. Lower --lr or the sparsity "
                    "coefficient, or keep --max-grad-norm on"
                )
            steps = values.pop("steps")
            row = {
                "step": self.step,
                "tokens": self.tokens,
                "tokens_per_second": tokens_per_second,
                "elapsed_s": self.elapsed,
                "sae": slot.name,
                "lr": slot.scheduler.get_last_lr()[0],
                "sparsity_coefficient": coefficient * slot.sae.cfg.l1_coefficient,
                "dead_features": int(dead),
                **{k: v / steps for k, v in values.items()},
            }
            rows.append(row)
            slot.sums = {}
        return rows

    # -- evaluation and output ---------------------------------------------------------------
    def evaluate(self) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
        """Held-out metrics and feature densities of every SAE."""
        for slot in self.slots:
            slot.sae.eval()
        try:
            return evaluate(
                self.model,
                [slot.eval_target() for slot in self.slots],
                self.eval_contexts,
                self.store.exclude,
                self.cfg.eval.dense_threshold,
            )
        finally:
            for slot in self.slots:
                slot.sae.train()

    def _add_eval(self, rows: list[dict[str, Any]]) -> None:
        write_heartbeat(self.run.path, "running")  # an evaluation can outlast the stale limit
        metrics, densities = self.evaluate()
        for row in rows:
            row.update({f"eval/{k}": v for k, v in metrics[row["sae"]].items()})
            if self.logger is not None:
                prefix = f"{row['sae']}/" if len(rows) > 1 else ""
                density = torch.log10(densities[row["sae"]] + 1e-10)
                self.logger.log_histogram(
                    f"{prefix}eval/log10_feature_density", density, self.tokens
                )

    def final_dir(self, slot: SAESlot) -> Path:
        single = len(self.slots) == 1
        return self.run.final_path if single else self.run.final_path / slot.name

    def finish(self) -> dict[str, dict[str, float]]:
        """Final evaluation, then each SAE saved with its input scale folded in."""
        metrics, densities = self.evaluate()
        for slot in self.slots:
            sae = build_sae(slot.sae.cfg, device=self.device)
            sae.load_state_dict(slot.sae.state_dict())
            sae.fold_activation_scale(slot.scale)
            metadata = {
                "model_name": self.cfg.model.model,
                "hook_name": slot.hook,
                "context_size": self.cfg.data.context_size,
                "prepend_bos": self.cfg.data.prepend_bos,
                "dataset_path": self.cfg.data.dataset,
                "training_tokens": self.tokens,
                "eval": metrics[slot.name],
            }
            sparsity = torch.log10(densities[slot.name] + 1e-10)
            path = sae.save(self.final_dir(slot), sparsity=sparsity, metadata=metadata)
            if self.logger is not None:
                prefix = f"{slot.name}/" if len(self.slots) > 1 else ""
                self.logger.log_histogram(f"{prefix}log10_feature_density", sparsity, self.tokens)
                self.logger.log_artifact(path, f"sae-{slot.name or 'final'}".replace("=", "-"))
        if self.verbose:
            print(format_metrics(metrics))
            print(f"saved to {self.run.final_path.resolve()}")
        return metrics


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    return {
        "loss": f"{row['loss']:.4g}",
        "L0": f"{row['l0']:.1f}",
        "EV": f"{row['explained_variance']:.3f}",
        "tok/s": f"{row['tokens_per_second']:.0f}",
    }


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one column per SAE, one row per metric."""
    names = list(metrics)
    keys = list(next(iter(metrics.values())))
    width = max(len(k) for k in keys) + 2
    cols = [max(len(n), 10) for n in names]
    lines = [
        "metric".ljust(width) + "  ".join(n.rjust(c) for n, c in zip(names, cols, strict=True))
    ]
    for key in keys:
        cells = []
        for name, c in zip(names, cols, strict=True):
            value = metrics[name][key]
            text = f"{value:d}" if isinstance(value, int) else f"{value:.4g}"
            cells.append(text.rjust(c))
        lines.append(key.ljust(width) + "  ".join(cells))
    return "\n".join(lines)


def train(cfg: RunConfig, **kwargs: Any) -> dict[str, dict[str, float]]:
    """Train the SAE(s) described by ``cfg``; see :class:`Trainer` for the keyword arguments."""
    return Trainer(cfg, **kwargs).fit()
