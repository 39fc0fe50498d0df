"""The GPU path, tested without a GPU (issue 17).

What differs on CUDA is played on the CPU by the stand-ins of ``tests/standins.py``: NCCL's
rule that collectives take tensors on the rank's GPU, tensors spread over several GPUs, fewer
GPUs at resume, CUDA autocast's float32 list. What only a GPU can show is in
``benchmarks/gpu_suite.sh``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from standins import (
    CheckedDistributed,
    CudaAutocastPolicy,
    HostTensors,
    SpreadModel,
    VirtualDevices,
    place,
    tensors_in,
    vdev,
)
from test_trainer import BATCH, HOOK
from test_trainer import run_config as trainer_run_config

import drrik.model
import drrik.rng
from drrik.assemble import assemble
from drrik.config import RunConfig, TrainerConfig
from drrik.distributed import Distributed
from drrik.errors import ConfigError
from drrik.evaluate import EvalTarget, evaluate, evaluate_together
from drrik.learner import Learner
from drrik.mixing_buffer import MixingBuffer
from drrik.pipeline import train, train_run
from drrik.run_dir import RunDir
from drrik.sae import SAEConfig, build_sae
from drrik.store import ActivationsStore

pytestmark = pytest.mark.usefixtures("one_thread")


def run_config(out: Path, model_dir: Path, **sections: dict[str, Any]) -> RunConfig:
    """test_trainer's small topk run, 8 steps long; ``sections`` override fields."""
    sections["trainer"] = {"training_tokens": BATCH * 8, **sections.get("trainer", {})}
    return trainer_run_config(out, model_dir, **sections)


# -- a pretend two-GPU job: what the collectives get (items 1, 4, 5, 8, 13e) -----------------


class _Job:
    def __init__(self, dist: CheckedDistributed, host: HostTensors, out: Path) -> None:
        self.dist, self.host, self.out = dist, host, out
        self.from_python_in_steps: list[str] = []


@pytest.fixture(scope="module")
def job(tiny_model: Any, tiny_model_dir: Path, docs: Dataset, tmp_path_factory: Any) -> _Job:
    """Rank 0 of two trains with an eval, a resample and checkpoints on the way."""
    out = tmp_path_factory.mktemp("job") / "run"
    dist, host = CheckedDistributed(), HostTensors()
    result = _Job(dist, host, out)
    global_batch = 2 * BATCH
    cfg = run_config(
        out,
        tiny_model_dir,
        trainer={"resample_every_tokens": global_batch * 3, "dead_feature_window": 64},
        eval={"eval_every_tokens": global_batch * 4},
        checkpoint={"checkpoint_every_tokens": global_batch * 4},
    )
    train_step = Learner.step

    def watched(self: Learner, *args: Any) -> None:
        before = len(host.from_python)
        train_step(self, *args)
        result.from_python_in_steps += host.from_python[before:]

    with pytest.MonkeyPatch.context() as mp:
        dist.install(mp)
        mp.setattr(Learner, "step", watched)
        with host:
            train(cfg, model=tiny_model, dataset=docs, verbose=False)
    return result


def test_collectives_take_only_tensors_on_the_training_device(job: _Job) -> None:
    """Item 1: the norm-scale average, the stop/timer agreement and the resample broadcast
    (Adam's step is a host scalar) handed CPU tensors to NCCL."""
    assert job.dist.calls.count("all_reduce") > 10
    assert "broadcast" in job.dist.calls  # the initial broadcast and the resample's


def test_checkpoints_gather_names_and_checksums_not_buffers(job: _Job) -> None:
    """Item 4: each rank writes its own store part; rank 0 lists it in the manifest."""
    assert "gather_object" in job.dist.calls
    checkpoint = RunDir(job.out).latest_checkpoint()
    assert checkpoint is not None
    latest, manifest = checkpoint.path, checkpoint.manifest
    assert set(manifest["files"]) == {"state.pt", "store-00000.pt"}
    state = torch.load(latest / "state.pt", weights_only=True)
    assert "stores" not in state and state["store_parts"][0] == "store-00000.pt"
    assert not list((job.out / "checkpoints").glob(".parts-*"))


def test_rank_zero_work_is_waited_for_outside_the_training_group(job: _Job) -> None:
    """Item 5: other ranks wait for rank 0's evals, saves and final work on the long-timeout
    gloo group, never in an NCCL barrier; item 13e: the process group is destroyed."""
    calls = job.dist.calls
    assert "barrier" not in calls
    waits = calls.count("wait_for_main")
    # start-up, the eval and the checkpoint at the last step (512 tokens), the final work
    assert waits == 4, calls
    assert calls[-2:] == ["wait_for_main", "destroy"]


def test_the_training_step_makes_no_tensor_from_python_data(job: _Job) -> None:
    """Item 8: a tensor made from a Python number is a host-to-device copy that waits."""
    assert [made for made in job.from_python_in_steps if made.startswith("drrik")] == []


# -- evaluation with the model spread over GPUs (item 2) -------------------------------------


def test_evaluation_with_the_model_spread_over_gpus(tiny_model: Any) -> None:
    tokens = torch.randint(100, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = tiny_model.tokenizer.bos_token_id
    exclude = torch.tensor([tiny_model.tokenizer.bos_token_id])
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", k=4, d_in=64, d_sae=96)).eval()
    expected, _ = evaluate(tiny_model, [EvalTarget("s", HOOK, sae, 2.0)], [tokens], exclude)
    mode = VirtualDevices()
    for tensor in [*sae.parameters(), *sae.buffers()]:
        place(tensor, torch.device("cuda", 3))
    try:
        with mode:
            spread = SpreadModel(tiny_model, mode)
            got, densities = evaluate(spread, [EvalTarget("s", HOOK, sae, 2.0)], [tokens], exclude)
            together = evaluate_together(
                spread, [EvalTarget("s", HOOK, sae, 2.0)], [tokens], exclude
            )
    finally:
        for tensor in [*sae.parameters(), *sae.buffers()]:
            place(tensor, None)
    assert got["s"] == pytest.approx(expected["s"], rel=1e-5)
    assert together == pytest.approx({k: expected["s"][k] for k in together}, rel=1e-5)
    assert densities["s"].shape == (96,)


def test_the_device_stand_in_catches_a_mismatch(tiny_model: Any) -> None:
    """The stand-in raises where CUDA would: an index on one GPU into a tensor on another."""
    with VirtualDevices():
        a = torch.ones(3).to("cuda:0")
        mask = torch.tensor([True, False, True]).to("cuda:1")
        with pytest.raises(RuntimeError, match="cuda:0 and cuda:1"):
            a[mask]
        assert a.device == torch.device("cuda", 0)
        assert a[mask.to(a.device)].shape == (2,) and a[mask.cpu()].shape == (2,)


# -- resume with fewer GPUs (item 3) ---------------------------------------------------------


def test_rng_state_restores_with_fewer_gpus_than_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    restored: dict[int, torch.Tensor] = {}

    def set_rng_state(state: torch.Tensor, device: int | str = "cuda") -> None:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")
        restored[index] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
    state = drrik.rng.rng_state()
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # saved with 4 GPUs
    drrik.rng.set_rng_state({**state, "cuda": saved})
    assert list(restored) == [0] and torch.equal(restored[0], saved[0])


# -- evaluation memory with a 128k vocabulary (item 6) ---------------------------------------

VOCAB = 131072
EVAL_BATCH, EVAL_CTX = 8, 32


@pytest.fixture(scope="module")
def big_vocab_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer, 64-wide random Llama with a 128k vocabulary and an untied head."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("big-vocab")
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(out)
    return out


_PEAK_SCRIPT = """
import sys, torch
from drrik.evaluate import EvalTarget, evaluate
from drrik.model import load_model
from drrik.sae import SAEConfig, build_sae
torch.set_num_threads(1)
model = load_model(sys.argv[1])
sae = build_sae(SAEConfig(architecture="relu", d_in=64, d_sae=128)).eval()
g = torch.Generator().manual_seed(0)
def batch(n, ctx):
    tokens = torch.randint(100, 40000, (n, ctx), generator=g)
    tokens[:, 0] = 1
    return tokens
targets = [EvalTarget("a", "blocks.0.hook_resid_post", sae)]
evaluate(model, targets, [batch(1, 8)], torch.tensor([1]))  # warm-up
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the resident-set peak (VmHWM) to the current size
base = status_kib("VmRSS")
evaluate(model, targets, [batch({batch_size}, {ctx})], torch.tensor([1]))
print((status_kib("VmHWM") - base) * 1024)
"""


def test_eval_peak_memory_stays_near_two_logits_with_a_128k_vocabulary(
    big_vocab_dir: Path,
) -> None:
    """Item 6: before, a batch held the logits and four or more float32 copies of them."""
    script = _PEAK_SCRIPT.format(batch_size=EVAL_BATCH, ctx=EVAL_CTX)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(big_vocab_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.split()[-1])
    logits = EVAL_BATCH * EVAL_CTX * VOCAB * 4
    assert growth > logits / 2, "the peak did not see the batch's logits"
    assert growth < 3 * logits, f"peak grew by {growth / logits:.1f}x one batch's logits"


# -- configuration refused or resolved (items 7, 13a-d) --------------------------------------


def test_float16_sae_parameters_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot train in float16") as caught:
        RunConfig(sae=SAEConfig(dtype="float16"), out=str(tmp_path))
    assert "\n" not in str(caught.value)
    RunConfig(sae=SAEConfig(dtype="bfloat16"), out=str(tmp_path))


def test_tf32_is_allowed_for_cuda_matmuls_only() -> None:
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "none"
        drrik.model.use_tf32_matmuls(torch.device("cpu"))
        assert matmul.fp32_precision == "none"
        drrik.model.use_tf32_matmuls(torch.device("cuda", 0))
        assert matmul.fp32_precision == "tf32"
        matmul.fp32_precision = "ieee"  # a user's explicit choice stays
        drrik.model.use_tf32_matmuls(torch.device("cuda", 0))
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_asks_the_target_gpu_for_native_bf16(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[Any] = []

    class Device:
        def __init__(self, device: torch.device) -> None:
            asked.append(device)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    def supported(including_emulation: bool = True) -> bool:
        return native or including_emulation  # a V100: emulated only

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert drrik.model.resolve_dtype("auto", "cuda:1") == ("bfloat16" if native else "float32")
    assert asked == [torch.device("cuda", 1)]


@pytest.mark.parametrize("native", [True, False])
def test_unset_autocast_is_on_exactly_where_bf16_is_native(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path is the default where it is fast, saved resolved; a choice is kept."""
    import drrik.assemble

    monkeypatch.setattr(drrik.assemble, "native_bfloat16", lambda device: native)
    assert drrik.assemble.resolved_config(RunConfig(), Distributed()).trainer.autocast is native
    for chosen in (True, False):
        cfg = RunConfig(trainer=TrainerConfig(autocast=chosen))
        assert drrik.assemble.resolved_config(cfg, Distributed()).trainer.autocast is chosen


def test_an_explicit_gpu_index_is_refused_under_torchrun() -> None:
    rank1 = Distributed(rank=1, world_size=2, local_rank=1)
    assert rank1.device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="each rank takes cuda:LOCAL_RANK"):
        rank1.device("cuda:0")
    assert Distributed().device("cuda:0") == torch.device("cuda", 0)  # one process: as asked


def test_model_n_devices_is_refused_under_torchrun(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    CheckedDistributed().install(monkeypatch)
    cfg = run_config(tmp_path, tiny_model_dir, model={"model_n_devices": 2})
    with pytest.raises(ConfigError, match="model_n_devices=2.*single-process"):
        assemble(cfg, verbose=False)


# -- rank 0's long final work under a short collective timeout (item 5, real gloo) ----------

_SLOW_FINISH = """
import sys, time
from drrik import cli
from drrik import pipeline

export_run = pipeline.export_run

def slow_export(*args):
    time.sleep(15)  # rank 0 only: longer than the training group's 6 s timeout
    return export_run(*args)

pipeline.export_run = slow_export
sys.exit(cli.main(sys.argv[1:]))
"""


def test_other_ranks_outwait_a_final_save_longer_than_the_timeout(
    tiny_model_dir: Path, dataset_file: Path, tmp_path: Path
) -> None:
    script = tmp_path / "slow_finish.py"
    script.write_text(textwrap.dedent(_SLOW_FINISH))
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), "train",
        "--model", str(tiny_model_dir), "--dataset", str(dataset_file), "--hook", HOOK,
        "--architecture", "relu", "--training-tokens", "1024",
        "--train-batch-size-tokens", "128", "--n-batches-in-buffer", "4",
        "--store-batch-size-prompts", "4", "--context-size", "64", "--eval-contexts", "4",
        "--distributed-timeout-minutes", "0.1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (out / "final" / "sae_weights.safetensors").is_file()


# -- AuxK only when a feature can be dead (item 9) -------------------------------------------


@pytest.mark.parametrize("window", [0, BATCH * 3, 10**9])
def test_dead_feature_losses_run_only_when_a_feature_can_be_dead(
    window: int, tiny_model: Any, tiny_model_dir: Path, docs: Dataset, tmp_path: Path
) -> None:
    """On a GPU, TopK cannot ask whether a mask holds a dead feature without a sync, so it ran
    AuxK densely on every step; the trainer now passes no mask while its host-side bound on
    tokens-since-fired shows none can be dead."""
    cfg = run_config(tmp_path, tiny_model_dir, trainer={"dead_feature_window": window})
    run = assemble(cfg, model=tiny_model, dataset=docs, verbose=False)
    masks: list[torch.Tensor | None] = []
    slot = run.learners[0]
    forward = slot.forward

    def spy(x: torch.Tensor, coefficient: Any, dead: torch.Tensor | None, *rest: Any) -> Any:
        masks.append(dead)
        return forward(x, coefficient, dead, *rest)

    slot.forward = spy
    train_run(run)
    passed = [mask is not None for mask in masks]
    if window == 0:
        assert all(passed)
    elif window == BATCH * 3:
        # steps 1-2: at most 64 idle tokens; step 3 reads the log of step 2, whose bound
        # depends on what fired, so only the first two are certain.
        assert passed[:2] == [False, False] and len(passed) == 8
        for mask, was_passed in zip(masks, passed, strict=True):
            assert not was_passed or mask.dtype == torch.bool
    else:
        assert not any(passed)


# -- bf16 autocast keeps batch x d_sae tensors in bf16 (item 10) -----------------------------

D_SAE = 512


@pytest.mark.parametrize("arch", ["relu", "relu-ghost", "gated", "jumprelu", "topk", "batchtopk"])
def test_no_batch_by_features_tensor_would_be_upcast_by_cuda_autocast(arch: str) -> None:
    name, _, ghost = arch.partition("-")
    cfg = SAEConfig(architecture=name, d_in=64, d_sae=D_SAE, k=16, use_ghost_grads=bool(ghost))
    torch.manual_seed(0)
    sae = build_sae(cfg).train()
    sae.sparse_training = False  # the GPU's dense path
    x = torch.randn(48, 64)  # a batch unlike d_in, so no weight has a batch's shape
    dead = torch.arange(D_SAE) % 3 == 0
    policy = CudaAutocastPolicy(shape=(48, D_SAE))
    with policy, torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_forward(x, 1.0, dead)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert policy.upcast == []


# -- the mixing buffer on a GPU, and feeding one from the CPU (items 11, 12) -----------------


def _filled_buffer(pin_memory: bool = False) -> MixingBuffer:
    buffer = MixingBuffer(
        256,
        {"h": 8},
        dtype=torch.float32,
        device="cpu",
        mix_fraction=0.5,
        batch_size=32,
        seed=0,
        pin_memory=pin_memory,
    )
    buffer.add({"h": torch.arange(256 * 8.0).view(256, 8)}, torch.arange(256))
    return buffer


class _NewOnDevice(VirtualDevices):
    """Lists ops that allocate at least ``numel`` elements on a pretend GPU (not views)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.allocated = numel, []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        out = super().__torch_function__(func, types, args, kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tensors_in((args, kwargs))}
        for tensor in tensors_in(out):
            new = tensor.untyped_storage().data_ptr() not in inputs
            if new and vdev(tensor) is not None and tensor.numel() >= self.numel:
                self.allocated.append(getattr(func, "__name__", str(func)))
        return out


def test_shuffle_and_state_dict_allocate_no_buffer_copy_on_the_device() -> None:
    """Item 12: the shuffle's permuted copy and state_dict's clone sat on the GPU, next to the
    buffer (2-3x its memory reserved)."""
    buffer = _filled_buffer()
    served = []
    mode = _NewOnDevice(numel=256 * 8 // 2)
    with mode:
        gpu = torch.device("cuda", 0)
        for tensor in (*buffer.acts.values(), buffer.tokens, buffer.order):
            place(tensor, gpu)
        buffer.shuffle()
        state = buffer.state_dict()
        while buffer.batches_ready():
            served.append(buffer.next_batch()[1].cpu())
    assert mode.allocated == []
    assert state["tokens"].device == torch.device("cpu") and state["tokens"].shape == (256,)
    # the same rows as ever: the logical order is the permutation drawn from the seed
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat(served), perm[128:])
    assert torch.equal(state["tokens"], perm)


def test_a_cpu_buffer_feeding_a_gpu_is_pinned(
    tiny_model: Any, docs: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 11: an unpinned buffer (and an unpinned copy of each batch) made non_blocking
    copies to the GPU synchronous. Pinning needs CUDA, so the allocations are recorded."""
    pinned: list[bool] = []
    empty = torch.empty

    def recording_empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        if pin_memory:
            pinned.append(pin_memory)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)  # only pinned calls are counted
    cfg = run_config(Path("unused"), Path("unused"))
    cfg.store.act_store_device = "cpu"
    store = ActivationsStore(
        tiny_model, [HOOK], cfg.data, cfg.store, dataset=docs, device="cuda:0", verbose=False
    )
    assert store.buffer.pin_memory and pinned == [True, True]  # activations, token ids
    pinned.clear()
    buffer = _filled_buffer(pin_memory=True)
    buffer.shuffle()
    pinned.clear()
    buffer.next_batch()
    assert pinned == [True, True]  # the batch is gathered into pinned memory
    on_gpu = ActivationsStore(
        tiny_model, [HOOK], cfg.data, replace(cfg.store, act_store_device="sae"),
        dataset=docs, device="cpu", verbose=False,
    )  # fmt: skip
    assert not on_gpu.buffer.pin_memory and pinned == [True, True]


# -- torch.compile over a sweep (item 13f) ---------------------------------------------------


def test_a_compiled_sweep_with_a_warm_up_coefficient_stays_compiled() -> None:
    """Item 13f, a guard: on torch 2.13 a float coefficient that changes every warm-up step
    does not recompile per value, and 10 SAEs sharing training_forward's code stay under
    dynamo's recompile limit (8) instead of falling back to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled, ran = [], []

    def backend(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        compiled.append(graph)

        def run(*args: Any) -> Any:
            ran.append(1)
            return graph.forward(*args)

        return run

    saes = [build_sae(SAEConfig(architecture="relu", d_in=16, d_sae=32)) for _ in range(10)]
    forwards = [torch.compile(s.training_forward, backend=backend) for s in saes]
    x = torch.randn(8, 16)
    for step in range(5):
        for forward in forwards:
            forward(x, 5.0 * (step + 1) / 5, None)
    assert len(ran) == 50, "some calls ran eagerly (recompile limit hit)"
    assert len(compiled) <= 2
