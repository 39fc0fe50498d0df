"""One-shot GPU smoke test: CUDA-only paths (issue 17), throughput at scale (16); gpu_suite.sh.

    bash benchmarks/gpu_suite.sh             # on a CUDA machine: results/gpu_suite-cuda.json
    bash benchmarks/gpu_suite.sh --dry-run   # the same logic on CPU/gloo, small sizes

Each check records ok/error and its numbers; the script exits 1 if any check failed.

- ``steps``: every architecture x autocast off/on trains on the embedded SmolLM2 with every
  training step under ``torch.cuda.set_sync_debug_mode("error")`` (no host sync in a step:
  items 8, 9, 10), then evaluates and saves; TF32 and the auto dtype are recorded (13a, 13b).
- ``nccl`` (under a one-process torchrun): the collectives forced on over NCCL (an NCCL group
  rejects CPU tensors even with one rank): norm-scale average, agreement, resample broadcast,
  checkpoint parts, waits on rank 0, destroy (items 1, 4, 5, 13e); the all-reduces and
  broadcasts are counted, and the check fails if none ran (nothing would have been tested).
- ``resume``: a checkpoint written as if four GPUs were visible resumes here (item 3).
- ``eval_memory``: peak memory of one evaluation batch on a random-init 128k-vocabulary model,
  in units of that batch's float32 logits (item 6; about 6 before the fix).
- ``pinned_buffer``: ``--act-store-device cpu`` keeps a pinned buffer and trains (item 11);
  the buffer's shuffle and state_dict allocate no buffer-sized temporary on its device (12).
- ``fp16``: float16 SAE parameters are refused (item 7).
- ``compile``: a sweep of 10 compiled SAEs with a warm-up coefficient does not hit dynamo's
  recompile limit (13f).
- ``spread``: evaluation with the model over two GPUs (item 2); skipped with fewer.

Throughput and memory (issue 16), each with its target next to the measured number; targets
are checked on CUDA only (the dry run records them):

- ``overlap``: the embedded model's forward alone, the SAE step alone and the training loop, in
  tokens/s; the loop as a share of min(forward, step) (target >= 0.90: the two overlap).
- ``flatness``: the same training for N and 10N steps: tokens/s and peak memory of the loop,
  long over short (targets: tokens/s >= 0.90x, memory <= 1.10x).
- ``scaling/<family>``: random-init Llama-3.2-1B, Gemma-2-2B and Llama-3-8B shapes (scaling.py's
  ``FAMILIES``, nothing fetched): forward tokens/s to the middle layer's hook (from the first
  blocks when the model is large, as scaling.py does), TopK k 32 step tokens/s at widths 16k,
  65k and 262k where they fit, peak memory of each.
- ``feature_parallel``: ``drrik train --feature-parallel 2`` under a 2-process torchrun;
  skipped with fewer than two GPUs and in the dry run.

The bf16 LM with a bf16-autocast SAE is ``steps/<arch>/autocast=on`` (LM dtype auto: bfloat16
where native). ``--part table`` prints every recorded check: measured, target, ok.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from floor import Timed, alternate, forward_fn, serial_floor  # noqa: E402
from machine import RESULTS, machine_info  # noqa: E402
from scaling import (  # noqa: E402
    CONTEXT,
    FAMILIES,
    GIB,
    Family,
    available_bytes,
    forward_result,
    full_depth,
    reset_peak,
    rss_bytes,
    step_bytes_estimate,
    width_label,
)

from drrik.assemble import assemble, resolved_config  # noqa: E402
from drrik.config import (  # noqa: E402
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    StoreConfig,
    TrainerConfig,
)
from drrik.data import ContextStream, load_source  # noqa: E402
from drrik.distributed import Distributed  # noqa: E402
from drrik.dtypes import torch_dtype  # noqa: E402
from drrik.errors import ConfigError  # noqa: E402
from drrik.evaluate import EvalTarget, evaluate  # noqa: E402
from drrik.learner import Learner  # noqa: E402
from drrik.model import (  # noqa: E402
    embedded_gguf_path,
    gguf_to_hf_dir,
    load_model,
    native_bfloat16,
    resolve_dtype,
    run_hooks,
)
from drrik.pipeline import open_logger, train, train_run  # noqa: E402
from drrik.run_dir import RunDir  # noqa: E402
from drrik.sae import SAEConfig, build_sae  # noqa: E402
from drrik.sae.spec import DictionarySpec  # noqa: E402
from drrik.trainer import Trainer  # noqa: E402

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated")
HOOK = "blocks.6.hook_resid_post"
VOCAB = 131072
OVERLAP_TARGET = 0.90  # the loop's share of min(forward alone, step alone)
FLAT_TARGET = 0.10  # 10x longer: tokens/s at most 10% lower, peak memory at most 10% higher
SCALING_FAMILIES = ("Llama-3.2-1B", "Gemma-2-2B", "Llama-3-8B")


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
        self.rounds = 2 if dry_run else 5  # alternating rounds of the alone measurements
        self.overlap_steps = 8 if dry_run else 300
        self.alone_tokens = 2 * self.batch if dry_run else 8 * self.batch  # a timed call's
        self.flat_steps = 3 if dry_run else 100  # the short run; the long one is 10x
        self.flat_log_every = 1 if dry_run else 20
        # scaling: blocks built for a large model, the largest model timed to its middle layer
        # directly (parameters through that layer), widths, contexts per forward
        self.scaling_layers = 2 if dry_run else 4
        self.scaling_direct_params = 0 if dry_run else 2e9
        self.scaling_widths = [16384] if dry_run else [16384, 65536, 262144]
        self.scaling_prompts = 2 if dry_run else 16
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
            data=DataConfig(**{"context_size": self.context, **s.pop("data", {})}),
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
    tokens_per_second = rows[-1]["tokens_per_second"]
    return {
        "tokens_per_second": tokens_per_second,
        "explained_variance": next(iter(metrics.values()))["explained_variance"],
        "steps_with_dead_mask": sum(masks),
        "steps": len(masks),
        "tf32": getattr(torch.backends.cuda.matmul, "fp32_precision", None),
        "model_dtype": run.cfg.model.model_dtype,
        "measured": f"{tokens_per_second:,.0f} tok/s, LM {run.cfg.model.model_dtype}",
        "target": "no host sync in a step",
    }


def part_local(suite: Suite) -> None:
    for arch in ARCHITECTURES:
        for autocast in (False, True):
            name = f"steps/{arch}/autocast={'on' if autocast else 'off'}"
            sae = {"architecture": arch, "k": 32}
            cfg = suite.config(name.replace("/", "-"), sae=sae, trainer={"autocast": autocast})
            suite.check(name, functools.partial(_train, suite, cfg))
    # A short window: features die, so AuxK runs with dead features, still without a sync.
    cfg = suite.config("steps-topk-dead", trainer={"dead_feature_window": suite.batch * 2})
    suite.check("steps/topk/dead_features", lambda: _train(suite, cfg))
    suite.check("resume", lambda: _resume(suite))
    suite.check("eval_memory", lambda: _eval_memory(suite))
    suite.check("pinned_buffer", lambda: _pinned_buffer(suite))
    suite.check("fp16", lambda: _fp16_refused(suite))
    suite.check("compile", lambda: _compile_sweep(suite))
    suite.check("spread", lambda: _spread(suite))
    suite.check("overlap", lambda: _overlap(suite))
    suite.check("flatness", lambda: _flatness(suite))
    for name in SCALING_FAMILIES:
        suite.check(f"scaling/{name}", functools.partial(_scaling, suite, name))
    suite.check("feature_parallel", lambda: _feature_parallel(suite))


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
    return {
        "resumed_at_step": resumed_at,
        "measured": f"resumed at step {resumed_at}",
        "target": "resumes (step > 0)",
        "ok": resumed_at > 0,
    }


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
        "measured": f"{ratio:.2f} x fp32 logits" if measured else "not visible in RSS",
        "target": "< 3 x fp32 logits",
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
        "measured": f"pinned {pinned}, temporaries "
        f"{temporaries['shuffle_and_state_over_buffer']} x buffer",
        "target": "pinned, temporaries < 0.25 x buffer",
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
        return {"message": str(exc), "measured": "refused", "target": "refused"}
    return {"ok": False, "message": "float16 SAE parameters were accepted", "target": "refused"}


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
    return {
        "unique_graphs": graphs,
        "limit_hits": limit_hits,
        "measured": f"{graphs} graphs, {len(limit_hits)} limit hits",
        "target": "no recompile-limit hit",
        "ok": not limit_hits,
    }


def _spread(suite: Suite) -> dict[str, Any]:
    if suite.dry or torch.cuda.device_count() < 2:
        return {"skipped": "needs two GPUs"}
    model = load_model("smollm2-135m", device="cuda:0", dtype="bfloat16", n_devices=2)
    sae = build_sae(SAEConfig(architecture="topk", k=32, d_in=576), device="cuda:0").eval()
    tokens = torch.randint(100, 40000, (4, 64))
    metrics, _ = evaluate(model, [EvalTarget("s", HOOK, sae)], [tokens], torch.tensor([1]))
    ev = metrics["s"]["explained_variance"]
    return {"explained_variance": ev, "measured": f"EV {ev:.3f}", "target": "evaluates"}


# -- throughput and memory (issue 16) ------------------------------------------------------


class PeakMemory:
    """Peak memory above a baseline taken at creation: CUDA allocations on a GPU; on a CPU the
    process's resident-set high-water mark, reset through /proc (scaling.py's ``reset_peak``)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = reset_peak()
        self.restart()

    def restart(self) -> None:
        """Forget the peak so far; the baseline stays."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()

    def total_gib(self) -> float:
        """The peak since the last restart, all of it (the baseline included), in GiB."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / GIB
        return rss_bytes("VmHWM") / GIB

    def gib(self) -> float:
        """The peak since the last restart, above the baseline, in GiB."""
        return self.total_gib() - self.base / GIB


def _free_memory(device: str) -> None:
    """Drop what is no longer referenced (and, on a GPU, the allocator's cached blocks)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def synced(fn: Timed, device: str) -> Timed:
    """``fn``, then a wait for the device: a host clock around it times the device's work."""
    if not device.startswith("cuda"):
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def learner_step_fn(sae: SAEConfig, x: torch.Tensor, trainer: TrainerConfig, repeats: int) -> Timed:
    """``repeats`` steps of drrik's own :class:`Learner` on ``x``: the training loop's step
    alone. (floor.py's ``sae_step_fn`` keeps its dead-feature counts and autocast on the CPU.)"""
    spec = DictionarySpec("step", ("x",), ("x",), sae)
    learner = Learner.build(spec, trainer, total_steps=10**6, device=x.device)
    one_process, acts, numbers = Distributed(), {"x": x}, itertools.count(1)

    def run() -> None:
        for _ in range(repeats):
            learner.step(acts, 1.0, next(numbers), x.shape[0], one_process)

    return run


def scaled(x: torch.Tensor) -> torch.Tensor:
    """``x`` with rows of mean norm sqrt(d_in), as training scales its inputs."""
    return x * (x.shape[1] ** 0.5 / x.float().norm(dim=1).mean()).to(x.dtype)


def window_rates(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(tokens, tokens/s) of each logged window of a one-dictionary run."""
    starts = [0] + [row["tokens"] for row in rows[:-1]]
    return [
        (row["tokens"] - start, row["tokens_per_second"])
        for row, start in zip(rows, starts, strict=True)
    ]


def rate(windows: list[tuple[int, float]]) -> float:
    """Tokens/s over ``windows`` together."""
    return sum(t for t, _ in windows) / sum(t / v for t, v in windows)


def steady_rate(rows: list[dict[str, Any]]) -> float:
    """Training tokens/s after the first logged window (allocator, kernel choice, first
    refills), or of the only one."""
    windows = window_rates(rows)
    return rate(windows[1:] or windows)


def _loop(suite: Suite, cfg: RunConfig) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Assemble ``cfg`` and run its training loop alone (no final evaluation or export):
    its metrics rows, and the loop's peak memory, all of it (CUDA: allocated; CPU: resident)
    and above what the assembled run held, in GiB."""
    run = assemble(cfg, model=suite.model, verbose=False)
    try:
        logger = open_logger(run)
        peak = PeakMemory(suite.device)
        Trainer(run, logger).train()
        memory = {"peak_gib": peak.total_gib(), "peak_above_assembled_gib": peak.gib()}
        logger.finish()
    finally:
        run.close()
    return RunDir(cfg.out).read_metrics(), memory


def _rate_text(tokens_per_s: float) -> str:
    """1.23M, 45.6k or 789: a rate in a table cell."""
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e4 else f"{tokens_per_s:,.0f}"


def _overlap(suite: Suite) -> dict[str, Any]:
    """Forward alone, step alone (alternating rounds), then the loop; the loop's share of
    min(forward, step) is 1 when the two overlap fully, and its serial floor's share of it
    1 / (1/forward + 1/step) / min(...) when they do not overlap at all."""
    cfg = suite.config(
        "overlap",
        data={"exclude_special_tokens": False},  # every forwarded token trains
        trainer={
            "training_tokens": suite.batch * suite.overlap_steps,
            "log_every_steps": suite.overlap_steps // 4,
            "dead_feature_window": 10**12,  # the same step alone and in the loop
        },
    )
    resolved = resolved_config(cfg, Distributed())
    model, prompts = suite.model, cfg.store.store_batch_size_prompts
    stream = ContextStream(load_source(cfg.data), model.tokenizer, cfg.data)
    n_batches = max(1, suite.alone_tokens // (prompts * suite.context))
    batches = [b.to(suite.device) for b in itertools.islice(stream.batches(prompts), n_batches)]
    acts = [run_hooks(model, b, [HOOK])[HOOK].flatten(0, 1) for b in batches]
    x = scaled(torch.cat(acts)[: suite.batch])  # in the buffer's dtype, the model's
    forward_tokens = n_batches * prompts * suite.context
    repeats = max(1, forward_tokens // suite.batch)
    sae = dataclasses.replace(resolved.sae, d_in=x.shape[1])
    fns = {
        "forward": synced(forward_fn(model, [HOOK], batches), suite.device),
        "step": synced(learner_step_fn(sae, x, resolved.trainer, repeats), suite.device),
    }
    runs = alternate(fns, {"forward": forward_tokens, "step": repeats * suite.batch}, suite.rounds)
    del fns, acts, x
    _free_memory(suite.device)
    rows, _ = _loop(suite, cfg)
    forward, step = (statistics.median(runs[name]) for name in ("forward", "step"))
    loop = steady_rate(rows)
    share = loop / min(forward, step)
    floor = serial_floor(forward, step)
    return {
        "forward_tokens_per_s": forward,
        "step_tokens_per_s": step,
        "loop_tokens_per_s": loop,
        "loop_windows_tokens_per_s": [round(v, 1) for _, v in window_rates(rows)],
        "loop_over_min": round(share, 3),
        "serial_floor_tokens_per_s": floor,
        "serial_floor_over_min": round(floor / min(forward, step), 3),
        "rounds": runs,
        "autocast": resolved.trainer.autocast,
        "model_dtype": resolved.model.model_dtype,
        "measured": f"loop {share:.2f} x min(fwd {_rate_text(forward)}, step "
        f"{_rate_text(step)}) = {_rate_text(loop)} tok/s (serial floor "
        f"{floor / min(forward, step):.2f})",
        "target": f">= {OVERLAP_TARGET:.2f}",
        "target_checked": not suite.dry,
        "ok": suite.dry or share >= OVERLAP_TARGET,
    }


def _flatness(suite: Suite) -> dict[str, Any]:
    """The same training for N and 10N steps: steady tokens/s and the loop's peak memory."""
    found: dict[str, Any] = {}
    for name, steps in (("short", suite.flat_steps), ("long", 10 * suite.flat_steps)):
        cfg = suite.config(
            f"flat-{name}",
            trainer={
                "training_tokens": suite.batch * steps,
                "log_every_steps": suite.flat_log_every,
            },
        )
        rows, memory = _loop(suite, cfg)
        windows = window_rates(rows)
        found[name] = {
            "steps": steps,
            "tokens_per_s": steady_rate(rows),
            "last_fifth_tokens_per_s": rate(windows[-max(1, len(windows) // 5) :]),
            **memory,
        }
        _free_memory(suite.device)
    short, long = found["short"], found["long"]
    speed = long["tokens_per_s"] / short["tokens_per_s"]
    memory_ratio = long["peak_gib"] / short["peak_gib"]
    return {
        **found,
        "tokens_per_s_long_over_short": round(speed, 3),
        "peak_long_over_short": round(memory_ratio, 3),
        "measured": f"10x longer: tok/s {speed:.2f}x ({_rate_text(short['tokens_per_s'])} -> "
        f"{_rate_text(long['tokens_per_s'])}), peak {memory_ratio:.2f}x "
        f"({short['peak_gib']:.2f} -> {long['peak_gib']:.2f} GiB)",
        "target": f">= {1 - FLAT_TARGET:.2f}x, <= {1 + FLAT_TARGET:.2f}x",
        "target_checked": not suite.dry,
        "ok": suite.dry or (speed >= 1 - FLAT_TARGET and memory_ratio <= 1 + FLAT_TARGET),
    }


def _family_forward(suite: Suite, name: str, fam: Family) -> dict[str, Any]:
    """Forward tokens/s of a random-init ``fam`` to its first and last timed blocks (its
    middle layer when small enough), in the format of scaling.py's ``measure_forward`` (which
    times fp32 on the CPU), and the peak memory of the loaded model with its forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_to_hf_dir(embedded_gguf_path()))
    vocab = min(fam.vocab, len(tokenizer))
    direct = (fam.middle_layer() + 1) * fam.layer_params() < suite.scaling_direct_params
    timed = fam.middle_layer() + 1 if direct else min(suite.scaling_layers, fam.n_layers - 1)
    dtype = resolve_dtype("auto", suite.device)
    peak = PeakMemory(suite.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=suite.work) as tmp:
        # One block more than timed: at the last block the bridge would run the unembedding.
        with torch.device(suite.device):
            random_lm = AutoModelForCausalLM.from_config(
                fam.hf_config(timed + 1, vocab), dtype=torch_dtype(dtype)
            )
        random_lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del random_lm
        _free_memory(suite.device)
        model = load_model(tmp, device=suite.device, dtype=dtype)
    peak.restart()
    tokens = torch.randint(0, vocab, (suite.scaling_prompts, CONTEXT)).to(suite.device)
    batches = [tokens] * (1 if suite.dry else 4)
    hooks = {f"blocks.{i}.hook_resid_post": i for i in (0, timed - 1)}
    fns = {hook: synced(forward_fn(model, [hook], batches), suite.device) for hook in hooks}
    runs = alternate(fns, {hook: tokens.numel() * len(batches) for hook in hooks}, suite.rounds)
    used = peak.gib()
    del model, fns
    _free_memory(suite.device)
    return {
        **forward_result(name, timed + 1, vocab, tokens.numel(), hooks, runs),
        "model_dtype": dtype,
        "peak_gib": used,
    }


def _family_step(suite: Suite, d_model: int, width: int) -> dict[str, Any]:
    """Tokens/s of the TopK (k 32) training step at ``d_model`` x ``width`` and its peak
    memory, in the format of scaling.py's ``measure_step``; skipped where it would not fit."""
    need = step_bytes_estimate(d_model, width, suite.batch)
    if suite.device.startswith("cuda"):
        free, share = torch.cuda.mem_get_info()[0], 0.8
    else:
        free, share = available_bytes(), 0.5  # a shared machine: others need memory too
    if need > share * free:
        return {
            "d_model": d_model,
            "d_sae": width,
            "skipped": f"needs ~{need / GIB:.1f} GiB, {free / GIB:.1f} GiB free",
        }
    peak = PeakMemory(suite.device)
    torch.manual_seed(0)
    dtype = torch_dtype(resolve_dtype("auto", suite.device))
    x = scaled(torch.randn(suite.batch, d_model, device=suite.device)).to(dtype)
    sae = SAEConfig(architecture="topk", k=32, d_in=d_model, d_sae=width)
    trainer = TrainerConfig(autocast=native_bfloat16(suite.device), dead_feature_window=10**12)
    repeats = 1 if suite.dry else 4
    fn = synced(learner_step_fn(sae, x, trainer, repeats), suite.device)
    runs = alternate({"step": fn}, {"step": repeats * suite.batch}, suite.rounds)["step"]
    used = peak.gib()
    del fn, x
    _free_memory(suite.device)
    return {
        "d_model": d_model,
        "d_sae": width,
        "k": 32,
        "autocast": trainer.autocast,
        "points": [{"batch": suite.batch, "tokens_per_s": statistics.median(runs), "rounds": runs}],
        "peak_gib": used,
    }


def _scaling(suite: Suite, name: str) -> dict[str, Any]:
    """One real family's shape: forward to its middle layer, the step at each width."""
    fam = FAMILIES[name]
    forward = _family_forward(suite, name, fam)
    tried = [_family_step(suite, fam.d_model, width) for width in suite.scaling_widths]
    steps = [s for s in tried if "points" in s]
    rows = full_depth([forward], steps, [s["d_sae"] for s in steps], suite.batch, {})
    middle = f"L{fam.middle_layer()}"
    parts = [
        f"fwd to {middle} {_rate_text(rows[0]['forward_tokens_per_s']) if rows else '?'} tok/s "
        f"({forward['peak_gib']:.1f} GiB)"
    ]
    for row, step in zip(rows, steps, strict=True):
        parts.append(
            f"step {width_label(row['d_sae'])} {_rate_text(row['step_tokens_per_s'])} "
            f"({step['peak_gib']:.1f} GiB)"
        )
    parts += [f"{width_label(s['d_sae'])} skipped" for s in tried if "skipped" in s]
    return {
        "forward": forward,
        "steps": steps,
        "steps_not_run": [s for s in tried if "skipped" in s],
        "full_depth": rows,
        "measured": "; ".join(parts),
        "target": "recorded",
        "ok": bool(steps),
    }


def _feature_parallel(suite: Suite) -> dict[str, Any]:
    """``drrik train --feature-parallel 2`` under a 2-process torchrun, as a user runs it."""
    if suite.dry:
        return {"skipped": "dry run (needs two GPUs)", "target": "trains"}
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"skipped": f"needs two GPUs, this machine has {gpus}", "target": "trains"}
    out = suite.work / "feature-parallel"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "drrik", "train", "--feature-parallel", "2", "--device", "cuda"),
        *("--model", "smollm2-135m", "--hook", HOOK, "--architecture", "topk", "-k", "32"),
        *("--d-sae", "65536", "--train-batch-size-tokens", str(suite.batch)),
        *("--training-tokens", str(suite.batch * suite.steps), "--log-every-steps", "15"),
        *("--checkpoint-every-minutes", "0", "--wandb-mode", "disabled", "--out", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return {
            "ok": False,
            "command": " ".join(command),
            "error": f"exit {done.returncode}: {done.stderr[-1500:]}",
            "target": "trains",
        }
    rows = RunDir(out).read_metrics()
    tokens_per_s = steady_rate(rows)
    return {
        "command": " ".join(command),
        "tokens_per_second": tokens_per_s,
        "measured": f"{_rate_text(tokens_per_s)} tok/s at d_sae 65k over 2 GPUs",
        "target": "trains",
    }


@contextlib.contextmanager
def counted_collectives() -> Iterator[dict[str, int]]:
    """Count the calls of torch.distributed's collectives inside (drrik calls them through
    the module, so the counting wrappers see every one)."""
    import torch.distributed as dist

    names = ("all_reduce", "broadcast", "barrier", "gather_object", "broadcast_object_list")
    originals = {name: getattr(dist, name) for name in names}
    counts = dict.fromkeys(names, 0)

    def counting(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in names:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _collectives(suite: Suite, cfg: RunConfig, backend: str) -> dict[str, Any]:
    """A training run whose collectives must run at one rank (the per-step all-reduces and
    the broadcasts), with no host sync in a step."""
    with counted_collectives() as counts:
        found = _train(suite, cfg)
    ran = counts["all_reduce"] > 0 and counts["broadcast"] > 0
    return {
        **found,
        "backend": backend,
        "collectives": counts,
        "measured": f"{found['measured']}; {counts['all_reduce']} all_reduce, "
        f"{counts['broadcast']} broadcast over {backend}",
        "target": "collectives run at one rank, no host sync in a step",
        "ok": ran,
        **({} if ran else {"error": "no all_reduce or broadcast ran: nothing was tested"}),
    }


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

    # As if drrik had started the group (torchrun's rendezvous): its close destroys it.
    job = OneRankJob(
        0, 1, local_rank, device, dist.new_group(backend="gloo"), owns_default_group=True
    )
    original = Distributed.from_environment
    Distributed.from_environment = classmethod(lambda cls, *a, **k: job)  # type: ignore[assignment]
    try:
        cfg = suite.config(
            "nccl",
            trainer={"resample_every_tokens": suite.batch * 2, "dead_feature_window": suite.batch},
            checkpoint={"checkpoint_every_tokens": suite.batch * 2},
        )
        cfg.eval.eval_every_tokens = suite.batch * 2
        suite.check("nccl", lambda: _collectives(suite, cfg, backend))
        suite.check(
            "nccl/destroyed",
            lambda: {"target": "process group destroyed", "ok": not dist.is_initialized()},
        )
    finally:
        Distributed.from_environment = original  # type: ignore[assignment]


def results_path(dry: bool) -> Path:
    """results/gpu_suite-cuda.json, or gpu_suite-dry-run.json."""
    return RESULTS / f"gpu_suite-{'dry-run' if dry else 'cuda'}.json"


def save(suite: Suite, part: str) -> Path:
    """Merge this part's checks into results/gpu_suite-<cuda|dry-run>.json."""
    path = results_path(suite.dry)
    found = json.loads(path.read_text()) if path.exists() and part != "local" else {}
    found.setdefault("machine", machine_info(suite.device))
    found.setdefault("checks", {}).update(suite.results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=2) + "\n")
    return path


def verdict(entry: dict[str, Any]) -> str:
    """ok, FAILED, skipped, or recorded (a target that only a GPU run checks)."""
    if not entry["ok"]:
        return "FAILED"
    if "skipped" in entry:
        return "skipped"
    return "recorded" if entry.get("target_checked") is False else "ok"


def measured(entry: dict[str, Any]) -> str:
    """A check's numbers in a few words."""
    if "error" in entry:
        return "error: " + entry["error"].splitlines()[0][:100]
    if "skipped" in entry:
        return "skipped: " + entry["skipped"]
    return entry.get("measured", "-")


def table(path: Path, wall_seconds: int | None) -> str:
    """Every recorded check of ``path`` as a Markdown table; ``wall_seconds`` is saved."""
    found = json.loads(path.read_text())
    if wall_seconds is not None:
        found["wall_seconds"] = wall_seconds
        path.write_text(json.dumps(found, indent=2) + "\n")
    rows = [
        (name, measured(entry), entry.get("target", "-"), verdict(entry), f"{entry['seconds']}")
        for name, entry in found["checks"].items()
    ]
    lines = [
        "| check | measured | target | ok | s |",
        "|---|---|---|---|---:|",
        *("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows),
    ]
    m = found["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, load {m['load_average_1min']}"
    seconds = sum(entry["seconds"] for entry in found["checks"].values())
    total = f", {wall_seconds} s wall" if wall_seconds is not None else ""
    lines += ["", f"{m['date']}; {where}; torch {m['torch']}; checks {seconds:.0f} s{total}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU and gloo, small sizes")
    parser.add_argument("--part", choices=("local", "nccl", "table"), default="local")
    parser.add_argument("--wall-seconds", type=int, help="--part table: the suite's wall time")
    args = parser.parse_args()
    if args.part == "table":
        print(table(results_path(args.dry_run), args.wall_seconds))
        return 0
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
