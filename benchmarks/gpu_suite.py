"""One-shot smoke test of the paths that only differ on a GPU (issue 17); driven by gpu_suite.sh.

    bash benchmarks/gpu_suite.sh             # on a CUDA machine: results/gpu_suite-cuda.json
    bash benchmarks/gpu_suite.sh --dry-run   # the same logic on CPU/gloo, small sizes

Each check records ok/error and its numbers; the script exits 1 if any check failed.

- ``steps``: every architecture x autocast off/on trains on the embedded SmolLM2 with every
  training step under ``torch.cuda.set_sync_debug_mode("error")`` (no host sync in a step:
  items 8, 9, 10), then evaluates and saves; TF32 and the auto dtype are recorded (13a, 13b).
- ``nccl`` (under a one-process torchrun): the collectives forced on over NCCL (an NCCL group
  rejects CPU tensors even with one rank): norm-scale average, agreement, resample broadcast,
  checkpoint parts, waits on rank 0, destroy (items 1, 4, 5, 13e).
- ``resume``: a checkpoint written as if four GPUs were visible resumes here (item 3).
- ``eval_memory``: peak memory of one evaluation batch on a random-init 128k-vocabulary model,
  in units of that batch's float32 logits (item 6; about 6 before the fix).
- ``pinned_buffer``: ``--act-store-device cpu`` keeps a pinned buffer and trains (item 11);
  the buffer's shuffle and state_dict allocate no buffer-sized temporary on its device (12).
- ``fp16``: float16 SAE parameters are refused (item 7).
- ``compile``: a sweep of 10 compiled SAEs with a warm-up coefficient does not hit dynamo's
  recompile limit (13f).
- ``spread``: evaluation with the model over two GPUs (item 2); skipped with fewer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import RESULTS, machine_info  # noqa: E402

from drrik.assemble import assemble  # noqa: E402
from drrik.config import (  # noqa: E402
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    StoreConfig,
    TrainerConfig,
)
from drrik.distributed import Distributed  # noqa: E402
from drrik.errors import ConfigError  # noqa: E402
from drrik.evaluate import EvalTarget, evaluate  # noqa: E402
from drrik.learner import Learner  # noqa: E402
from drrik.model import load_model, resolve_dtype  # noqa: E402
from drrik.pipeline import train, train_run  # noqa: E402
from drrik.run_dir import RunDir  # noqa: E402
from drrik.sae import SAEConfig, build_sae  # noqa: E402

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated")
HOOK = "blocks.6.hook_resid_post"
VOCAB = 131072


class Suite:
    """Sizes and device for a real (CUDA) or dry (CPU) run, and the checks' results."""

    def __init__(self, dry_run: bool, work: Path) -> None:
        self.dry = dry_run
        self.device = "cpu" if dry_run else "cuda"
        if not dry_run and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run")
        self.work = work
        self.batch = 256 if dry_run else 4096
        self.steps = 4 if dry_run else 60
        self.context = 32 if dry_run else 128
        self.results: dict[str, Any] = {}
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            dtype = resolve_dtype("auto", self.device)
            self._model = load_model("smollm2-135m", device=self.device, dtype=dtype)
        return self._model

    def config(self, name: str, **sections: dict[str, Any]) -> RunConfig:
        s = {k: dict(v) for k, v in sections.items()}
        prompts = 8 if self.dry else 32
        return RunConfig(
            model=ModelConfig(hook=HOOK, device=self.device, **s.pop("model", {})),
            data=DataConfig(context_size=self.context),
            store=StoreConfig(
                **{
                    "train_batch_size_tokens": self.batch,
                    "store_batch_size_prompts": prompts,
                    "n_batches_in_buffer": max(4, 4 * self.batch // (prompts * self.context)),
                    **s.pop("store", {}),
                }
            ),
            sae=SAEConfig(**{"architecture": "topk", "k": 32, **s.pop("sae", {})}),
            trainer=TrainerConfig(
                **{
                    "training_tokens": self.batch * self.steps,
                    "log_every_steps": max(2, self.steps // 4),
                    **s.pop("trainer", {}),
                }
            ),
            eval=EvalConfig(eval_contexts=8 if self.dry else 64, eval_batch_size_prompts=8),
            checkpoint=CheckpointConfig(
                **{"checkpoint_every_minutes": 0, **s.pop("checkpoint", {})}
            ),
            out=str(self.work / name),
        )

    def check(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        """Run one check; record its numbers, or the error that stopped it."""
        start = time.perf_counter()
        try:
            found = fn() or {}
            ok = bool(found.pop("ok", True))
            entry: dict[str, Any] = {"ok": ok, **found}
        except Exception as exc:  # a failed check is a result, not the end of the suite
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            traceback.print_exc()
        entry["seconds"] = round(time.perf_counter() - start, 1)
        self.results[name] = entry
        print(f"[gpu_suite] {name}: {'ok' if entry['ok'] else 'FAILED'}", flush=True)


@contextlib.contextmanager
def no_host_sync(device: str) -> Iterator[None]:
    """Any CUDA call that synchronizes with the host raises inside (CUDA only)."""
    if not device.startswith("cuda"):
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@contextlib.contextmanager
def sync_free_steps(device: str) -> Iterator[list[bool]]:
    """Every Learner.step under no_host_sync; yields whether each step got a mask."""
    original = Learner.step
    masks: list[bool] = []

    def step(self: Learner, *args: Any) -> None:
        masks.append(self.idle_bound >= self.cfg.dead_feature_window)
        with no_host_sync(device):
            original(self, *args)

    Learner.step = step  # type: ignore[method-assign]
    try:
        yield masks
    finally:
        Learner.step = original  # type: ignore[method-assign]


def _train(suite: Suite, cfg: RunConfig) -> dict[str, Any]:
    with sync_free_steps(suite.device) as masks:
        run = assemble(cfg, model=suite.model, verbose=False)
        metrics = train_run(run)
    rows = RunDir(cfg.out).read_metrics()
    return {
        "tokens_per_second": rows[-1]["tokens_per_second"],
        "explained_variance": next(iter(metrics.values()))["explained_variance"],
        "steps_with_dead_mask": sum(masks),
        "steps": len(masks),
        "tf32": getattr(torch.backends.cuda.matmul, "fp32_precision", None),
        "model_dtype": run.cfg.model.model_dtype,
    }


def part_local(suite: Suite) -> None:
    for arch in ARCHITECTURES:
        for autocast in (False, True):
            name = f"steps/{arch}/autocast={'on' if autocast else 'off'}"
            sae = {"architecture": arch, "k": 32}
            cfg = suite.config(name.replace("/", "-"), sae=sae, trainer={"autocast": autocast})
            suite.check(name, lambda cfg=cfg: _train(suite, cfg))
    # A short window: features die, so AuxK runs with dead features, still without a sync.
    cfg = suite.config("steps-topk-dead", trainer={"dead_feature_window": suite.batch * 2})
    suite.check("steps/topk/dead_features", lambda: _train(suite, cfg))
    suite.check("resume", lambda: _resume(suite))
    suite.check("eval_memory", lambda: _eval_memory(suite))
    suite.check("pinned_buffer", lambda: _pinned_buffer(suite))
    suite.check("fp16", lambda: _fp16_refused(suite))
    suite.check("compile", lambda: _compile_sweep(suite))
    suite.check("spread", lambda: _spread(suite))


def _resume(suite: Suite) -> dict[str, Any]:
    """Save as if four GPUs were visible, then resume with the GPUs this machine has."""
    half = suite.config("resume", trainer={"training_tokens": suite.batch * suite.steps // 2})
    real = torch.cuda.get_rng_state_all
    torch.cuda.get_rng_state_all = lambda: real() * 4  # type: ignore[assignment]
    try:
        train(half, model=suite.model, verbose=False)
    finally:
        torch.cuda.get_rng_state_all = real  # type: ignore[assignment]
    full = suite.config("resume")
    run = assemble(full, model=suite.model, verbose=False)
    resumed_at = run.progress.step
    train_run(run)
    return {"resumed_at_step": resumed_at, "ok": resumed_at > 0}


def _big_vocab_model(suite: Suite) -> Any:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from drrik.model import embedded_gguf_path, gguf_to_hf_dir

    width = 64 if suite.dry else 576
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4 if suite.dry else 9,
        num_key_value_heads=2 if suite.dry else 3,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    path = suite.work / "big-vocab"
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(gguf_to_hf_dir(embedded_gguf_path())).save_pretrained(path)
    return load_model(str(path), device=suite.device, dtype="float32"), width


def _peak_bytes(device: str) -> Callable[[], int]:
    """A reader of the memory peak since now, above the memory in use now (on CPU: the
    process's resident-set peak, 0 if it did not rise above the earlier peak)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        return lambda: torch.cuda.max_memory_allocated() - base
    import resource

    def max_rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    earlier = max_rss()
    return lambda: max_rss() - base if max_rss() > earlier else 0


def _eval_memory(suite: Suite) -> dict[str, Any]:
    model, width = _big_vocab_model(suite)
    batch, context = (8, 32) if suite.dry else (16, 1024)
    sae = build_sae(SAEConfig(architecture="topk", k=32, d_in=width), device=suite.device)
    targets = [EvalTarget("sae", "blocks.1.hook_resid_post", sae.eval())]
    tokens = torch.randint(100, 40000, (batch, context))
    tokens[:, 0] = 1
    evaluate(model, targets, [tokens[:1, :8]], torch.tensor([1]))  # warm-up
    peak = _peak_bytes(suite.device)
    evaluate(model, targets, [tokens], torch.tensor([1]))
    logits = batch * context * VOCAB * 4
    ratio = peak() / logits
    # On CPU the resident-set peak only shows what rises above earlier checks' peaks.
    measured = ratio > 0 or not suite.dry
    return {
        "peak_over_logits": round(ratio, 2) if measured else None,
        "logits_gib": logits / 2**30,
        "ok": ratio < 3,
    }


def _pinned_buffer(suite: Suite) -> dict[str, Any]:
    cfg = suite.config("pinned", store={"act_store_device": "cpu"})
    with sync_free_steps(suite.device):
        run = assemble(cfg, model=suite.model, verbose=False)
        buffer = run.stores[0].buffer
        pinned = next(iter(buffer.acts.values())).is_pinned() if suite.device != "cpu" else None
        train_run(run)
    temporaries = _buffer_temporaries(suite)
    rows = RunDir(cfg.out).read_metrics()
    return {
        "pinned": pinned,
        "tokens_per_second": rows[-1]["tokens_per_second"],
        **temporaries,
        # CPU: the buffer is too small for the resident-set peak to see; reported only.
        "ok": pinned is not False
        and (suite.dry or temporaries["shuffle_and_state_over_buffer"] < 0.25),
    }


def _buffer_temporaries(suite: Suite) -> dict[str, Any]:
    """Memory the buffer's shuffle and state_dict allocate on its device, per buffer byte."""
    cfg = suite.config("buffer-memory")
    run = assemble(cfg, model=suite.model, verbose=False)
    store = run.stores[0]
    store.next_batch()
    peak = _peak_bytes(suite.device)
    store.buffer.shuffle()
    store.state_dict()
    ratio = peak() / store.buffer.nbytes
    run.close()
    return {"shuffle_and_state_over_buffer": round(ratio, 3)}


def _fp16_refused(suite: Suite) -> dict[str, Any]:
    try:
        suite.config("fp16", sae={"dtype": "float16"})
    except ConfigError as exc:
        return {"message": str(exc)}
    return {"ok": False, "message": "float16 SAE parameters were accepted"}


def _compile_sweep(suite: Suite) -> dict[str, Any]:
    limit_hits: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if (
                "recompile_limit" in record.getMessage()
                or "cache_size_limit" in record.getMessage()
            ):
                limit_hits.append(record.getMessage()[:300])

    handler = Catch()
    logging.getLogger("torch._dynamo").addHandler(handler)
    compile_ = torch.compile
    if suite.dry:  # CPU: dynamo's guards and recompiles without inductor's C++ build
        torch.compile = lambda fn, **kw: compile_(fn, backend="eager")  # type: ignore[assignment]
    try:
        cfg = suite.config(
            "compile",
            trainer={
                "compile_sae": True,
                "sweep": "k=" + ",".join(str(8 * i) for i in range(1, 11)),
                "l1_warm_up_steps": suite.steps,
            },
            sae={"architecture": "relu"},
        )
        train(cfg, model=suite.model, verbose=False)
    finally:
        torch.compile = compile_  # type: ignore[assignment]
        logging.getLogger("torch._dynamo").removeHandler(handler)
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"]["unique_graphs"])
    return {"unique_graphs": graphs, "limit_hits": limit_hits, "ok": not limit_hits}


def _spread(suite: Suite) -> dict[str, Any]:
    if suite.dry or torch.cuda.device_count() < 2:
        return {"skipped": "needs two GPUs"}
    model = load_model("smollm2-135m", device="cuda:0", dtype="bfloat16", n_devices=2)
    sae = build_sae(SAEConfig(architecture="topk", k=32, d_in=576), device="cuda:0").eval()
    tokens = torch.randint(100, 40000, (4, 64))
    metrics, _ = evaluate(model, [EvalTarget("s", HOOK, sae)], [tokens], torch.tensor([1]))
    return {"explained_variance": metrics["s"]["explained_variance"]}


def part_nccl(suite: Suite) -> None:
    """Under ``torchrun --nproc_per_node 1``: the job's collectives forced on at one rank."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo" if suite.dry else "nccl"
    if not suite.dry:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    device = torch.device(suite.device, local_rank) if not suite.dry else torch.device("cpu")

    class OneRankJob(Distributed):
        @property
        def enabled(self) -> bool:  # collectives run even at world size 1
            return True

    job = OneRankJob(0, 1, local_rank, device, dist.new_group(backend="gloo"))
    original = Distributed.from_environment
    Distributed.from_environment = classmethod(lambda cls, *a: job)  # type: ignore[assignment]
    try:
        cfg = suite.config(
            "nccl",
            trainer={"resample_every_tokens": suite.batch * 2, "dead_feature_window": suite.batch},
            checkpoint={"checkpoint_every_tokens": suite.batch * 2},
        )
        cfg.eval.eval_every_tokens = suite.batch * 2
        suite.check("nccl", lambda: {**_train(suite, cfg), "backend": backend})
        suite.check("nccl/destroyed", lambda: {"ok": not dist.is_initialized()})
    finally:
        Distributed.from_environment = original  # type: ignore[assignment]


def save(suite: Suite, part: str) -> Path:
    """Merge this part's checks into results/gpu_suite-<cuda|dry-run>.json."""
    path = RESULTS / f"gpu_suite-{'dry-run' if suite.dry else 'cuda'}.json"
    found = json.loads(path.read_text()) if path.exists() and part != "local" else {}
    found.setdefault("machine", machine_info(suite.device))
    found.setdefault("checks", {}).update(suite.results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=2) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU and gloo, small sizes")
    parser.add_argument("--part", choices=("local", "nccl"), default="local")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as work:
        suite = Suite(args.dry_run, Path(work))
        (part_local if args.part == "local" else part_nccl)(suite)
    path = save(suite, args.part)
    failed = [name for name, entry in suite.results.items() if not entry["ok"]]
    print(f"[gpu_suite] {args.part}: {len(suite.results) - len(failed)} ok, failed: {failed}")
    print(f"[gpu_suite] results in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
