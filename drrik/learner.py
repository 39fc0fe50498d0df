"""One dictionary in training: its parameters, optimizer, schedules, metric sums and state.

The trainer owns the loop and the clock; a :class:`Learner` owns everything that belongs to a
single dictionary: its step (forward, backward, gradient average across ranks, clipping,
decoder constraint, optimizer and scheduler), its dead-feature tracking and resampling, the
metric sums kept on device between logging steps, and its part of a checkpoint. Nothing here
reads a value back to the host except :meth:`Learner.check_and_average`, at logging steps.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from drrik.config import TrainerConfig
from drrik.distributed import Distributed
from drrik.errors import require
from drrik.evaluate import EvalTarget
from drrik.geometric_median import geometric_median
from drrik.l0_control import L0Controller
from drrik.sae import SAE, DeadFeatureTracker, build_sae, resample_dead_features
from drrik.sae.feature_shards import FeatureShards, reshard
from drrik.sae.spec import DictionarySpec
from drrik.schedules import build_lr_scheduler

GEOMETRIC_MEDIAN_SAMPLES = 8192


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stops before anything is saved."""


def batch_explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """1 - ||x - x_hat||^2 / ||x - mean(x)||^2 over a batch, as a device scalar."""
    residual = (x - x_hat.to(x.dtype)).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return 1.0 - residual / total


def at_least(value: float) -> int:
    """An int no smaller than a count read back as float32 (which rounds above 2**24)."""
    return math.ceil(value * (1 + 2**-22)) + 1


@dataclass
class Learner:
    """A dictionary with its optimizer, LR schedule, dead-feature tracker and metric sums."""

    spec: DictionarySpec
    sae: SAE
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tracker: DeadFeatureTracker
    cfg: TrainerConfig
    scale: float | torch.Tensor = 1.0
    """Input scale (expected_average_only_in), folded into the dictionary at export; over
    several hooks, each hook's own, as one ``[d_in]`` tensor."""
    target_scale: float | torch.Tensor = 1.0
    """The target hooks' own scale (a transcoder's; ``[d_out]`` over several hooks); equal to
    ``scale`` for an SAE."""
    forward: Any = None
    """``sae.fit_forward``, compiled with ``--compile-sae``."""
    controller: L0Controller | None = None
    """Steers the sparsity coefficient to ``target_l0`` (penalty-based architectures)."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    nonfinite_step: torch.Tensor | None = None
    """First step with a NaN/Inf loss, -1 if none (on device)."""
    idle_bound: int = 0
    """Host-side upper bound on the tokens since any feature fired: below the dead-feature
    window no feature can be dead, so the step skips the dead-feature losses without asking
    the device (on a GPU, asking would synchronize every step)."""

    @classmethod
    def build(
        cls,
        spec: DictionarySpec,
        cfg: TrainerConfig,
        total_steps: int,
        device: torch.device,
        features: FeatureShards | None = None,
    ) -> Learner:
        """A fresh dictionary for ``spec`` (its ``d_in`` filled); seed torch first. With
        ``features``, this rank's slice of it: the slice of the dictionary one process would
        start from (built whole on the host, once)."""
        if features is None:
            sae = build_sae(spec.sae, device=device).train()
        else:
            sae = _slice_of(build_sae(spec.sae, device="cpu"), features).to(device).train()
        groups = [
            {"params": g["params"], "lr": cfg.lr * g.get("lr_scale", 1.0)}
            for g in sae.optimizer_groups()
        ]
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        target_l0 = spec.sae.target_l0
        controlled = target_l0 is not None and not sae.needs_k  # topk's k is the target
        return cls(
            spec,
            sae,
            optimizer,
            build_lr_scheduler(optimizer, cfg, total_steps),
            DeadFeatureTracker(sae.d_sae, device=device),
            cfg,
            forward=torch.compile(sae.fit_forward) if cfg.compile_sae else None,
            controller=(
                L0Controller(target_l0 * spec.sae.l0_units(), spec.sae.l1_coefficient, device)
                if controlled
                else None
            ),
        )

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.sae.fit_forward

    @property
    def name(self) -> str:
        return self.spec.name

    def _joined(self, acts: dict[str, torch.Tensor], hooks: tuple[str, ...]) -> torch.Tensor:
        """``hooks``' activations side by side (one hook's as they are), in the SAE's dtype."""
        dtype = self.sae.b_dec.dtype
        if len(hooks) == 1:
            return acts[hooks[0]].to(dtype)
        return torch.cat([acts[h].to(dtype) for h in hooks], dim=-1)

    def _inputs(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The input hooks' activations as the encoder sees them."""
        return self._joined(acts, self.spec.reads) * self.scale

    def _targets(self, acts: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The target hooks' activations as the decoder learns them; ``None`` for an SAE (and a
        crosscoder), which reconstructs its input."""
        if self.spec.same_hook:
            return None
        return self._joined(acts, self.spec.writes) * self.target_scale

    def _scale_of(self, hook: str, stores: list[Any], dist: Distributed) -> float:
        """The mean of every shard's scale estimate for ``hook``."""
        local = sum(store.norm_scaling_factor(hook) for store in stores) / len(stores)
        total = torch.tensor(local, dtype=torch.float64, device=self.sae.b_dec.device)
        return float(dist.average_(total))

    def _scales_of(
        self, hooks: tuple[str, ...], stores: list[Any], dist: Distributed
    ) -> float | torch.Tensor:
        """One hook's scale; over several, each hook's repeated over its width: the layers of
        a crosscoder or CLT differ in norm by up to 10x, and one scale would leave the
        early layers almost out of the loss."""
        scales = [self._scale_of(h, stores, dist) for h in hooks]
        if len(hooks) == 1:
            return scales[0]
        widths = [stores[0].d_in[h] for h in hooks]
        parts = [
            torch.full((w,), s, dtype=torch.float32) for w, s in zip(widths, scales, strict=True)
        ]
        return torch.cat(parts).to(self.sae.b_dec.device)

    @torch.no_grad()
    def initialize(self, stores: list[Any], dist: Distributed) -> None:
        """Input and target scales, b_dec and (with ``target_l0``) the architecture's start near
        it (:meth:`SAE.start_near_l0`) from real activations of every local store.

        Each scale averages every shard's estimate; b_dec (the output's bias, so a
        transcoder's comes from its target hook) comes from shard 0 and is broadcast, so all
        ranks start from the same dictionary.
        """
        if self.cfg.normalize_activations == "expected_average_only_in":
            self.scale = self._scales_of(self.spec.reads, stores, dist)
            self.target_scale = (
                self.scale
                if self.spec.same_hook
                else self._scales_of(self.spec.writes, stores, dist)
            )
        if self.cfg.b_dec_init_method != "zeros" and dist.is_main:
            sample = self._sample(stores[0], self.spec.writes) * self.target_scale
            mean = self.cfg.b_dec_init_method == "mean"
            center = sample.mean(0) if mean else geometric_median(sample)
            self.sae.b_dec.copy_(center.to(self.sae.b_dec))
        target_l0 = self.spec.sae.target_l0
        sliced = self.sae.features is not None
        if sliced:  # every slice starts as the whole dictionary would: b_dec from rank 0
            dist.broadcast_(self._split()[1])
        # After b_dec, which the encoder subtracts; every slice reads rank 0's sample.
        if target_l0 is not None and (dist.is_main or sliced):
            sample = self._sample(stores[0], self.spec.reads) if dist.is_main else None
            if sliced:
                shared = dist.from_main(None if sample is None else sample.cpu())
                sample = shared.to(self.sae.b_dec.device)
            self.sae.start_near_l0((sample * self.scale).to(self.sae.b_dec.dtype), target_l0)
        if not sliced:
            dist.broadcast_(list(self.sae.parameters()))

    @staticmethod
    def _sample(store: Any, hooks: tuple[str, ...]) -> torch.Tensor:
        """The same buffer rows of every hook in ``hooks``, side by side."""
        return torch.cat([store.sample(h, GEOMETRIC_MEDIAN_SAMPLES) for h in hooks], dim=-1)

    def step(
        self,
        acts: dict[str, torch.Tensor],
        sparsity_warm_up: float,
        step: int,
        batch_size: int,
        dist: Distributed,
    ) -> None:
        """One optimizer step on this rank's batch; ``sparsity_warm_up`` scales the sparsity
        coefficient (0 to 1 during the L1 warm-up), ``batch_size`` counts every rank.

        With a controller, the coefficient is its live value, and the batch's L0 (averaged
        over ranks, so every rank holds the same coefficient) moves it once the warm-up is
        over: during the warm-up the L0 is high because the penalty is scaled down, and
        reacting to that would wind the coefficient up.
        """
        x = self._inputs(acts)
        window = self.cfg.dead_feature_window
        dead = self.tracker.dead_mask(window) if self.idle_bound >= window else None
        device_type = x.device.type
        autocast = (
            torch.autocast(device_type, dtype=torch.bfloat16)
            if self.cfg.autocast
            else contextlib.nullcontext()
        )
        target = self._targets(acts)
        coefficient = (
            self.sae.cfg.l1_coefficient if self.controller is None else self.controller.coefficient
        )
        with autocast:
            out = self.forward(x, sparsity_warm_up * coefficient, dead, target)
        out.loss.backward()
        params = list(self.sae.parameters())
        dist.average_gradients(params)
        if self.cfg.max_grad_norm > 0:
            features = self.sae.features
            if features is None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            else:
                features.clip_grad_norm_(*self._split(), self.cfg.max_grad_norm)
        self.sae.remove_parallel_decoder_grad()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sae.normalize_decoder_rows()
        self.scheduler.step()
        with torch.no_grad():
            fired = out.fired()  # this rank's slice of the features
            if dist.enabled:
                fired = dist.max_(fired.to(torch.uint8), data=True).bool()
                for buffer in self.sae.buffers():  # e.g. BatchTopK's learned threshold
                    if buffer.is_floating_point():
                        dist.average_(buffer, data=True)
            l0 = out.l0()
            if self.sae.features is not None:
                l0 = self.sae.features.sum_(l0.clone())
            if self.controller is not None and sparsity_warm_up >= 1:
                self.controller.update(dist.average_(l0.clone()))
        self.tracker.record(fired, batch_size)
        self.idle_bound += batch_size
        finite = torch.isfinite(out.loss)
        # Numbered as metrics rows. A fill, not torch.tensor(step): that copies from the host
        # and waits for the copy, once per dictionary and step.
        number = torch.full((), step, dtype=torch.long, device=finite.device)
        if self.nonfinite_step is None:
            self.nonfinite_step = torch.full_like(number, -1)
        first_bad = (~finite) & (self.nonfinite_step < 0)
        self.nonfinite_step = torch.where(first_bad, number, self.nonfinite_step)
        self._accumulate(
            {
                "loss": out.loss,
                **out.losses,
                "l0": l0,
                "explained_variance": batch_explained_variance(
                    x if target is None else target, out.x_hat
                ),
                "steps": torch.ones((), device=finite.device),
            }
        )

    def _accumulate(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    @torch.no_grad()
    def resample(self, acts: dict[str, torch.Tensor], dist: Distributed) -> None:
        """Resample dead features on this rank's inputs and give every rank rank 0's result."""
        dead = self.tracker.dead_mask(self.cfg.dead_feature_window)
        resample_dead_features(
            self.sae, self.optimizer, dead, self._inputs(acts), self._targets(acts)
        )
        self.tracker.tokens_since_fired.masked_fill_(dead, 0)
        # Not Adam's ``step``: a host scalar (NCCL takes none), equal on every rank anyway.
        moments = [
            v
            for state in self.optimizer.state.values()
            for k, v in state.items()
            if isinstance(v, torch.Tensor) and k != "step"
        ]
        # The ranks that hold the same slice agree; each slice resamples its own features.
        dist.broadcast_(list(self.sae.parameters()) + moments, data=True)

    # -- logging -----------------------------------------------------------------------------
    def pending(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(metric names, their sums, [first bad step, dead count, max idle]) on device, for
        the trainer to fetch every learner's in one transfer."""
        names = sorted(self.sums)
        values = [self.sums[k] for k in names]
        if self.controller is not None:  # the live value, fetched with the sums
            names.append("sparsity_coefficient")
            values.append(self.controller.coefficient)
        window = self.cfg.dead_feature_window
        assert self.nonfinite_step is not None, "pending() before the first step"
        dead = self.tracker.dead_mask(window).sum().float()
        if self.sae.features is not None:  # every slice's dead features
            self.sae.features.sum_(dead)
        flags = torch.stack(
            [self.nonfinite_step.float(), dead, self.tracker.tokens_since_fired.max().float()]
        )
        return names, torch.stack(values), flags

    def row(
        self, names: list[str], sums: list[float], flags: list[float], sparsity_warm_up: float
    ) -> dict[str, Any]:
        """This learner's metrics row from fetched sums; raises if the loss diverged."""
        bad_step, dead, idle = flags
        self.idle_bound = at_least(idle)
        if bad_step >= 0:
            raise TrainingDiverged(
                f"SAE {self.name}: the loss became NaN or Inf at step {int(bad_step)}; nothing "
                "was saved over earlier results. Lower --lr or the sparsity coefficient, or "
                "keep --max-grad-norm on"
            )
        values = dict(zip(names, sums, strict=True))
        steps = values.pop("steps")
        coefficient = values.pop("sparsity_coefficient", self.sae.cfg.l1_coefficient)
        self.sums = {}
        return {
            "sae": self.name,
            "lr": self.scheduler.get_last_lr()[0],
            "sparsity_coefficient": sparsity_warm_up * coefficient,
            "dead_features": int(dead),
            **{k: v / steps for k, v in values.items()},
        }

    def eval_target(self, sae: SAE | None = None) -> EvalTarget:
        """What the evaluator splices in: this dictionary, or ``sae`` (its whole, gathered)."""
        return EvalTarget(
            self.name,
            self.spec.input_hook,
            self.sae if sae is None else sae,
            self.scale,
            self.spec.target_hook,
            self.target_scale,
            self.spec.reads,
            self.spec.writes,
        )

    # -- feature slices ----------------------------------------------------------------------
    def _split(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(the parameters cut into feature slices, the ones whole on every rank)."""
        sliced = {id(param) for param, _ in self.sae.feature_params()}
        params = list(self.sae.parameters())
        return [p for p in params if id(p) in sliced], [p for p in params if id(p) not in sliced]

    def whole_sae(self) -> SAE | None:
        """The whole dictionary, gathered from its slices onto rank 0 of its feature group
        (``None`` on the others); itself without slices. Every rank of the group calls it."""
        features = self.sae.features
        if features is None:
            return self.sae
        axes = _feature_axes(self.sae)
        state = {}
        for name, tensor in self.sae.state_dict().items():
            state[name] = (
                tensor if name not in axes else features.gather_to_first(tensor, axes[name])
            )
        if features.index != 0:
            return None
        with torch.random.fork_rng(devices=[]):  # its random start is overwritten
            whole = build_sae(self.spec.sae, device=self.sae.b_dec.device)
        whole.load_state_dict(state)
        return whole.train(self.sae.training)

    def gather_whole(self) -> None:
        """After training: hold the whole dictionary on rank 0 (for evaluation and export)."""
        whole = self.whole_sae()
        if whole is not None:
            self.sae = whole

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tracker": self.tracker.state_dict(),
            "scale": self.scale,
            "target_scale": self.target_scale,
            **({} if self.controller is None else {"controller": self.controller.state_dict()}),
        }

    def resliced(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """This rank's state from a checkpoint's ``parts`` (slices in order, or one whole
        state): any slice count resumes on any other that divides the width."""
        features = self.sae.features
        index, count = (0, 1) if features is None else (features.index, features.count)
        if len(parts) == 1 and count == 1:
            return parts[0]
        axes = _feature_axes(self.sae)

        def cut(axis: int | None, pick: Any) -> Any:
            return reshard([pick(part) for part in parts], axis, index, count)

        saved = dict(parts[0])
        saved["sae"] = {k: cut(axes.get(k), lambda p, k=k: p["sae"][k]) for k in parts[0]["sae"]}
        names = {id(p): n for n, p in self.sae.named_parameters()}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        optimizer = parts[0]["optimizer"]
        state = {}
        for i, per_param in optimizer["state"].items():
            axis = axes.get(names[id(params[i])])
            state[i] = {
                k: cut(axis, lambda p, i=i, k=k: p["optimizer"]["state"][i][k])
                if isinstance(v, torch.Tensor) and v.dim() > 0
                else v
                for k, v in per_param.items()
            }
        saved["optimizer"] = {**optimizer, "state": state}
        saved["tracker"] = {
            "tokens_since_fired": cut(0, lambda p: p["tracker"]["tokens_since_fired"])
        }
        return saved

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        require(
            self.name == saved["name"],
            "resume",
            saved["name"],
            f"the checkpoint holds another SAE than {self.name!r}; resume with the run's config",
        )
        self.sae.load_state_dict(saved["sae"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.tracker.load_state_dict(saved["tracker"])
        self.idle_bound = at_least(float(self.tracker.tokens_since_fired.max()))
        self.scale = saved["scale"]
        self.target_scale = saved.get("target_scale", self.scale)  # SAE checkpoints lack it
        if self.controller is not None:
            self.controller.load_state_dict(saved["controller"])


def _feature_axes(sae: SAE) -> dict[str, int]:
    """Per-feature axis of ``sae``'s sliced tensors, by state-dict name."""
    names = {id(p): n for n, p in sae.named_parameters()}
    return {names[id(param)]: axis for param, axis in sae.feature_params()}


def _slice_of(whole: SAE, features: FeatureShards) -> SAE:
    """This rank's slice of ``whole``: a dictionary of ``d_sae / count`` features whose
    forward pass joins the slices (``features``)."""
    cfg = whole.cfg
    per_rank = whole.d_sae // features.count
    local_cfg = replace(cfg, d_sae=per_rank, expansion_factor=None, aux_k=cfg.resolved_aux_k())
    with torch.random.fork_rng(devices=[]):  # its random start is overwritten
        part = build_sae(local_cfg, device="cpu")
    axes = _feature_axes(whole)
    index, count = features.index, features.count
    part.load_state_dict(
        {
            name: reshard([tensor], axes.get(name), index, count)
            for name, tensor in whole.state_dict().items()
        }
    )
    part.features = features
    return part
