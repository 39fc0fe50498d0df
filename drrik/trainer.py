"""The training loop: activations store -> one or more SAEs -> metrics, evals, saved SAEs.

Read :meth:`Trainer.train_to_budget` top to bottom: it is the whole algorithm. Each step pulls
one shuffled batch from every local data shard (all hooks from one forward pass) and takes one
optimizer step per SAE. Nothing reads a value back to the host except every
``log_every_steps`` steps, when the metrics accumulated on device are fetched in one transfer,
checked for NaN/Inf, and logged.

Data parallelism (torchrun): each rank streams its own data shards; gradients, dead-feature
masks and metrics are reduced across ranks, so every rank holds the same SAEs. Only rank 0
writes files. One process with ``data_shards=N`` computes what N processes with one shard each
compute, which is how the distributed equality test checks it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from drrik.checkpoint import CheckpointManager
from drrik.config import RunConfig, parse_sweep, slot_name
from drrik.data import ContextStream, load_source
from drrik.distributed import Distributed
from drrik.errors import ConfigError, require
from drrik.evaluate import EvalTarget, evaluate, format_metrics, held_out_contexts
from drrik.geometric_median import geometric_median
from drrik.model import load_model, resolve_dtype, use_tf32_matmuls
from drrik.plots import plot_feature_density, plot_training_curves
from drrik.rng import rng_state, seed_everything, set_rng_state
from drrik.run_dir import RunDir, default_run_name
from drrik.sae import SAE, DeadFeatureTracker, build_sae, resample_dead_features
from drrik.schedules import build_lr_scheduler, sparsity_coefficient
from drrik.signals import GracefulStop
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
    nonfinite_step: torch.Tensor | None = None  # first step with a NaN/Inf loss, -1 if none
    forward: Any = None  # sae.training_forward, compiled with --compile-sae
    idle_bound: int = 0
    """Host-side upper bound on the tokens since any feature fired: below the dead-feature
    window no feature can be dead, so the step skips the dead-feature losses without asking
    the device (on a GPU, asking would synchronize every step)."""

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.sae.training_forward

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
        self.cfg = cfg
        self.dist = Distributed.from_environment(
            cfg.model.device, cfg.distributed.distributed_timeout_minutes
        )
        self.verbose = verbose and self.dist.is_main
        require(
            not (self.dist.enabled and cfg.model.model_n_devices > 1),
            "model_n_devices",
            cfg.model.model_n_devices,
            "spreading the model over GPUs is a single-process layout; run it without torchrun",
        )
        require(
            bool(cfg.out) or not self.dist.enabled,
            "out",
            cfg.out,
            "name the run directory (--out) when training with several processes",
        )
        # The config saved is the one used: 0 data shards means one per process, auto dtype
        # the one this hardware gets (so a resume elsewhere keeps it).
        cfg.distributed.data_shards = cfg.distributed.data_shards or self.dist.world_size
        cfg.model.model_dtype = resolve_dtype(cfg.model.model_dtype, cfg.model.device)
        self.run = RunDir(cfg.out or default_run_name(cfg))
        self.run.check_reusable(cfg)
        cfg.wandb.resolved_mode()  # a bad WANDB_MODE fails before the model loads
        self.logger: WandbLogger | None = None
        seed_everything(cfg.trainer.seed)
        self.device = self.dist.device(cfg.model.device)
        # The dataset opens first: a bad one fails before the model's load.
        dataset = dataset if dataset is not None else load_source(cfg.data)
        use_tf32_matmuls(self.device)
        self.model = load_model(
            model if model is not None else cfg.model.model,
            device=self.device,
            dtype=cfg.model.model_dtype,
            n_devices=cfg.model.model_n_devices,
        )
        self.hooks = cfg.model.hook_names
        self.n_shards = cfg.distributed.data_shards
        self.shards = self.dist.local_shards(self.n_shards)
        self.stores = [
            ActivationsStore(
                self.model,
                self.hooks,
                cfg.data,
                cfg.store,
                dataset=dataset,
                device=self.device,
                seed=cfg.trainer.seed + shard,
                shard=(shard, self.n_shards),
                verbose=self.verbose and i == 0,
            )
            for i, shard in enumerate(self.shards)
        ]
        self.eval_contexts = self._eval_contexts(dataset) if self.dist.is_main else []
        self.dist.wait_for_main()  # rank 0 read its held-out contexts alone
        self.batch_size = cfg.store.train_batch_size_tokens * self.n_shards  # global, per step
        self.total_steps = math.ceil(cfg.trainer.training_tokens / self.batch_size)
        self.slots = self._build_slots()
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.stop = GracefulStop()
        self.checkpoints = CheckpointManager(self.run.path, cfg.checkpoint.keep_checkpoints)
        restored = self.checkpoints.load_latest()
        if restored is None:
            if self.dist.is_main:
                # Rows of an attempt killed before its first checkpoint: this run logs them again.
                self.run.truncate_metrics(after_step=0)
            for slot in self.slots:
                self._init_slot(slot)
        else:
            state, manifest = restored
            self.load_state_dict(state)
            if self.dist.is_main:
                self.run.truncate_metrics(after_step=self.step)
            if self.verbose:
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
        tokenizer = self.model.tokenizer
        stream = ContextStream(dataset, tokenizer, cfg.data, holdout=holdout, cycle=False)
        return held_out_contexts(stream, cfg.eval.eval_contexts, cfg.eval.eval_batch_size_prompts)

    def _build_slots(self) -> list[SAESlot]:
        cfg, t = self.cfg, self.cfg.trainer
        settings = parse_sweep(t.sweep)
        d_in = self.stores[0].d_in
        slots = []
        for hook in self.hooks:
            for setting in settings:
                sae_cfg = replace(cfg.sae_configs_for(setting), d_in=d_in[hook])
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
                forward = torch.compile(sae.training_forward) if t.compile_sae else None
                slots.append(
                    SAESlot(name, hook, sae, optimizer, scheduler, tracker, forward=forward)
                )
        return slots

    @torch.no_grad()
    def _init_slot(self, slot: SAESlot) -> None:
        """Input scale (expected_average_only_in) and b_dec from real activations.

        The scale averages every shard's estimate; b_dec comes from shard 0 and is broadcast,
        so all ranks start from the same SAE.
        """
        t = self.cfg.trainer
        if t.normalize_activations == "expected_average_only_in":
            local = sum(store.norm_scaling_factor(slot.hook) for store in self.stores)
            total = torch.tensor(local / len(self.stores), dtype=torch.float64, device=self.device)
            slot.scale = float(self.dist.average_(total))
        if t.b_dec_init_method != "zeros" and self.dist.is_main:
            sample = self.stores[0].sample(slot.hook, GEOMETRIC_MEDIAN_SAMPLES) * slot.scale
            center = sample.mean(0) if t.b_dec_init_method == "mean" else geometric_median(sample)
            slot.sae.b_dec.copy_(center.to(slot.sae.b_dec))
        self.dist.broadcast_(list(slot.sae.parameters()))

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict[str, dict[str, float]]:
        """Train to the token budget, evaluate, save; return the final eval metrics per SAE."""
        main = self.dist.is_main
        if main:
            self.run.write_config(self.cfg)
        run_id = self.checkpoints.latest_manifest().get("wandb_run_id")
        wandb_cfg = self.cfg.wandb if main else replace(self.cfg.wandb, wandb_mode="disabled")
        self.logger = WandbLogger(wandb_cfg, self.run.path, self.cfg.to_dict(), run_id)
        self._heartbeat("running")
        try:
            self.train_to_budget()
            metrics = self.finish()
        except TrainingStopped as exc:
            self._heartbeat("stopped")
            self.logger.finish(exc.exit_code)
            self.dist.close()  # every rank stops at the same step
            raise
        except BaseException:
            self._heartbeat("failed")
            self.logger.finish(1)
            raise
        finally:
            for store in self.stores:
                store.close()
        self._heartbeat("finished")
        self.logger.finish()
        self.dist.wait_for_main()  # rank 0's final evaluation and save, beyond NCCL's timeout
        self.dist.close()
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
        with self.stop:
            while self.tokens < t.training_tokens:
                acts = self._next_batch()
                coefficient = sparsity_coefficient(self.step, 1.0, t.l1_warm_up_steps)
                for slot in self.slots:
                    self._train_step(slot, acts[slot.hook], coefficient)
                self.step += 1
                self.tokens += self.batch_size
                window_tokens += self.batch_size
                bar.update(self.batch_size)
                if next_resample and self.tokens >= next_resample:
                    self._resample(acts)
                    next_resample += t.resample_every_tokens
                now = time.perf_counter()
                eval_due = bool(next_eval) and self.tokens >= next_eval
                checkpoint_due = (bool(next_checkpoint) and self.tokens >= next_checkpoint) or (
                    self.tokens >= t.training_tokens
                )
                log_due = self.step % t.log_every_steps == 0 or eval_due or checkpoint_due
                if not self.dist.enabled:
                    # One process can act on a signal or the clock at any step; several agree
                    # on them at logging steps only, where they synchronize anyway.
                    timer_due = (
                        checkpoint_seconds > 0 and now - last_checkpoint >= checkpoint_seconds
                    )
                    log_due = log_due or timer_due or self.stop.received is not None
                if log_due:
                    stopping, timer_due = self._agree(
                        self.stop.received is not None,
                        checkpoint_seconds > 0 and now - last_checkpoint >= checkpoint_seconds,
                    )
                    checkpoint_due = checkpoint_due or timer_due or stopping
                    self.elapsed += now - window_start
                    rows = self._log_rows(
                        window_tokens / max(now - window_start, 1e-9), coefficient
                    )
                    if eval_due:
                        self._add_eval(rows)
                        next_eval += cfg.eval.eval_every_tokens
                    if self.dist.is_main:
                        self.run.append_metrics(rows)
                        self.logger.log_rows(rows)
                        self._heartbeat("running")
                        bar.set_postfix(_postfix(rows[0]))
                    if eval_due:
                        self.dist.wait_for_main()  # rank 0 evaluated alone
                    if checkpoint_due:
                        self.save_checkpoint()
                        last_checkpoint = time.perf_counter()
                        if next_checkpoint:
                            next_checkpoint = self._next_multiple(
                                cfg.checkpoint.checkpoint_every_tokens
                            )
                    window_start, window_tokens = time.perf_counter(), 0
                    # A signal that arrives after this agreement (during logging, an eval or a
                    # save) stops the run at the next logging step, after its checkpoint.
                    if stopping:
                        bar.close()
                        signum = self.stop.received or signal.SIGTERM
                        raise TrainingStopped(
                            f"stopped by signal {signal.Signals(signum).name} at step "
                            f"{self.step} ({self.tokens:,} tokens); checkpoint saved. Resume "
                            f"with: drrik train --resume {self.run.path}",
                            signum,
                        )
        bar.close()

    def _next_multiple(self, every: int) -> int:
        return (self.tokens // every + 1) * every if every else 0

    def _agree(self, stopping: bool, timer_due: bool) -> tuple[bool, bool]:
        """Whether any rank was signalled, or rank 0's clock says a checkpoint is due."""
        flags = torch.tensor(
            [float(stopping), float(timer_due and self.dist.is_main)], device=self.device
        )
        stop, timer = self.dist.max_(flags).tolist()
        return stop > 0, timer > 0

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's share of the global batch: its shards' batches, in shard order."""
        batches = [store.next_batch().acts for store in self.stores]
        if len(batches) == 1:
            return batches[0]
        return {hook: torch.cat([b[hook] for b in batches]) for hook in self.hooks}

    def _train_step(self, slot: SAESlot, acts: torch.Tensor, coefficient: float) -> None:
        t, sae_cfg = self.cfg.trainer, slot.sae.cfg
        x = acts.to(slot.sae.W_dec.dtype) * slot.scale
        window = t.dead_feature_window
        dead = slot.tracker.dead_mask(window) if slot.idle_bound >= window else None
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if t.autocast
            else contextlib.nullcontext()
        )
        with autocast:
            out = slot.forward(x, coefficient * sae_cfg.l1_coefficient, dead)
        out.loss.backward()
        params = list(slot.sae.parameters())
        self.dist.average_gradients(params)
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        slot.sae.remove_parallel_decoder_grad()
        slot.optimizer.step()
        slot.optimizer.zero_grad(set_to_none=True)
        slot.sae.normalize_decoder_rows()
        slot.scheduler.step()
        with torch.no_grad():
            fired = out.fired()
            if self.dist.enabled:
                fired = self.dist.max_(fired.to(torch.uint8)).bool()
                for buffer in slot.sae.buffers():  # e.g. BatchTopK's learned threshold
                    if buffer.is_floating_point():
                        self.dist.average_(buffer)
        slot.tracker.record(fired, self.batch_size)
        slot.idle_bound += self.batch_size
        finite = torch.isfinite(out.loss)
        # Numbered as metrics rows. A fill, not torch.tensor(step): that copies from the host
        # and waits for the copy, once per SAE and step.
        step = torch.full((), self.step + 1, dtype=torch.long, device=finite.device)
        if slot.nonfinite_step is None:
            slot.nonfinite_step = torch.full_like(step, -1)
        first_bad = (~finite) & (slot.nonfinite_step < 0)
        slot.nonfinite_step = torch.where(first_bad, step, slot.nonfinite_step)
        slot.accumulate(
            {
                "loss": out.loss,
                **out.losses,
                "l0": out.l0(),
                "explained_variance": batch_explained_variance(x, out.x_hat),
                "steps": torch.ones((), device=finite.device),
            }
        )

    @torch.no_grad()
    def _resample(self, acts: dict[str, torch.Tensor]) -> None:
        """Resample on rank 0's inputs and give every rank the result."""
        for slot in self.slots:
            dead = slot.tracker.dead_mask(self.cfg.trainer.dead_feature_window)
            x = acts[slot.hook].to(slot.sae.W_dec.dtype) * slot.scale
            resample_dead_features(slot.sae, slot.optimizer, dead, x)
            slot.tracker.tokens_since_fired.masked_fill_(dead, 0)
            # Not Adam's ``step``: a host scalar (NCCL takes none), equal on every rank anyway.
            moments = [
                v
                for state in slot.optimizer.state.values()
                for k, v in state.items()
                if isinstance(v, torch.Tensor) and k != "step"
            ]
            self.dist.broadcast_(list(slot.sae.parameters()) + moments)

    def _log_rows(self, tokens_per_second: float, coefficient: float) -> list[dict[str, Any]]:
        """Fetch every slot's sums in one transfer (reduced over ranks), check, make rows."""
        window = self.cfg.trainer.dead_feature_window
        keys = [sorted(s.sums) for s in self.slots]
        sums = torch.stack(
            [s.sums[k] for s, names in zip(self.slots, keys, strict=True) for k in names]
        )
        flags = torch.stack(
            [
                v
                for s in self.slots
                for v in (
                    s.nonfinite_step.float(),
                    s.tracker.dead_mask(window).sum().float(),
                    s.tracker.tokens_since_fired.max().float(),
                )
            ]
        )
        sums = self.dist.average_(sums).tolist()
        flags = self.dist.max_(flags).tolist()
        rows = []
        for i, (slot, names) in enumerate(zip(self.slots, keys, strict=True)):
            values = dict(zip(names, sums[: len(names)], strict=True))
            sums = sums[len(names) :]
            bad_step, dead, idle = flags[3 * i : 3 * i + 3]
            slot.idle_bound = _at_least(idle)
            if bad_step >= 0:
                raise TrainingDiverged(
                    f"SAE {slot.name}: the loss became NaN or Inf at step {int(bad_step)}; "
                    "nothing was saved over earlier results. Lower --lr or the sparsity "
                    "coefficient, or keep --max-grad-norm on"
                )
            steps = values.pop("steps")
            rows.append(
                {
                    "step": self.step,
                    "tokens": self.tokens,
                    "tokens_per_second": tokens_per_second,  # global: counts every rank
                    "elapsed_s": self.elapsed,
                    "sae": slot.name,
                    "lr": slot.scheduler.get_last_lr()[0],
                    "sparsity_coefficient": coefficient * slot.sae.cfg.l1_coefficient,
                    "dead_features": int(dead),
                    **{k: v / steps for k, v in values.items()},
                }
            )
            slot.sums = {}
        return rows

    def _heartbeat(self, state: str) -> None:
        if self.dist.is_main:
            write_heartbeat(self.run.path, state)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Each rank writes its data shards' state; rank 0 gathers their names and checksums
        (never the buffers) and writes the rest of the checkpoint around them."""
        parts = [
            self.checkpoints.write_part(self.step, _store_part(shard), store.state_dict())
            for shard, store in zip(self.shards, self.stores, strict=True)
        ]
        gathered = self.dist.gather(parts)
        path = None
        if self.dist.is_main:
            assert gathered is not None
            every_part = [part for per_rank in gathered for part in per_rank]
            state = self.state_dict(stores={})
            state["store_parts"] = {shard: _store_part(shard) for shard in range(self.n_shards)}
            run_id = self.logger.run_id if self.logger is not None else None
            extra = {"wandb_run_id": run_id} if run_id else {}
            path = self.checkpoints.save(state, self.step, self.tokens, extra, every_part)
        self.dist.wait_for_main()  # rank 0 wrote alone
        return path

    def _store_states(self) -> dict[int, Any]:
        return {shard: s.state_dict() for shard, s in zip(self.shards, self.stores, strict=True)}

    def state_dict(self, stores: dict[int, Any] | None = None) -> dict[str, Any]:
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
            "stores": self._store_states() if stores is None else stores,
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; store parts written apart are read from the
        checkpoint the manager loaded last, this rank's shards only."""
        saved_shards = len(state.get("store_parts") or state["stores"])
        if saved_shards != self.n_shards:
            raise ConfigError(
                "data_shards",
                self.n_shards,
                f"the checkpoint holds {saved_shards} data shards; resume with "
                f"--data-shards {saved_shards} and a process count that divides it",
            )
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        for slot, saved in zip(self.slots, state["slots"], strict=True):
            require(slot.name == saved["name"], "resume", saved["name"], "SAE names differ")
            slot.sae.load_state_dict(saved["sae"])
            slot.optimizer.load_state_dict(saved["optimizer"])
            slot.scheduler.load_state_dict(saved["scheduler"])
            slot.tracker.load_state_dict(saved["tracker"])
            slot.idle_bound = _at_least(float(slot.tracker.tokens_since_fired.max()))
            slot.scale = saved["scale"]
        for shard, store in zip(self.shards, self.stores, strict=True):
            if "store_parts" in state:
                store.load_state_dict(self.checkpoints.load_part(state["store_parts"][shard]))
            else:
                store.load_state_dict(state["stores"][shard])
        set_rng_state(state["rng"])

    # -- evaluation and output (rank 0) ------------------------------------------------------
    def evaluate(self) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
        """Held-out metrics and feature densities of every SAE."""
        for slot in self.slots:
            slot.sae.eval()
        try:
            return evaluate(
                self.model,
                [slot.eval_target() for slot in self.slots],
                self.eval_contexts,
                self.stores[0].exclude,
                self.cfg.eval.dense_threshold,
            )
        finally:
            for slot in self.slots:
                slot.sae.train()

    def _add_eval(self, rows: list[dict[str, Any]]) -> None:
        if not self.dist.is_main:
            return
        self._heartbeat("running")  # an evaluation can outlast the stale limit
        metrics, densities = self.evaluate()
        for row in rows:
            row.update({f"eval/{k}": v for k, v in metrics[row["sae"]].items()})
            prefix = f"{row['sae']}/" if len(rows) > 1 else ""
            density = torch.log10(densities[row["sae"]] + 1e-10)
            self.logger.log_histogram(f"{prefix}eval/log10_feature_density", density, self.tokens)

    def final_dir(self, slot: SAESlot) -> Path:
        single = len(self.slots) == 1
        return self.run.final_path if single else self.run.final_path / slot.name

    def finish(self) -> dict[str, dict[str, float]]:
        """Final evaluation, then each SAE saved with its input scale folded in (rank 0)."""
        if not self.dist.is_main:
            return {}
        metrics, densities = self.evaluate()
        plots = self.run.path / "plots"
        images = {
            "training_curves": plot_training_curves(
                self.run.read_metrics(), plots / "training_curves.png"
            )
        }
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
            prefix = f"{slot.name}/" if len(self.slots) > 1 else ""
            self.logger.log_histogram(f"{prefix}log10_feature_density", sparsity, self.tokens)
            self.logger.log_artifact(path, f"sae-{slot.name or 'final'}".replace("=", "-"))
            images[f"{prefix}feature_density"] = plot_feature_density(
                densities[slot.name],
                plots / f"feature_density{'-' + slot.name if prefix else ''}.png",
                self.cfg.eval.dense_threshold,
            )
        self.logger.log_images(images, self.tokens)
        if self.verbose:
            print(format_metrics(metrics))
            print(f"saved to {self.run.final_path.resolve()}")
        return metrics


def _at_least(value: float) -> int:
    """An int no smaller than a count read back as float32 (which rounds above 2**24)."""
    return math.ceil(value * (1 + 2**-22)) + 1


def _store_part(shard: int) -> str:
    """The checkpoint file holding one data shard's stream position and mixing buffer."""
    return f"store-{shard:05d}.pt"


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    return {
        "loss": f"{row['loss']:.4g}",
        "L0": f"{row['l0']:.1f}",
        "EV": f"{row['explained_variance']:.3f}",
        "tok/s": f"{row['tokens_per_second']:.0f}",
    }


def train(cfg: RunConfig, **kwargs: Any) -> dict[str, dict[str, float]]:
    """Train the SAE(s) described by ``cfg``; see :class:`Trainer` for the keyword arguments."""
    return Trainer(cfg, **kwargs).fit()
