"""Feature analysis: the streamed results equal a brute-force dense computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from saved_sae import HOOK, make_run, sparse_sae, text_file

from drrik.analysis import (
    AnalysisConfig,
    AnalysisResults,
    FeatureAnalyzer,
    analyze,
    logit_effects,
    sample_priority,
)
from drrik.cli import main
from drrik.data import SpecialTokens
from drrik.model import run_hooks
from drrik.sae import SAE, SAEConfig, build_sae
from drrik.saved import SavedSAE

N_CONTEXTS, LENGTH = 10, 24
CFG = AnalysisConfig(top_k=4, n_bands=2, band_samples=2, window=8, batch_size_prompts=3)


@pytest.fixture(scope="module")
def sae(tiny_model):
    return sparse_sae(tiny_model)


@pytest.fixture(scope="module")
def contexts(tiny_model) -> torch.Tensor:
    """Random tokens (no two contexts alike, so no ties), BOS first, some EOS/pad inside."""
    special = SpecialTokens.of(tiny_model.tokenizer)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 20_000, (N_CONTEXTS, LENGTH), generator=gen)
    tokens[:, 0] = special.bos
    tokens[::2, 7] = special.eos
    tokens[1::3, 15] = special.pad
    return tokens


def run_analysis(model, sae, contexts, cfg=CFG) -> AnalysisResults:
    batches = contexts.split(cfg.batch_size_prompts)
    return FeatureAnalyzer(model, sae, HOOK, cfg).run(batches)


def dense_feats(model, sae, contexts, ignore: bool) -> torch.Tensor:
    """The whole ``[contexts, positions, d_sae]`` matrix at once: the brute-force reference."""
    with torch.no_grad():
        feats = sae.encode(run_hooks(model, contexts, [HOOK])[HOOK]).float()
    if ignore:
        special = torch.tensor(SpecialTokens.of(model.tokenizer).ids())
        feats = feats * ~torch.isin(contexts, special)[..., None]
    return feats


@pytest.fixture(scope="module")
def results(tiny_model, sae, contexts) -> AnalysisResults:
    return run_analysis(tiny_model, sae, contexts)


@pytest.fixture(scope="module")
def brute(tiny_model, sae, contexts) -> torch.Tensor:
    return dense_feats(tiny_model, sae, contexts, ignore=True)


def test_statistics_equal_brute_force(results, brute, contexts, tiny_model):
    special = torch.tensor(SpecialTokens.of(tiny_model.tokenizer).ids())
    assert results.n_tokens == int((~torch.isin(contexts, special)).sum())
    count = (brute > 0).sum((0, 1))
    assert torch.equal(results.tensors["count"], count)
    assert 0 < int((count == 0).sum()) < brute.shape[-1]  # some dead features, not all
    torch.testing.assert_close(results.density, count.double() / results.n_tokens)
    mean = brute.sum((0, 1)).double() / count.clamp_min(1)
    torch.testing.assert_close(results.mean_activation, mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results.max_activation, brute.amax((0, 1)))
    assert torch.equal(results.tensors["hist"].sum(1).long(), count)


def test_top_contexts_equal_brute_force_and_hold_the_max_token(results, brute, contexts):
    ctx_max, ctx_pos = brute.max(dim=1)  # [contexts, d_sae]
    for f in range(brute.shape[-1]):
        active = (ctx_max[:, f] > 0).nonzero().flatten()
        expected = active[ctx_max[active, f].argsort(descending=True)][: CFG.top_k]
        examples = results.top_examples(f)
        assert [e.context for e in examples] == expected.tolist()
        for e in examples:
            assert e.position == int(ctx_pos[e.context, f])
            assert e.token_ids[e.max_index] == int(contexts[e.context, e.position])
            assert e.activations[e.max_index] == pytest.approx(e.activation, rel=1e-3)
            assert e.activation == pytest.approx(float(ctx_max[e.context, f]), rel=1e-6)
            assert max(e.activations) == pytest.approx(e.activation, rel=1e-3)
            assert len(e.token_ids) == CFG.window


def test_band_sample_equals_brute_force(results, brute):
    ctx_max = brute.amax(dim=1)
    priority = sample_priority(torch.arange(N_CONTEXTS), brute.shape[-1], CFG.seed)
    priority = priority.masked_fill(ctx_max <= 0, 2**40)
    for f in range(brute.shape[-1]):
        n_active = int((ctx_max[:, f] > 0).sum())
        chosen = priority[:, f].argsort()[: min(CFG.reservoir, n_active)]
        bands = results.band_examples(f)
        got = [e for _, examples in bands for e in examples]
        assert sorted(e.context for e in got) == sorted(chosen.tolist())
        acts = [e.activation for e in got]
        assert acts == sorted(acts, reverse=True)  # highest band first
        if n_active >= CFG.reservoir:
            assert [len(ex) for _, ex in bands] == [CFG.band_samples] * CFG.n_bands


def test_ignore_token_mask(tiny_model, sae, contexts, results):
    special = torch.tensor(SpecialTokens.of(tiny_model.tokenizer).ids())
    for f in range(sae.d_sae):
        for e in results.top_examples(f):
            assert int(contexts[e.context, e.position]) not in special.tolist()
    kept = run_analysis(
        tiny_model, sae, contexts, AnalysisConfig(**{**vars(CFG), "ignore_special_tokens": False})
    )
    raw = dense_feats(tiny_model, sae, contexts, ignore=False)
    assert kept.n_tokens == contexts.numel()
    assert torch.equal(kept.tensors["count"], (raw > 0).sum((0, 1)))
    assert not torch.equal(kept.tensors["count"], results.tensors["count"])


def test_logit_effects_match_direct_matmul(results, sae, tiny_model):
    scale = tiny_model.ln_final.weight.detach()
    effect = (sae.W_dec.detach() * scale) @ tiny_model.W_U.detach()
    k = results.tensors["logit_pos"].shape[1]
    top, bottom = effect.topk(k, dim=1), effect.topk(k, dim=1, largest=False)
    assert torch.equal(results.tensors["logit_pos_ids"], top.indices)
    assert torch.equal(results.tensors["logit_neg_ids"], bottom.indices)
    torch.testing.assert_close(results.tensors["logit_pos"], top.values)
    promoted, suppressed = results.logit_effects(0)
    assert promoted[0][0] == tiny_model.tokenizer.decode([int(top.indices[0, 0])])
    assert suppressed[0][1] == pytest.approx(float(bottom.values[0, 0]), rel=1e-5)


def test_results_are_independent_of_batch_size(tiny_model, sae, contexts, results):
    other = run_analysis(
        tiny_model, sae, contexts, AnalysisConfig(**{**vars(CFG), "batch_size_prompts": 4})
    )
    for key in ("count", "top_ctx", "top_pos", "band_ctx", "hist"):
        assert torch.equal(other.tensors[key], results.tensors[key]), key


def test_save_load_round_trip(results, tmp_path):
    results.save(tmp_path)
    loaded = AnalysisResults.load(tmp_path)
    assert loaded.meta == results.meta
    assert loaded.vocab == results.vocab
    for key, value in results.tensors.items():
        assert torch.equal(loaded.tensors[key], value), key
    assert loaded.top_examples(0) == results.top_examples(0)


def test_analyze_a_run_and_cli(tiny_model, tiny_model_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_model, tiny_model_dir, text_file(tmp_path / "docs.txt"))
    results = analyze(run, AnalysisConfig(n_tokens=160, batch_size_prompts=2), model=tiny_model)
    assert results.meta["n_contexts"] == 5  # ceil(160 / 32)
    assert SavedSAE.locate(run).load_analysis().tensors["count"].equal(results.tensors["count"])
    argv = [str(run), "--tokens", "64", "--batch-size-prompts", "2", "--logit-k", "3"]
    assert main(["analyze", *argv, "--seed", "7"]) == 0
    assert "analysed" in capsys.readouterr().out
    saved = AnalysisResults.load(run / "analysis")
    assert saved.meta["n_contexts"] == 2
    assert saved.meta["config"]["logit_k"] == 3 and saved.meta["config"]["seed"] == 7
    assert saved.tensors["logit_pos_ids"].shape[1] == 3


def test_locate_refuses_what_is_not_an_sae(tmp_path: Path):
    from drrik.errors import ConfigError

    with pytest.raises(ConfigError, match="expected a run directory"):
        SavedSAE.locate(tmp_path)


def test_logit_effects_follow_the_decoder_width(tiny_model):
    """Decoder rows live in the output's space: a transcoder writing the residual stream has
    logit effects, one writing MLP neurons (128 wide here) has none, whatever its input."""

    def transcoder(d_in: int, d_out: int) -> SAE:
        return build_sae(
            SAEConfig(
                architecture="relu", d_in=d_in, d_out=d_out, d_sae=8, apply_b_dec_to_input=False
            )
        )

    assert logit_effects(tiny_model, transcoder(64, 128), 3) == {}
    assert logit_effects(tiny_model, transcoder(128, 64), 3)["logit_pos"].shape == (8, 3)
