"""SAELens and drrik side by side: the same SAE, trained on the same activations, in one command.

Both tools get the same model (the embedded SmolLM2-135M, converted once to an HF directory),
hook, token contexts (pretokenized once by drrik into a saved dataset: BOS opens every context,
special tokens are excluded from training), SAE size and architecture, training batch, mixing
buffer, token budget, learning rate, Adam betas, gradient clipping, input normalization
(expected_average_only_in) and seed. Each run is a separate process, so peak memory is its own:
drrik's runs use this interpreter, SAELens's run uses a virtual environment of its own (it needs
transformer-lens < 4), found with ``--saelens-python`` or ``$DRRIK_SAELENS_PYTHON``, else
``.venv-bench/bin/python``.

Per run it reports the model load (apart), the set-up (buffer fill, input-norm estimate, b_dec
initialization), the training loop alone, in tokens per second of training activations, the
total wall time without the model load, and peak RSS. Both tools' final SAEs are then evaluated
by ``drrik.evaluate.evaluate`` on the same held-out contexts (fp32 model): explained variance,
L0, dead features, CE loss recovered. The floor (bare forward to the hooked layer, bare SAE
step, each alone; see floor.py) is measured before and after the runs, rounds interleaved.

    python benchmarks/compare_saelens.py --tokens 250000            # relu (L1) and topk
    python benchmarks/compare_saelens.py --tokens 50000 --archs topk --skip-floor
    python benchmarks/compare_saelens.py --tokens 250000 --sweep    # + 4 SAEs from one stream
    python benchmarks/compare_saelens.py --tokens 250000 --flatness # + drrik at 10x tokens

Results: ``results/compare_saelens-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

MIB = 2**20


@dataclass
class RunSpec:
    """Everything one training run needs; written as JSON for the worker process."""

    tool: str  # "saelens" or "drrik"
    label: str
    arch: str  # "relu" (SAELens "standard") or "topk"
    model_dir: str
    data_dir: str
    out_dir: str
    hook: str = "blocks.6.hook_resid_post"
    context_size: int = 128
    d_sae: int = 4608
    k: int = 32
    l1_coefficient: float = 5.0
    aux_k_coefficient: float = 1 / 32
    lr: float = 1e-3
    seed: int = 42
    tokens: int = 250_000
    train_batch: int = 4096
    prompts: int = 16
    buffer_batches: int = 16  # drrik's n_batches_in_buffer; SAELens gets the same token count
    dead_window_steps: int = 1000  # 0: drrik's default window (in tokens)
    norm_batches: int = 8
    model_dtype: str = "float32"
    autocast: bool = False
    compile_sae: bool = False
    b_dec_init: str = "zeros"  # SAELens starts b_dec at zero; drrik's default is the median
    normalize_decoder: bool | None = False  # rows free, as SAELens; None: drrik's default
    sweep: str = ""
    log_every_steps: int = 10
    threads: int = 0  # 0: torch's default

    @property
    def buffer_tokens(self) -> int:
        return self.buffer_batches * self.prompts * self.context_size


# -- measuring a process ---------------------------------------------------------------------
class RSSMonitor:
    """Samples this process's resident set size in a thread: peak and a timeline."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.samples = every_s, []
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append((round(time.perf_counter() - self.start, 2), self.rss_mib()))

    def now(self) -> float:
        return time.perf_counter() - self.start

    def mark(self, marks: dict[str, float], name: str) -> None:
        """Record wall and process CPU time: their ratio over the loop is the cores it got."""
        marks[name] = self.now()
        marks[name + "_cpu"] = time.process_time()

    def stop(self, marks: dict[str, float]) -> dict[str, Any]:
        """Peak RSS of the process and of the training loop (marks from/to), timeline, and the
        cores the loop got (CPU seconds per second: below the thread count, others competed)."""
        self._stop.set()
        self._thread.join()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        loop = (marks["from"], marks["to"])
        in_loop = [rss for t, rss in self.samples if loop[0] <= t <= loop[1]]
        return {
            "loop_cores_used": round(
                (marks["to_cpu"] - marks["from_cpu"]) / max(loop[1] - loop[0], 1e-9), 2
            ),
            "peak_rss_mib": round(peak, 1),
            "peak_rss_in_loop_mib": round(max(in_loop, default=0.0), 1),
            "loop_window_s": [round(loop[0], 2), round(loop[1], 2)],
            "rss_timeline": [(t, round(rss, 1)) for t, rss in self.samples],
        }


# -- the drrik worker ------------------------------------------------------------------------
def drrik_worker(spec: RunSpec) -> dict[str, Any]:
    """Train with drrik's three steps; time assemble, the loop and the rest apart."""
    import torch

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
    from drrik.export import export_run, final_dir
    from drrik.model import load_model
    from drrik.pipeline import open_logger
    from drrik.sae import SAEConfig
    from drrik.trainer import Trainer

    monitor = RSSMonitor()
    t0 = time.perf_counter()
    model = load_model(spec.model_dir, dtype=spec.model_dtype)
    model_load_s = time.perf_counter() - t0
    rss_model = RSSMonitor.rss_mib()
    cfg = RunConfig(
        model=ModelConfig(model=spec.model_dir, hook=spec.hook, model_dtype=spec.model_dtype),
        data=DataConfig(
            dataset=spec.data_dir,
            split="train",
            eval_split="test",
            context_size=spec.context_size,
        ),
        store=StoreConfig(
            train_batch_size_tokens=spec.train_batch,
            n_batches_in_buffer=spec.buffer_batches,
            store_batch_size_prompts=spec.prompts,
        ),
        sae=SAEConfig(
            architecture=spec.arch,
            d_sae=spec.d_sae,
            k=spec.k if spec.arch == "topk" else None,
            l1_coefficient=spec.l1_coefficient,
            aux_k_coefficient=spec.aux_k_coefficient,
            # SAELens's TopK keeps rows free and ranks by contribution; so does drrik's without
            # unit rows. Its standard SAE keeps rows free with a norm-weighted L1, as drrik does.
            normalize_decoder=spec.normalize_decoder,
        ),
        trainer=TrainerConfig(
            training_tokens=spec.tokens,
            lr=spec.lr,
            seed=spec.seed,
            autocast=spec.autocast,
            compile_sae=spec.compile_sae,
            dead_feature_window=spec.dead_window_steps * spec.train_batch
            or TrainerConfig.dead_feature_window,
            b_dec_init_method=spec.b_dec_init,
            log_every_steps=spec.log_every_steps,
            sweep=spec.sweep,
        ),
        # drrik's own final eval, kept small; the report's eval comes later, for both tools.
        eval=EvalConfig(eval_contexts=16, eval_batch_size_prompts=4),
        checkpoint=CheckpointConfig(checkpoint_every_tokens=0, checkpoint_every_minutes=0),
        out=spec.out_dir,
    )
    cfg.wandb.wandb_mode = "disabled"
    t1 = time.perf_counter()
    run = assemble(cfg, model=model, verbose=False)
    setup_s = time.perf_counter() - t1
    loop: dict[str, float] = {}
    # The set-up's norm estimate already filled the buffer: the loop forwards fewer tokens than
    # it trains on, and the floor must count the forwards it did.
    seen = sum(store.tokens_seen for store in run.stores)
    logger = open_logger(run)
    monitor.mark(loop, "from")
    Trainer(run, logger).train()
    monitor.mark(loop, "to")
    loop["forward_tokens"] = sum(store.tokens_seen for store in run.stores) - seen
    assert run.evaluator is not None
    metrics, densities = run.evaluator([learner.eval_target() for learner in run.learners])
    export_run(run, metrics, densities, logger)
    logger.finish()
    run.close()
    total_s = time.perf_counter() - t1
    memory = monitor.stop(loop)
    rows = run.run_dir.read_metrics()
    saes = {learner.name or spec.arch: str(final_dir(run, learner)) for learner in run.learners}
    return {
        "model_load_s": model_load_s,
        "setup_s": setup_s,
        "train_loop_s": loop["to"] - loop["from"],
        "total_s_excl_model_load": total_s,
        "training_tokens": run.progress.tokens,
        "forward_tokens_in_loop": loop["forward_tokens"],
        "rss_after_model_load_mib": round(rss_model, 1),
        "torch_threads": torch.get_num_threads(),
        "throughput_windows": [
            (r["tokens"], round(r["tokens_per_second"], 1))
            for r in rows
            if r["sae"] == run.learners[0].name
        ],
        "sae_dirs": saes,
        **memory,
    }


# -- the SAELens worker (runs in the SAELens virtual environment) ------------------------------
def hooked_transformer(model_dir: str) -> Any:
    """A HookedTransformer with the HF directory's Llama weights, unprocessed (no folding or
    centering), so its residual stream is the same as the HF model's and drrik's bridge's."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    c = hf.config
    rope = getattr(c, "rope_parameters", None) or {}
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=2048,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=True,
        dtype=torch.float32,
    )
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    del hf
    return model.eval()


def saelens_worker(spec: RunSpec) -> dict[str, Any]:
    """Train with SAELens's LanguageModelSAETrainingRunner on the same data and settings."""
    import datasets
    import torch
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.sae_trainer import SAETrainer

    monitor = RSSMonitor()
    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()
    model = hooked_transformer(spec.model_dir)
    model_load_s = time.perf_counter() - t0
    rss_model = RSSMonitor.rss_mib()
    train = datasets.load_from_disk(spec.data_dir)["train"]
    d_in = model.cfg.d_model
    common = {
        "d_in": d_in,
        "d_sae": spec.d_sae,
        "normalize_activations": "expected_average_only_in",
    }
    if spec.arch == "topk":
        sae_cfg: Any = TopKTrainingSAEConfig(
            k=spec.k, aux_loss_coefficient=spec.aux_k_coefficient, **common
        )
    else:
        sae_cfg = StandardTrainingSAEConfig(l1_coefficient=spec.l1_coefficient, **common)
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="smollm2-135m",
        hook_name=spec.hook,
        dataset_path=spec.data_dir,
        is_dataset_tokenized=True,
        streaming=False,
        context_size=spec.context_size,
        # SAELens sizes its buffer in contexts of context_size tokens: the same token count.
        n_batches_in_buffer=spec.buffer_tokens // spec.context_size,
        training_tokens=spec.tokens,
        store_batch_size_prompts=spec.prompts,
        train_batch_size_tokens=spec.train_batch,
        prepend_bos=True,
        exclude_special_tokens=True,
        device="cpu",
        seed=spec.seed,
        dtype="float32",
        autocast=spec.autocast,
        autocast_lm=spec.model_dtype != "float32",
        lr=spec.lr,
        adam_beta1=0.9,
        adam_beta2=0.999,
        dead_feature_window=spec.dead_window_steps,
        n_batches_for_norm_estimate=spec.norm_batches,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=spec.out_dir,
        verbose=False,
    )
    marks: dict[str, float] = {}
    estimate, fit = ActivationScaler.estimate_scaling_factor, SAETrainer.fit

    def timed_estimate(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = estimate(self, *args, **kwargs)
        monitor.mark(marks, "from")  # the loop follows the estimate at once
        return result

    def timed_fit(self: Any) -> Any:
        result = fit(self)
        monitor.mark(marks, "to")
        return result

    ActivationScaler.estimate_scaling_factor = timed_estimate  # type: ignore[method-assign]
    SAETrainer.fit = timed_fit  # type: ignore[method-assign]
    t1 = monitor.now()
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=train)
    runner.run()
    total_s = monitor.now() - t1
    memory = monitor.stop(marks)
    return {
        "model_load_s": model_load_s,
        "setup_s": marks["from"] - t1,
        "train_loop_s": marks["to"] - marks["from"],
        "total_s_excl_model_load": total_s,
        "training_tokens": spec.tokens,
        "rss_after_model_load_mib": round(rss_model, 1),
        "torch_threads": torch.get_num_threads(),
        "sae_dirs": {spec.arch: spec.out_dir},
        **memory,
    }


def worker_main(tool: str, spec_path: Path, result_path: Path) -> None:
    spec = RunSpec(**json.loads(spec_path.read_text()))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    result = (saelens_worker if tool == "saelens" else drrik_worker)(spec)
    result_path.write_text(json.dumps(result))


# -- the orchestrator ------------------------------------------------------------------------
def peer_python(arg: str | None, tool: str, env_var: str, venv: str, also: str = "") -> str:
    """The interpreter of a peer tool's own environment: the flag's value, else ``env_var``,
    else ``venv``/bin/python in the repository; ``also`` ends the message when none is there."""
    candidate = arg or os.environ.get(env_var) or str(REPO / venv / "bin/python")
    if not Path(candidate).exists():
        sys.exit(
            f"no {tool} interpreter at {candidate}; create it (see benchmarks/README.md) or pass "
            f"--{tool.lower()}-python / set {env_var}{also}"
        )
    return candidate


def saelens_python(arg: str | None) -> str:
    """The interpreter of the SAELens environment: flag, environment variable, or .venv-bench."""
    return peer_python(
        arg, "SAELens", "DRRIK_SAELENS_PYTHON", ".venv-bench", ", or run with --skip-saelens"
    )


def run_worker(
    spec: RunSpec, python: str, work: Path, script: Path | None = None
) -> dict[str, Any]:
    """Run one training in its own process (``script --worker TOOL``, this file by default);
    its log goes to work/<label>.log."""
    spec_path, result_path = work / f"{spec.label}.spec.json", work / f"{spec.label}.result.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    result_path.unlink(missing_ok=True)
    log = work / f"{spec.label}.log"
    cmd = [python, str(script or Path(__file__).resolve()), "--worker", spec.tool]
    cmd += ["--spec", str(spec_path), "--result", str(result_path)]
    print(f"[{spec.label}] training {spec.tokens:,} tokens (log: {log})", flush=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0 or not result_path.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{spec.label} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(result_path.read_text())
    result["tokens_per_s"] = result["training_tokens"] / result["train_loop_s"]
    result["tokens_per_s_end_to_end"] = (
        result["training_tokens"] / result["total_s_excl_model_load"]
    )
    print(
        f"[{spec.label}] {result['tokens_per_s']:,.0f} training tokens/s in the loop, "
        f"on {result['loop_cores_used']:.2f} cores, "
        f"peak RSS {result['peak_rss_in_loop_mib']:,.0f} MiB in the loop, "
        f"{result['peak_rss_mib']:,.0f} MiB in all",
        flush=True,
    )
    return result


def prepare_data(model_dir: str, context_size: int, n_train: int, n_eval: int, work: Path) -> Path:
    """Contexts cut once by drrik from its offline corpus: train rows, held-out test rows."""
    import datasets
    import torch
    from transformers import AutoTokenizer

    from drrik.config import DataConfig
    from drrik.data import ContextStream, load_source

    target = work / f"data-ctx{context_size}-train{n_train}-eval{n_eval}"
    if (target / "dataset_dict.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = DataConfig(context_size=context_size)
    source = load_source(cfg)
    splits = {}
    for split, holdout, n in (("train", "train", n_train), ("test", "eval", n_eval)):
        stream = ContextStream(source, tokenizer, cfg, holdout=holdout, cycle=split == "train")
        rows: list[torch.Tensor] = []
        for batch in stream.batches(64):
            rows.append(batch)
            if sum(len(r) for r in rows) >= n:
                break
        tokens = torch.cat(rows)[:n]
        splits[split] = datasets.Dataset.from_dict({"tokens": tokens.tolist()})
    staging = work / (target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    datasets.DatasetDict(splits).save_to_disk(str(staging))
    os.replace(staging, target)
    return target


def base_spec(args: argparse.Namespace, work: Path, budget: int) -> tuple[str, Path, RunSpec]:
    """The embedded model's HF directory, the contexts (enough that no run of up to ``budget``
    tokens repeats data: budget, buffer, norm estimate, BOS rows) and the spec every run starts
    from, with the ``args`` named like RunSpec fields (hook, d_sae, lr, ...) applied."""
    from drrik.model import resolve_model_source

    model_dir = resolve_model_source("smollm2-135m")
    n_train = int((budget + 3 * 32768) / (args.context_size - 1) * 1.05) + 64
    data_dir = prepare_data(model_dir, args.context_size, n_train, args.eval_contexts, work)
    names = ("hook", "context_size", "d_sae", "k", "l1_coefficient", "lr", "seed", "tokens")
    names += ("train_batch", "prompts")
    base = RunSpec(
        tool="drrik",
        label="",
        arch="relu",
        model_dir=model_dir,
        data_dir=str(data_dir),
        out_dir="",
        **{name: getattr(args, name) for name in names if hasattr(args, name)},
    )
    return model_dir, data_dir, base


def evaluate_saes(
    model: Any, data_dir: Path, dirs: dict[str, str], batch: int = 16, limit: int | None = None
) -> dict[str, dict[str, float]]:
    """drrik's evaluator on every saved SAE, on the same held-out contexts (the first ``limit``
    of them if given)."""
    import datasets
    import torch

    from drrik.data import SpecialTokens
    from drrik.evaluate import EvalTarget, evaluate
    from drrik.sae import load_sae

    test = torch.tensor(datasets.load_from_disk(str(data_dir))["test"]["tokens"])[:limit]
    contexts = list(test.split(batch))
    exclude = torch.tensor(SpecialTokens.of(model.tokenizer).ids(), dtype=torch.long)
    targets = [EvalTarget(name, hook, load_sae(path)) for name, (hook, path) in dirs.items()]
    metrics, _ = evaluate(model, targets, contexts, exclude)
    return metrics


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """The options every comparison with a peer tool takes (this one and compare_sparsify)."""
    p.add_argument("--tokens", type=int, default=250_000, help="training tokens per run")
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-batch", type=int, default=4096, help="tokens per training batch")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--eval-contexts", type=int, default=64)
    add_drrik_dtype_args(p)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="train each main pair this many times, in alternating order; the fastest counts",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="data, runs and logs")
    p.add_argument("--out", type=Path, default=HERE / "results")


def add_drrik_dtype_args(p: argparse.ArgumentParser) -> None:
    """drrik's LM dtype and SAE-step autocast; unset, what ``drrik train`` picks on this CPU
    (:func:`resolve_drrik_dtypes`)."""
    p.add_argument(
        "--drrik-model-dtype",
        default=None,
        help="drrik's LM dtype (float32, bfloat16; default: drrik's, bfloat16 where native)",
    )
    p.add_argument(
        "--drrik-autocast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast for drrik's SAE step (default: drrik's, on where bf16 is native)",
    )


def resolve_drrik_dtypes(args: argparse.Namespace) -> None:
    """Fill an unset --drrik-model-dtype / --drrik-autocast with drrik's own default on this CPU:
    bf16 where it is native, float32 elsewhere (emulated bf16 is slower, not faster). Imports
    drrik, so only the parent process calls it, never the SAELens worker."""
    from drrik.model import native_bfloat16

    native = native_bfloat16("cpu")
    if args.drrik_model_dtype is None:
        args.drrik_model_dtype = "bfloat16" if native else "float32"
    if args.drrik_autocast is None:
        args.drrik_autocast = native


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shared_args(p)
    p.add_argument("--archs", default="relu,topk", help="relu (L1; SAELens standard), topk")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1-coefficient", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prompts", type=int, default=16, help="contexts per model forward")
    p.add_argument(
        "--drrik-compile",
        default="",
        help="architectures whose drrik SAE forward is torch.compiled (compile time counts in "
        "the loop): relu, topk, both comma-separated, or '' for none",
    )
    p.add_argument(
        "--drrik-fp32", action="store_true", help="also run drrik with SAELens's fp32 settings"
    )
    p.add_argument(
        "--drrik-gmedian",
        action="store_true",
        help="also run drrik with its default b_dec init (geometric median, not zeros)",
    )
    p.add_argument(
        "--saelens-autocast",
        action="store_true",
        help="also run SAELens with its own bf16 flags (autocast_lm, autocast)",
    )
    p.add_argument("--sweep", action="store_true", help="also train 4 SAEs from one drrik stream")
    p.add_argument("--flatness", action="store_true", help="also run drrik at 10x --tokens")
    p.add_argument("--skip-saelens", action="store_true")
    p.add_argument("--skip-floor", action="store_true")
    p.add_argument("--floor-rounds", type=int, default=3, help="floor rounds before and after")
    p.add_argument("--saelens-python", default=None)
    p.add_argument("--worker", choices=("drrik", "saelens"), help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args.worker, args.spec, args.result)
        return
    from drrik.model import load_model
    from drrik.paths import cache_dir

    resolve_drrik_dtypes(args)
    work = args.work_dir or cache_dir() / "bench-compare"
    work.mkdir(parents=True, exist_ok=True)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    sae_python = None if args.skip_saelens else saelens_python(args.saelens_python)
    budget = args.tokens * (10 if args.flatness else 1)
    model_dir, data_dir, base = base_spec(args, work, budget)
    compile_archs = {a.strip() for a in args.drrik_compile.split(",") if a.strip()}
    specs: list[RunSpec] = []  # the main pair of each architecture is repeated; extras run once
    extras: list[RunSpec] = []
    for arch in archs:
        fast = {
            "model_dtype": args.drrik_model_dtype,
            "autocast": args.drrik_autocast,
            "compile_sae": arch in compile_archs,
        }
        if not args.skip_saelens:
            specs.append(replace(base, tool="saelens", label=f"saelens-{arch}", arch=arch))
        specs.append(replace(base, label=f"drrik-{arch}", arch=arch, **fast))
        if args.drrik_fp32:
            extras.append(
                replace(
                    base, label=f"drrik-fp32-{arch}", arch=arch, compile_sae=fast["compile_sae"]
                )
            )
        if args.drrik_gmedian:
            extras.append(
                replace(
                    base,
                    label=f"drrik-gmedian-{arch}",
                    arch=arch,
                    b_dec_init="geometric_median",
                    **fast,
                )
            )
        if args.saelens_autocast and not args.skip_saelens:
            extras.append(
                replace(
                    base,
                    tool="saelens",
                    label=f"saelens-bf16-{arch}",
                    arch=arch,
                    model_dtype="bfloat16",
                    autocast=True,
                )
            )
        if args.sweep:
            values = "16,32,64,128" if arch == "topk" else "2,3.5,5,8"
            name = "k" if arch == "topk" else "l1_coefficient"
            # Not compiled: one compilation per SAE does not pay back at this budget.
            extras.append(
                replace(
                    base,
                    label=f"drrik-sweep-{arch}",
                    arch=arch,
                    sweep=f"{name}={values}",
                    **{**fast, "compile_sae": False},
                )
            )
    if args.flatness:
        arch = archs[0]
        extras.append(
            replace(
                base,
                label=f"drrik-10x-{arch}",
                arch=arch,
                tokens=args.tokens * 10,
                log_every_steps=25,
                model_dtype=args.drrik_model_dtype,
                autocast=args.drrik_autocast,
                compile_sae=arch in compile_archs,
            )
        )

    from floor import measure_floor

    models = {dt: load_model(model_dir, dtype=dt) for dt in ("float32", "bfloat16")}
    floor_kwargs = {
        "model_dir": model_dir,
        "hook": args.hook,
        "context_size": args.context_size,
        "prompts": args.prompts,
        "batch_tokens": args.train_batch,
        "d_sae": args.d_sae,
        "archs": tuple(archs),
        "k": args.k,
        "l1_coefficient": args.l1_coefficient,
        "models": models,
        "compile_archs": tuple(compile_archs),
    }
    floors = []
    if not args.skip_floor:
        floors.append(measure_floor(rounds=args.floor_rounds, **floor_kwargs))
    runs: dict[str, dict[str, Any]] = {}
    for rep in range(args.repeats):  # alternate the order so that load drifts hit all alike
        for spec in (specs + extras) if rep == 0 else specs if rep % 2 == 0 else specs[::-1]:
            label = spec.label if rep == 0 else f"{spec.label}.{rep}"
            run_spec = replace(spec, label=label, out_dir=str(work / "runs" / label))
            shutil.rmtree(run_spec.out_dir, ignore_errors=True)
            python = sae_python if spec.tool == "saelens" else sys.executable
            result = run_worker(run_spec, python, work)
            if rep == 0:
                runs[spec.label] = {"spec": asdict(spec), **result, "repeats": []}
            runs[spec.label]["repeats"].append(
                (round(result["tokens_per_s"], 1), result["loop_cores_used"])
            )
    for run in runs.values():
        # Other work on a shared machine only ever slows a run down: the fastest repeat is the
        # best estimate of the tool's speed (as timeit takes the minimum). The first repeat's
        # SAE is the one evaluated.
        run["tokens_per_s"], run["loop_cores_used"] = max(run["repeats"])
    if not args.skip_floor:
        floors.append(measure_floor(rounds=args.floor_rounds, **floor_kwargs))

    print("evaluating every SAE on the same held-out contexts ...", flush=True)
    dirs = {
        f"{label}/{name}" if len(r["sae_dirs"]) > 1 else label: (args.hook, path)
        for label, r in runs.items()
        for name, path in r["sae_dirs"].items()
    }
    metrics = evaluate_saes(models["float32"], data_dir, dirs)
    result = build_result(args, runs, metrics, floors, model_dir)
    (work / "last_result.json").write_text(json.dumps(result, default=str))
    from machine import machine_info, write_results

    result["machine"] = machine_info("cpu")
    result["machine"]["saelens_env"] = runs_versions(sae_python) if sae_python else None
    write_results("compare_saelens-cpu", result, markdown(result), args.out)


def runs_versions(
    python: str, dists: tuple[str, ...] = ("sae-lens", "transformer-lens", "torch", "transformers")
) -> dict[str, str]:
    """Package versions inside another environment (the SAELens one by default)."""
    code = (
        "import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in "
        f"{dists!r}}}))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def flatness(run: dict[str, Any]) -> dict[str, Any]:
    """Throughput and RSS early in a long run against late in it (first and last fifth)."""
    windows = [tps for _, tps in run["throughput_windows"]][1:]  # the first holds warm-up
    fifth = max(1, len(windows) // 5)
    lo, hi = run["loop_window_s"]
    span = hi - lo
    rss = [(t, v) for t, v in run["rss_timeline"] if lo <= t <= hi]
    early = [v for t, v in rss if t <= lo + span / 5]
    late = [v for t, v in rss if t >= hi - span / 5]
    return {
        "tokens_per_s_first_fifth": round(statistics.median(windows[:fifth]), 1),
        "tokens_per_s_last_fifth": round(statistics.median(windows[-fifth:]), 1),
        "rss_mib_first_fifth_max": round(max(early, default=0.0), 1),
        "rss_mib_last_fifth_max": round(max(late, default=0.0), 1),
    }


def merge_floors(floors: list[dict[str, Any]]) -> dict[str, float]:
    """Median over every round of every floor measurement."""
    if not floors:
        return {}
    names = floors[0]["tokens_per_s_rounds"]
    return {
        n: round(statistics.median(x for f in floors for x in f["tokens_per_s_rounds"][n]), 1)
        for n in names
    }


def build_result(
    args: argparse.Namespace,
    runs: dict[str, dict[str, Any]],
    metrics: dict[str, dict[str, float]],
    floors: list[dict[str, Any]],
    model_dir: str,
) -> dict[str, Any]:

    floor = merge_floors(floors)
    summary: dict[str, Any] = {}
    for label, run in runs.items():
        spec = run["spec"]
        n_saes = len(run["sae_dirs"])
        row: dict[str, Any] = {"tokens_per_s": round(run["tokens_per_s"], 1), "n_saes": n_saes}
        step_name = f"step {spec['arch']} {'bf16 autocast' if spec['autocast'] else 'fp32'}"
        fwd, step = floor.get(f"forward {spec['model_dtype']}"), floor.get(step_name)
        if fwd and step and spec["tool"] == "drrik":
            # The floor's time for the loop's work: the forwards it ran (special tokens
            # included, as the floor's forward counts them), then one step per SAE per batch
            # at the main config's step cost (exact for an L1 sweep; a k sweep's larger k cost
            # more, so its share reads high).
            trained = run["training_tokens"]
            floor_s = run["forward_tokens_in_loop"] / fwd + n_saes * trained / step
            row["serial_floor_tokens_per_s"] = round(trained / floor_s, 1)
            row["share_of_floor"] = round(run["tokens_per_s"] / row["serial_floor_tokens_per_s"], 3)
        single = runs.get(f"drrik-{spec['arch']}")
        if n_saes > 1 and single:
            # Each SAE sees every token: n SAEs cost this much of n separate runs.
            row["sae_tokens_per_s"] = round(run["tokens_per_s"] * n_saes, 1)
            row["cost_vs_separate_runs"] = round(
                single["tokens_per_s"] / (n_saes * run["tokens_per_s"]), 3
            )
        if spec["tokens"] > args.tokens:
            row.update(flatness(run))
        summary[label] = row
    for arch in args.archs.split(","):
        ref = runs.get(f"saelens-{arch}")
        for label, run in runs.items():
            spec = run["spec"]
            if ref and spec["tool"] == "drrik" and spec["arch"] == arch and not spec["sweep"]:
                summary[label]["speedup_vs_saelens"] = round(
                    run["tokens_per_s"] / ref["tokens_per_s"], 3
                )
    return {
        "benchmark": "compare_saelens",
        "model": "smollm2-135m (embedded SmolLM2-135M-Instruct, dequantized)",
        "model_dir": model_dir,
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("worker", "spec", "result")
        },
        "floor_tokens_per_s": floor,
        "summary": summary,
        "eval": metrics,
        "runs": {
            label: {k: v for k, v in r.items() if k != "rss_timeline"} for label, r in runs.items()
        },
        "rss_timelines": {label: r.get("rss_timeline", []) for label, r in runs.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        "## SAELens vs drrik: same model, hook, contexts, SAE, batch, budget, lr, seed (CPU)",
        "",
        f"SmolLM2-135M, `{s['hook']}`, contexts of {s['context_size']} tokens (BOS first, "
        f"special tokens not trained on), {s['prompts']} contexts per forward, d_sae "
        f"{s['d_sae']}, batch {s['train_batch']}, {s['tokens']:,} training tokens, lr {s['lr']}, "
        f"L1 {s['l1_coefficient']} (relu), k {s['k']} (topk), seed {s['seed']}. drrik: LM in "
        f"{s['drrik_model_dtype']}, SAE step "
        f"{'under bf16 autocast' if s['drrik_autocast'] else 'fp32'}, torch.compile for "
        f"{s['drrik_compile'] or 'none'} (not for sweeps); SAELens: its defaults "
        "(fp32 LM and SAE) unless the label says bf16.",
        "",
        "Training tokens/s: activations trained on per second of the training loop (set-up, "
        "model load and final save excluded); end-to-end excludes only the model load. Peak RSS "
        "includes the model. Eval: drrik's evaluator, fp32 model, "
        f"{s['eval_contexts']} held-out contexts, the same for every SAE.",
        "",
        "| run | train tok/s | cores | vs SAELens | share of floor | end-to-end tok/s | set-up s "
        "| peak RSS MiB loop / all | EV | L0 | dead | CE rec. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in result["runs"].items():
        row = result["summary"][label]
        names = [n for n in result["eval"] if n == label or n.startswith(label + "/")]
        for i, name in enumerate(names):
            e = result["eval"][name]
            first = i == 0
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        f"{row['tokens_per_s']:,.0f}" if first else "",
                        f"{run['loop_cores_used']:.2f}" if first else "",
                        f"{row['speedup_vs_saelens']:.2f}x"
                        if first and "speedup_vs_saelens" in row
                        else "",
                        f"{row['share_of_floor']:.0%}" if first and "share_of_floor" in row else "",
                        f"{run['tokens_per_s_end_to_end']:,.0f}" if first else "",
                        f"{run['setup_s']:.1f}" if first else "",
                        f"{run['peak_rss_in_loop_mib']:,.0f} / {run['peak_rss_mib']:,.0f}"
                        if first
                        else "",
                        f"{e['explained_variance']:.3f}",
                        f"{e['l0']:.1f}",
                        f"{e['dead_features']}",
                        f"{e['ce_loss_recovered']:.3f}",
                    ]
                )
                + " |"
            )
    for label, row in result["summary"].items():
        if "cost_vs_separate_runs" in row:
            lines.append(
                f"\n{label}: {row['n_saes']} SAEs from one stream at {row['tokens_per_s']:,.0f} "
                f"tokens/s each ({row['sae_tokens_per_s']:,.0f} SAE-tokens/s): "
                f"{row['cost_vs_separate_runs']:.0%} of the time of {row['n_saes']} separate runs"
                + (
                    f", {row['share_of_floor']:.0%} of its floor (one forward, then "
                    f"{row['n_saes']} steps at the single run's step cost)."
                    if "share_of_floor" in row
                    else "."
                )
            )
        if "tokens_per_s_first_fifth" in row:
            lines.append(
                f"\n{label} ({result['runs'][label]['training_tokens']:,} tokens): "
                f"{row['tokens_per_s_first_fifth']:,.0f} tokens/s in the first fifth of the loop, "
                f"{row['tokens_per_s_last_fifth']:,.0f} in the last; peak RSS "
                f"{row['rss_mib_first_fifth_max']:,.0f} MiB in the first fifth, "
                f"{row['rss_mib_last_fifth_max']:,.0f} MiB in the last."
            )
    floor = result["floor_tokens_per_s"]
    if floor:
        lines += [
            "",
            "Floor, each measured alone (medians of rounds before and after the runs):",
            "",
        ]
        lines += ["| measured alone | tokens/s |", "|---|---:|"]
        lines += [f"| {n} | {v:,.0f} |" for n, v in floor.items()]
    sl = m.get("saelens_env") or {}
    lines += [
        "",
        f"{m['date']}; {m['cpu']}, {m['cores']} cores, load average {m['load_average_1min']}; "
        f"drrik env: torch {m['torch']}, transformers {m['transformers']}, transformer-lens "
        f"{m['transformer-lens']}; SAELens env: " + ", ".join(f"{k} {v}" for k, v in sl.items()),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
