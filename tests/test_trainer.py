"""End-to-end training on the tiny model (issue 3).

A run must learn, be reproducible from its seed, leave a complete run directory whose saved
SAE reproduces the trainer's SAE on raw activations, train several SAEs from one stream, and
stop with a clear message (saving nothing more) when the loss diverges. Runs are in-process on
the session's tiny model with an in-memory dataset: a second or two each.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file

import drrik
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
from drrik.errors import ConfigError
from drrik.evaluate import EvalTarget
from drrik.learner import Learner, TrainingDiverged
from drrik.model import native_bfloat16
from drrik.pipeline import train, train_run
from drrik.run import Run
from drrik.run_dir import RunDir
from drrik.sae import SAEConfig, TopKSAE, build_sae

HOOK = "blocks.1.hook_resid_post"
HOOK2 = "blocks.2.hook_resid_post"
BATCH = 64
STEPS = 40
EVAL_STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine, spinning OpenMP workers of several
    processes slow each other down far more than one thread costs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_config(out: Path, model_dir: Path, **sections: dict[str, Any]) -> RunConfig:
    """A small topk run (40 steps of 64 tokens); ``sections`` override fields per section."""
    s = {name: dict(values) for name, values in sections.items()}
    return RunConfig(
        model=ModelConfig(**{"model": str(model_dir), "hook": HOOK, **s.pop("model", {})}),
        data=DataConfig(**{"context_size": 16, **s.pop("data", {})}),
        store=StoreConfig(
            **{
                "train_batch_size_tokens": BATCH,
                "n_batches_in_buffer": 4,
                "store_batch_size_prompts": 8,
                **s.pop("store", {}),
            }
        ),
        sae=SAEConfig(
            **{"architecture": "topk", "k": 8, "expansion_factor": 2, **s.pop("sae", {})}
        ),
        trainer=TrainerConfig(
            **{"training_tokens": BATCH * STEPS, "log_every_steps": 2, **s.pop("trainer", {})}
        ),
        eval=EvalConfig(**{"eval_contexts": 8, "eval_batch_size_prompts": 8, **s.pop("eval", {})}),
        checkpoint=CheckpointConfig(**{"checkpoint_every_minutes": 0, **s.pop("checkpoint", {})}),
        out=str(out),
    )


def fit(cfg: RunConfig, model: Any, dataset: Dataset | None) -> tuple[Run, dict[str, Any]]:
    run = assemble(cfg, model=model, dataset=dataset, verbose=False)
    return run, train_run(run)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "sae_weights.safetensors"))


@dataclass
class Trained:
    """The module's main run: a trainer after ``fit``, its config and its final metrics."""

    run: Run
    cfg: RunConfig
    metrics: dict[str, float]
    out: Path


@pytest.fixture(scope="module")
def trained(
    tiny_model: Any, tiny_model_dir: Path, docs: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = run_config(out, tiny_model_dir, eval={"eval_every_tokens": BATCH * EVAL_STEPS})
    trainer, metrics = fit(cfg, tiny_model, docs)
    return Trained(trainer, cfg, metrics[HOOK], out)


def test_training_learns(trained: Trained) -> None:
    rows = RunDir(trained.out).read_metrics()
    first, last = rows[0], rows[-1]
    assert (first["step"], last["step"]) == (2, STEPS)
    assert last["explained_variance"] > first["explained_variance"] + 0.15
    assert last["loss"] < 0.8 * first["loss"]
    assert all(r["l0"] == 8 for r in rows), "topk fires exactly k features per token"

    # An untrained SAE from the same seed, evaluated on the same held-out contexts.
    run = trained.run
    assert run.evaluator is not None
    torch.manual_seed(trained.cfg.trainer.seed)
    untrained = build_sae(run.learners[0].sae.cfg)
    scale = run.learners[0].scale
    before, _ = run.evaluator([EvalTarget("untrained", HOOK, untrained, scale)])
    after = trained.metrics
    assert after["explained_variance"] > 0.35
    assert after["explained_variance"] > before["untrained"]["explained_variance"] + 0.3
    assert after["kl_div_with_sae"] < before["untrained"]["kl_div_with_sae"]


def test_a_run_computes_its_evaluation_baselines_once(
    tiny_model: Any, tiny_model_dir: Path, docs: Dataset, tmp_path: Path
) -> None:
    """Two periodic evaluations and the final one: the clean and zero-ablated passes run at the
    first only, the SAE's spliced pass at each. Training stops after its hook, so only
    evaluation reaches the last block, whose calls count the evaluation's forward passes."""
    passes: list[int] = []
    handle = tiny_model.blocks[-1].register_forward_hook(lambda *args: passes.append(1))
    try:
        cfg = run_config(
            tmp_path / "run",
            tiny_model_dir,
            trainer={"training_tokens": BATCH * 2 * EVAL_STEPS},
            eval={"eval_every_tokens": BATCH * EVAL_STEPS},
        )
        run, _ = fit(cfg, tiny_model, docs)
    finally:
        handle.remove()
    assert run.evaluator is not None and len(run.evaluator.contexts) == 1
    assert len(passes) == 2 + 3, "clean and ablated once; spliced at steps 10, 20 and the end"


def test_run_directory_has_config_metrics_and_final_sae(trained: Trained) -> None:
    out, cfg = trained.out, trained.cfg
    saved = yaml.safe_load((out / "config.yaml").read_text())
    expected = trained.run.cfg.to_dict()
    expected.pop("out")
    assert saved == expected
    # The config saved is the one used, resolved for this CPU (bf16 only where it is native);
    # the caller's is left as it was.
    native = native_bfloat16("cpu")
    assert saved["distributed"]["data_shards"] == 1
    assert saved["model"]["model_dtype"] == ("bfloat16" if native else "float32")
    assert saved["trainer"]["autocast"] is native
    assert cfg.distributed.data_shards == 0 and cfg.model.model_dtype == "auto"
    assert cfg.trainer.autocast is None
    assert RunConfig.from_dict(saved).trainer.training_tokens == BATCH * STEPS

    rows = RunDir(out).read_metrics()
    assert [r["step"] for r in rows] == list(range(2, STEPS + 1, 2))
    for row in rows:
        for key in ("tokens", "tokens_per_second", "loss", "l0", "explained_variance"):
            assert isinstance(row[key], int | float) and math.isfinite(row[key]), key
        assert row["tokens"] == row["step"] * BATCH
        has_eval = row["step"] % EVAL_STEPS == 0
        assert ("eval/explained_variance" in row) == has_eval
        if has_eval:
            keys = {"eval/l0", "eval/ce_loss_recovered", "eval/kl_div_with_sae", "eval/seconds"}
            assert keys <= set(row)
            assert row["eval/seconds"] > 0

    final = out / "final"
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert (final / name).is_file(), name
    sparsity = load_file(str(final / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (128,) and bool((sparsity <= 0).all())


def test_a_finished_run_leaves_its_directory_unlocked(trained: Trained) -> None:
    assert RunDir(trained.out).lock_holder() is None


def test_a_held_run_directory_is_refused_before_the_model_loads(
    tiny_model_dir: Path, docs: Dataset, tmp_path: Path
) -> None:
    """A second trainer (or a resume) on a directory another trainer holds stops at once,
    naming the holder, and writes nothing there."""
    cfg = run_config(tmp_path / "run", tiny_model_dir)
    with RunDir(tmp_path / "run").lock() as held:
        before = sorted(p.name for p in (tmp_path / "run").iterdir())
        with pytest.raises(ConfigError, match=f"in use by PID {held.info['pid']} on host "):
            train(replace(cfg, model=replace(cfg.model, model="no-such-model")), dataset=docs)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before == [".lock"]


def test_saved_sae_reproduces_trainer_sae_on_raw_activations(
    trained: Trained, tiny_model: Any
) -> None:
    """The trainer's SAE sees activations times ``scale``; the saved one has it folded in."""
    slot = trained.run.learners[0]
    assert slot.scale != pytest.approx(1.0, abs=1e-3), "the fold would not be tested"
    assert trained.run.evaluator is not None
    tokens = torch.cat(trained.run.evaluator.contexts)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK].reshape(-1, 64)[:200].float()
    slot.sae.eval()
    with torch.no_grad():
        feats = slot.sae.encode(x * slot.scale)
        want = slot.sae.decode(feats) / slot.scale
    for loaded in (drrik.SAE.load(trained.out / "final"), drrik.load_sae(trained.out / "final")):
        assert isinstance(loaded, TopKSAE) and not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(loaded.encode(x), feats / slot.scale, rtol=1e-4, atol=1e-5)


def test_same_seed_gives_identical_weights_other_seed_differs(
    trained: Trained, tiny_model: Any, tiny_model_dir: Path, docs: Dataset, tmp_path: Path
) -> None:
    same = run_config(
        tmp_path / "same", tiny_model_dir, eval={"eval_every_tokens": BATCH * EVAL_STEPS}
    )
    fit(same, tiny_model, docs)
    want = final_weights(trained.out)
    got = final_weights(tmp_path / "same")
    assert all(torch.equal(got[k], want[k]) for k in want)
    losses = [r["loss"] for r in RunDir(trained.out).read_metrics()]
    assert [r["loss"] for r in RunDir(tmp_path / "same").read_metrics()] == losses

    other = run_config(
        tmp_path / "other",
        tiny_model_dir,
        eval={"eval_every_tokens": BATCH * EVAL_STEPS},
        trainer={"seed": 7},
    )
    fit(other, tiny_model, docs)
    got = final_weights(tmp_path / "other")
    assert not torch.equal(got["W_dec"], want["W_dec"])


def test_two_hooks_and_a_sweep_train_four_saes_from_one_stream(
    tiny_model: Any, tiny_model_dir: Path, docs: Dataset, tmp_path: Path
) -> None:
    steps = 8
    cfg = run_config(
        tmp_path,
        tiny_model_dir,
        model={"hook": f"{HOOK},{HOOK2}"},
        trainer={"sweep": "k=4,8", "training_tokens": BATCH * steps},
    )
    run, metrics = fit(cfg, tiny_model, docs)
    names = [f"{hook}__k={k}" for hook in (HOOK, HOOK2) for k in (4, 8)]
    assert sorted(metrics) == sorted(names)
    assert len(run.stores) == 1, "one activations stream feeds every SAE"
    for name in names:
        hook, k = name.split("__k=")
        sae = drrik.load_sae(tmp_path / "final" / name)
        assert isinstance(sae, TopKSAE) and sae.cfg.k == int(k)
        assert metrics[name]["l0"] == pytest.approx(int(k))
        meta = yaml.safe_load((tmp_path / "final" / name / "cfg.json").read_text())["metadata"]
        assert meta["hook_name"] == hook
    rows = RunDir(tmp_path).read_metrics()
    for step in range(2, steps + 1, 2):
        at_step = {r["sae"]: r for r in rows if r["step"] == step}
        assert sorted(at_step) == sorted(names), f"step {step}"
        for name, row in at_step.items():
            assert row["l0"] == int(name.split("=")[1])


def test_nan_loss_stops_the_run_naming_the_step_and_saves_nothing_after(
    tiny_model: Any,
    tiny_model_dir: Path,
    docs: Dataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad_step = 7  # the 7th step sees NaN inputs; it is logged (and found) at step 8
    train_step = Learner.step

    def poisoned(
        self: Learner, acts: dict[str, torch.Tensor], warm_up: float, step: int, *rest: Any
    ) -> None:
        if step == bad_step:
            acts = {hook: x * float("nan") for hook, x in acts.items()}
        train_step(self, acts, warm_up, step, *rest)

    monkeypatch.setattr(Learner, "step", poisoned)
    cfg = run_config(
        tmp_path,
        tiny_model_dir,
        trainer={"training_tokens": BATCH * 16, "log_every_steps": 4},
        checkpoint={"checkpoint_every_tokens": BATCH * 4},
    )
    with pytest.raises(TrainingDiverged, match=f"NaN or Inf at step {bad_step};"):
        train(cfg, model=tiny_model, dataset=docs, verbose=False)
    assert not (tmp_path / "final").exists()
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-0000000004"]
    assert [r["step"] for r in RunDir(tmp_path).read_metrics()] == [4]
