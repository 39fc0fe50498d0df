"""Feature-parallel dictionaries under torchrun (gloo, CPU): the features of one dictionary split
over two ranks train the same dictionary as one process holding them all.

One process with two data shards, and two processes each streaming one shard and holding half
the features (``--feature-parallel 2``), see the same global batch in the same order; they
differ in summation order only (the decoder's output and the L1 are sums of two halves), so the
saved dictionaries agree to float tolerance. Resuming reslices a checkpoint to another slice
count; a killed rank stops the job with its last checkpoint whole.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_distributed import (
    WAIT_S,
    _args,
    _assert_close,
    _env,
    _single,
    _torchrun,
    _weights,
    kill_one_rank,
    wait_for_checkpoint,
)

from drrik.config import RunConfig
from drrik.errors import ConfigError
from drrik.learner import Learner
from drrik.run import slice_part
from drrik.run_dir import RunDir
from drrik.sae import SAEConfig
from drrik.sae.feature_shards import FeatureShards
from drrik.sae.spec import DictionarySpec
from drrik.training_config import DistributedConfig, TrainerConfig

SHORT = ("--training-tokens", "2560", "--checkpoint-every-tokens", "1024")
CASES = {
    "relu": "--architecture relu --expansion-factor 4",
    # A short dead-feature window, so that AuxK (a global top-k of its own) runs. At k 8 both
    # take the sparse CPU path; at k 16 each slice of 128 features takes the dense one.
    "topk": "--architecture topk --k 8 --expansion-factor 4 --dead-feature-window 512",
    "topk-dense": "--architecture topk --k 16 --expansion-factor 4 --dead-feature-window 512",
    "batchtopk": "--architecture batchtopk --k 8 --expansion-factor 4",
    # Thresholds start at each slice's quantiles of rank 0's sample; the L0 controller reads
    # the L0 summed over slices.
    "jumprelu-target-l0": "--architecture jumprelu --target-l0 8 --expansion-factor 4",
}


@pytest.fixture(scope="module")
def pairs(tiny_model_dir: Path, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``case -> (one process with two data shards, two feature slices)`` run directories,
    each pair trained once for the module."""
    done: dict[str, tuple[Path, Path]] = {}

    def pair(case: str) -> tuple[Path, Path]:
        if case not in done:
            root = tmp_path_factory.mktemp(case)
            one, two = root / "one", root / "two"
            args = (*CASES[case].split(), *SHORT)
            split = _args(tiny_model_dir, corpus_dir, two, *args, "--feature-parallel", "2")
            job = _torchrun(split, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            single = _single(_args(tiny_model_dir, corpus_dir, one, *args, "--data-shards", "2"))
            output, _ = job.communicate(timeout=WAIT_S)
            assert single.returncode == 0, single.stderr[-2000:]
            assert job.returncode == 0, output[-3000:]
            done[case] = one, two
        return done[case]

    return pair


def _numel(tree: dict) -> int:
    """Entries of the tensors in ``tree`` (scalars, Adam's step counts, left out)."""
    return sum(t.numel() for t in tree.values() if isinstance(t, torch.Tensor) and t.dim())


@pytest.mark.parametrize("case", list(CASES))
def test_two_feature_slices_train_the_same_dictionary_as_one_process(
    case: str, pairs: Callable[[str], tuple[Path, Path]]
) -> None:
    """Same dictionary; and each rank holds half of its per-feature parameters and of their
    Adam moments (what it checkpoints is what it holds), with only b_dec whole on both."""
    one, two = pairs(case)
    whole = _weights(one)
    assert whole["W_enc"].shape == (64, 256)
    _assert_close(whole, _weights(two))
    whole_state = torch.load(RunDir(one).latest_checkpoint().path / "state.pt", weights_only=True)
    full = whole_state["slots"][0]
    latest = RunDir(two).latest_checkpoint()
    halves = [torch.load(latest.path / slice_part(0, j, 2), weights_only=True) for j in range(2)]
    b_dec = full["sae"]["b_dec"].numel()
    for half in halves:
        assert half["sae"]["W_enc"].shape == (64, 128)
        assert half["sae"]["W_dec"].shape == (128, 64)
        assert _numel(half["sae"]) - b_dec == (_numel(full["sae"]) - b_dec) // 2
        moments = sum(_numel(s) for s in half["optimizer"]["state"].values())
        full_moments = sum(_numel(s) for s in full["optimizer"]["state"].values())
        assert moments - 2 * b_dec == (full_moments - 2 * b_dec) // 2
    assert not torch.equal(halves[0]["sae"]["W_dec"], halves[1]["sae"]["W_dec"])


def test_a_data_by_features_mesh_trains_the_same_dictionary_as_one_process(
    tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """Four processes: two copies of the data path, each splitting the features in two."""
    args = (*CASES["topk"].split(), *SHORT)
    four = tmp_path / "four"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
        "-m", "drrik", *_args(tiny_model_dir, corpus_dir, four, *args, "--feature-parallel", "2"),
    ]  # fmt: skip
    mesh = subprocess.Popen(command, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    single = _single(
        _args(tiny_model_dir, corpus_dir, tmp_path / "one", *args, "--data-shards", "4")
    )
    output, _ = mesh.communicate(timeout=WAIT_S)
    assert single.returncode == 0, single.stderr[-2000:]
    assert mesh.returncode == 0, output[-3000:]
    _assert_close(_weights(tmp_path / "one"), _weights(four))


def test_a_feature_parallel_run_resumes_on_another_slice_count(
    tiny_model_dir: Path,
    corpus_dir: Path,
    tmp_path: Path,
    pairs: Callable[[str], tuple[Path, Path]],
) -> None:
    """Stopped with two slices, it finishes in one process holding all features, as an
    uninterrupted two-slice run does."""
    flags = (*CASES["topk"].split(), *SHORT)
    _, two = pairs("topk")
    out = tmp_path / "stopped"
    job = _torchrun(
        _args(tiny_model_dir, corpus_dir, out, *flags, "--feature-parallel", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for_checkpoint(job, out)
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=WAIT_S)
    resumed = _single(["train", "--resume", str(out), "--feature-parallel", "1"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    _assert_close(_weights(out), _weights(two))


def test_a_killed_rank_stops_the_feature_parallel_job(
    tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """Also resampling on slices (each draws inputs for its own dead features, so there is no
    equality with one process to check): the job trains through it to its first checkpoint."""
    out = tmp_path / "killed"
    args = _args(tiny_model_dir, corpus_dir, out, *CASES["topk"].split(), "--feature-parallel",
                 "2", "--resample-every-tokens", "1024", "--training-tokens", "200000")  # fmt: skip
    manifest = kill_one_rank(args, out)
    assert {slice_part(0, j, 2) for j in range(2)} <= manifest["files"].keys()
    assert manifest["tokens"] > 1024  # past the resampling


# -- bad input, before anything loads ---------------------------------------------------------


def _config(**sae: object) -> RunConfig:
    return RunConfig(
        sae=SAEConfig(**sae),  # type: ignore[arg-type]
        distributed=DistributedConfig(feature_parallel=3),
    )


@pytest.mark.parametrize(
    ("sae", "says"),
    [
        ({"d_sae": 1024}, "must divide the dictionary's width d_sae=1024"),
        ({"d_sae": 48, "architecture": "topk", "k": 32}, "k must be at most"),
        ({"d_sae": 48 * 3, "architecture": "gated"}, "gated trains with all its features"),
        ({"d_sae": 144, "architecture": "relu", "use_ghost_grads": True}, "ghost grads"),
    ],
)
def test_bad_feature_parallel_configs_are_refused(sae: dict, says: str) -> None:
    with pytest.raises(ConfigError, match="feature_parallel") as caught:
        _config(**sae)
    assert says in str(caught.value)


def test_a_mesh_that_does_not_match_the_process_count_is_refused(
    tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """One process cannot hold a two-rank mesh; it says so before the model loads."""
    done = _single(_args(tiny_model_dir, corpus_dir, tmp_path / "r", "--feature-parallel", "2"))
    assert done.returncode != 0
    assert "feature_parallel" in done.stderr and "multiple of 2 processes" in done.stderr
    assert not (tmp_path / "r").exists()


def test_resuming_on_a_slice_count_the_width_refuses(
    tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """The saved config is checked against the new slice count before any process group."""
    out = tmp_path / "run"
    done = _single(_args(tiny_model_dir, corpus_dir, out, "--d-sae", "256", *SHORT))
    assert done.returncode == 0, done.stderr[-2000:]
    again = _single(["train", "--resume", str(out), "--feature-parallel", "3"])
    assert again.returncode != 0
    assert "must divide the dictionary's width d_sae=256" in again.stderr


# -- reslicing a checkpoint, in one process ----------------------------------------------------


def _learner(features: FeatureShards | None) -> Learner:
    """A jumprelu learner (a per-feature threshold besides the shared tensors), one step in,
    so that its Adam moments exist; the same seed gives the same whole dictionary."""
    torch.manual_seed(0)
    cfg = SAEConfig(architecture="jumprelu", d_in=8, d_sae=12)
    spec = DictionarySpec("s", ("h",), ("h",), cfg)
    learner = Learner.build(spec, TrainerConfig(), 4, torch.device("cpu"), features)
    if features is None:
        out = learner.sae.training_forward(torch.randn(16, 8), 0.1)
        out.loss.backward()
        learner.optimizer.step()
        learner.tracker.record(out.fired(), 16)
    return learner


def test_a_checkpoint_reslices_to_any_count_that_divides_the_width() -> None:
    """A whole state cut into three slices, and three slices joined into one, give back the
    whole: parameters, Adam moments and dead-feature counters alike."""
    whole = _learner(None).state_dict()
    thirds = []
    for index in range(3):
        sliced = _learner(FeatureShards(index, 3, None, (0, 1, 2)))
        state = sliced.resliced([whole])
        assert state["sae"]["W_enc"].shape == (8, 4)
        assert torch.equal(
            state["sae"]["W_enc"], whole["sae"]["W_enc"][:, 4 * index : 4 * index + 4]
        )
        assert torch.equal(state["sae"]["b_dec"], whole["sae"]["b_dec"])
        sliced.load_state_dict(state)
        thirds.append(sliced.state_dict())
    joined = _learner(None).resliced(thirds)
    for key in ("W_enc", "W_dec", "b_enc", "b_dec", "log_threshold"):
        assert torch.equal(joined["sae"][key], whole["sae"][key]), key
    for i, moments in whole["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(joined["optimizer"]["state"][i][name], moments[name]), (i, name)
    tracker = whole["tracker"]["tokens_since_fired"]
    assert torch.equal(joined["tracker"]["tokens_since_fired"], tracker)
