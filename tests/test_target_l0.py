"""``--target-l0`` (issue 14): every architecture trains to a chosen L0.

topk/batchtopk take k = target_l0; relu, gated and jumprelu steer their sparsity coefficient
with a controller on the measured L0. One run on the tiny model trains all five from one
stream (a sweep over the architecture); a second, stopped by a signal midway and resumed,
must end with the same bits. Runs are in-process, a few seconds each.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from standins import CheckedDistributed, HostTensors

from drrik.assemble import assemble
from drrik.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    StoreConfig,
    TrainerConfig,
)
from drrik.distributed import Distributed
from drrik.errors import ConfigError
from drrik.geometric_median import geometric_median
from drrik.learner import Learner
from drrik.pipeline import open_logger, train_run
from drrik.run_dir import RunDir
from drrik.sae import SAEConfig
from drrik.sae.spec import DictionarySpec
from drrik.trainer import Trainer, TrainingStopped

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
BATCH = 64
STEPS = 200
TARGET = 8
ARCHITECTURES = ("relu", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk")
CONTROLLED = ("relu", "gated", "jumprelu")
JUMPRELU_BANDWIDTH = 0.05
TOLERANCE = 0.25
"""Relative distance of the held-out L0 from the target a 200-step run of 64-token batches
meets with a controller (the issue's standard on the real model is 10%)."""
TOLERANCES = {"topk": 0.0, "batchtopk": 0.1, "matryoshka_batchtopk": 0.1}
"""topk is exact; batchtopk's inference threshold must keep k features per held-out token on
average, as its training batches do (a lagging threshold kept 21% fewer here)."""


def target_config(out: Path, model_dir: Path, **trainer: Any) -> RunConfig:
    """Every architecture at target_l0=8 from one stream, 160 steps of 64 tokens."""
    return RunConfig(
        model=ModelConfig(model=str(model_dir), hook=[HOOK]),
        data=DataConfig(context_size=16),
        store=StoreConfig(
            train_batch_size_tokens=BATCH, n_batches_in_buffer=4, store_batch_size_prompts=8
        ),
        sae=SAEConfig(
            target_l0=TARGET,
            expansion_factor=2,
            jumprelu_bandwidth=JUMPRELU_BANDWIDTH,
        ),
        trainer=TrainerConfig(
            **{
                "training_tokens": BATCH * STEPS,
                "log_every_steps": 10,
                "sweep": [f"architecture={','.join(ARCHITECTURES)}"],
                **trainer,
            }
        ),
        eval=EvalConfig(eval_contexts=16, eval_batch_size_prompts=8),
        checkpoint=CheckpointConfig(checkpoint_every_minutes=0),
        out=str(out),
    )


def name(architecture: str) -> str:
    return f"architecture={architecture}"


@dataclass
class Trained:
    out: Path
    cfg: RunConfig
    metrics: dict[str, dict[str, float]]


@pytest.fixture(scope="module")
def trained(
    tiny_model: Any, tiny_model_dir: Path, docs: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    out = tmp_path_factory.mktemp("target-l0") / "run"
    cfg = target_config(out, tiny_model_dir)
    metrics = train_run(assemble(cfg, model=tiny_model, dataset=docs, verbose=False))
    return Trained(out, cfg, metrics)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_ends_near_its_target_l0(trained: Trained, architecture: str) -> None:
    """From the defaults otherwise: JumpReLU's thresholds start at 0.001, where about half the
    features fire, unless target_l0 starts them from the data."""
    held_out = trained.metrics[name(architecture)]["l0"]
    assert held_out == pytest.approx(TARGET, rel=TOLERANCES.get(architecture, TOLERANCE))


class SampleStore:
    """A store stand-in whose buffer holds ``x``."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def sample(self, hook: str, n: int) -> torch.Tensor:
        return self.x[:n]

    def norm_scaling_factor(self, hook: str) -> float:
        return 1.0


@pytest.mark.parametrize("architecture", ["jumprelu", "gated"])
@pytest.mark.parametrize("target", [2, 8])
def test_features_start_firing_on_about_the_target(architecture: str, target: int) -> None:
    """With a target, each feature starts firing on target / d_sae of the tokens: jumprelu's
    threshold at that quantile of its pre-activations (after b_dec is set), gated's gate bias
    shifted by it. Without one, jumprelu's thresholds start at the config's and about half of
    the random start's features fire."""
    torch.manual_seed(0)
    x = torch.randn(4096, 16) * 3 + 1
    for target_l0 in (target, None):
        cfg = SAEConfig(architecture=architecture, d_in=16, d_sae=64, target_l0=target_l0)
        learner = Learner.build(
            DictionarySpec("s", (HOOK,), (HOOK,), cfg), TrainerConfig(), 4, torch.device("cpu")
        )
        learner.initialize([SampleStore(x)], Distributed())
        sae = learner.sae
        assert torch.equal(sae.b_dec, geometric_median(x))
        fires = (sae.encode(x) > 0).float()
        if target_l0 is None:
            if architecture == "jumprelu":
                torch.testing.assert_close(sae.threshold, torch.full((64,), 0.001))
            assert fires.sum(1).mean() > 16
            continue
        assert fires.sum(1).mean() == pytest.approx(target, rel=0.02)
        assert torch.allclose(fires.mean(0), torch.full((64,), target / 64), atol=2 / 4096)


def test_jumprelu_thresholds_learn_faster_under_a_target() -> None:
    """The L0 penalty moves only the thresholds, so with a target they get a multiple of the
    learning rate (a group of their own); the rest, and every parameter without a target,
    learn at the run's rate."""
    for target_l0, threshold_lr in ((4, 0.03), (None, 0.001)):
        cfg = SAEConfig(architecture="jumprelu", d_in=16, d_sae=64, target_l0=target_l0)
        spec = DictionarySpec("s", (HOOK,), (HOOK,), cfg)
        learner = Learner.build(spec, TrainerConfig(lr=0.001), 4, torch.device("cpu"))
        lrs = {
            id(p): group["lr"] for group in learner.optimizer.param_groups for p in group["params"]
        }
        assert len(lrs) == len(list(learner.sae.parameters()))
        assert lrs.pop(id(learner.sae.log_threshold)) == pytest.approx(threshold_lr)
        assert set(lrs.values()) == {0.001}


def test_the_live_coefficient_is_logged_and_moves(trained: Trained) -> None:
    rows = RunDir(trained.out).read_metrics()
    for architecture in CONTROLLED:
        coefficients = [r["sparsity_coefficient"] for r in rows if r["sae"] == name(architecture)]
        assert len(coefficients) == STEPS // 10
        assert len(set(coefficients)) == len(coefficients), f"{architecture}: it moves each row"
        assert coefficients[0] != pytest.approx(SAEConfig().l1_coefficient, rel=0.05)


def test_a_resume_with_the_controller_on_is_bit_exact(
    trained: Trained,
    tiny_model: Any,
    tiny_model_dir: Path,
    docs: Dataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped by a signal at step 70 (a checkpoint), resumed: the same weights and the same
    metrics rows as the run never stopped, so the controller's state was saved whole."""
    cfg = replace(trained.cfg, out=str(tmp_path / "run"))
    run = assemble(cfg, model=tiny_model, dataset=docs, verbose=False)
    trainer = Trainer(run, open_logger(run))
    step = Learner.step

    def signalled(self: Learner, acts: Any, warm_up: float, at: int, *rest: Any) -> None:
        step(self, acts, warm_up, at, *rest)
        if at == 70:
            trainer.stop.received = signal.SIGTERM

    with monkeypatch.context() as patch:
        patch.setattr(Learner, "step", signalled)
        with pytest.raises(TrainingStopped, match="at step 70 "):
            trainer.train()
    trainer.logger.finish()
    run.close()
    train_run(assemble(cfg, model=tiny_model, dataset=docs, verbose=False))

    rows = RunDir(tmp_path / "run").read_metrics()
    want = RunDir(trained.out).read_metrics()
    keep = ("sae", "step", "loss", "l0", "sparsity_coefficient")
    assert [{k: r[k] for k in keep} for r in rows] == [{k: r[k] for k in keep} for r in want]
    for architecture in ARCHITECTURES:
        got = load_file(
            str(tmp_path / "run" / "final" / name(architecture) / "sae_weights.safetensors")
        )
        ref = load_file(str(trained.out / "final" / name(architecture) / "sae_weights.safetensors"))
        assert all(torch.equal(got[k], ref[k]) for k in ref), architecture


def test_the_controller_stays_on_device_and_agrees_across_ranks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each step's L0 is averaged over ranks (so every rank holds the same coefficient) on the
    training device, and the update makes no tensor from Python data (a copy that waits)."""
    dist, host = CheckedDistributed(), HostTensors()
    dist.install(monkeypatch)
    torch.manual_seed(0)
    cfg = SAEConfig(architecture="relu", d_in=16, d_sae=32, target_l0=2)
    spec = DictionarySpec("s", (HOOK,), (HOOK,), cfg)
    learner = Learner.build(spec, TrainerConfig(), 4, torch.device("cpu"))
    assert learner.controller is not None
    with host:
        for step in range(1, 5):
            learner.step({HOOK: torch.randn(32, 16)}, 1.0, step, 64, dist)
    assert [made for made in host.from_python if made.startswith("drrik")] == []
    assert dist.calls.count("all_reduce") == 4 * 3, "gradients, fired features, L0: per step"
    assert float(learner.controller.coefficient) > cfg.l1_coefficient, "L0 is above 2"


def test_a_given_l1_coefficient_is_the_controllers_start_and_says_so(
    tiny_model: Any,
    tiny_model_dir: Path,
    docs: Dataset,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = target_config(tmp_path / "run", tiny_model_dir, sweep=["architecture=relu,topk"])
    cfg = replace(cfg, sae=replace(cfg.sae, l1_coefficient=0.5))
    with caplog.at_level("INFO", logger="drrik"):
        run = assemble(cfg, model=tiny_model, dataset=docs)
    run.close()
    lines = [r.message for r in caplog.records if "starting from l1_coefficient" in r.message]
    assert lines == [
        "architecture=relu: target_l0=8 adapts the sparsity coefficient, starting from "
        "l1_coefficient=0.5"
    ]
    relu = run.learners[0].controller
    assert relu is not None and float(relu.coefficient) == pytest.approx(0.5)
    assert run.learners[1].controller is None, "topk's k is the target"


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"target_l0": 0}, "target_l0", "positive"),
        ({"target_l0": -3}, "target_l0", "positive"),
        ({"target_l0": 32, "d_sae": 16}, "target_l0", "d_sae (16)"),
        ({"target_l0": 80, "d_in": 64}, "target_l0", "d_in (64)"),
        ({"target_l0": 80, "d_in": 64, "d_sae": 100}, "target_l0", "d_in (64)"),
        ({"target_l0": 8, "architecture": "topk", "k": 8}, "target_l0", "k=8"),
        ({"target_l0": 8, "architecture": "batchtopk", "k": 4}, "target_l0", "k=4"),
        (
            {"target_l0": 8, "architecture": "relu", "l1_coefficient": 0.0},
            "l1_coefficient",
            "starting",
        ),
    ],
)
def test_bad_target_l0_is_one_line_naming_it(kwargs: dict, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        SAEConfig(**kwargs)
    message = str(err.value)
    assert err.value.field == field and message.startswith(f"{field}={kwargs[field]!r}")
    assert words in message and "\n" not in message


def test_a_target_above_the_hook_width_is_refused_when_the_width_is_known() -> None:
    """d_in comes from the model's hook: checked when the SAE is sized, before it is built."""
    cfg = SAEConfig(architecture="topk", target_l0=100, expansion_factor=4)
    with pytest.raises(ConfigError, match=r"^target_l0=100: use target_l0 <= d_in \(64\)$"):
        replace(cfg, d_in=64).check_buildable()


def test_a_target_l0_sweep_builds_one_dictionary_per_value() -> None:
    for architecture in ("topk", "relu"):
        cfg = RunConfig(
            sae=SAEConfig(architecture=architecture, target_l0=4),
            trainer=TrainerConfig(sweep=["target_l0=16,32,64"]),
        )
        specs = cfg.dictionaries()
        assert [s.name for s in specs] == ["target_l0=16", "target_l0=32", "target_l0=64"]
        assert [s.sae.target_l0 for s in specs] == [16, 32, 64]
        if architecture == "topk":
            assert [s.sae.resolved_k() for s in specs] == [16, 32, 64]
    with pytest.raises(ConfigError, match="^target_l0=16: it sets topk's k, and k=8"):
        RunConfig(
            sae=SAEConfig(architecture="topk", k=8), trainer=TrainerConfig(sweep=["target_l0=16"])
        )


def test_a_target_above_the_hook_width_is_refused_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model's config.json gives its residual width (64): a target of 100 is refused
    without loading the model, and nothing is written."""

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model loaded before the width check")

    monkeypatch.setattr("drrik.assemble.load_model", no_load)
    cfg = target_config(tmp_path / "out", tiny_model_dir)
    cfg.sae = replace(cfg.sae, target_l0=100)
    with pytest.raises(ConfigError, match=r"^target_l0=100: use target_l0 <= d_in \(64\)$"):
        assemble(cfg, verbose=False)
    assert not (tmp_path / "out").exists()
