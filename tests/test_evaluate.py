"""Evaluation metric definitions, checked on SAEs built by hand whose answers are known.

A perfect SAE must score explained variance 1, CE loss recovered 1 and KL 0; an SAE that
outputs zeros is exactly zero-ablation (recovered 0); one that outputs the mean activation
explains no variance. A random SAE's reconstruction metrics are recomputed here from the raw
activations, which also checks that special-token positions are left out.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from drrik.evaluate import Baselines, EvalTarget, Evaluator, evaluate
from drrik.sae import SAE, SAEConfig, build_sae

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
D_IN = 64


@pytest.fixture(scope="module")
def contexts(tiny_model: Any) -> list[torch.Tensor]:
    """Two batches of random tokens opened by BOS, with one EOS inside (both excluded)."""
    g = torch.Generator().manual_seed(0)
    tok = tiny_model.tokenizer
    batches = []
    for _ in range(2):
        tokens = torch.randint(100, 5000, (3, 12), generator=g)
        tokens[:, 0] = tok.bos_token_id
        batches.append(tokens)
    batches[1][1, 5] = tok.eos_token_id
    return batches


@pytest.fixture(scope="module")
def exclude(tiny_model: Any) -> torch.Tensor:
    tok = tiny_model.tokenizer
    return torch.tensor(sorted({tok.bos_token_id, tok.eos_token_id}))


def kept_acts(model: Any, contexts: list[torch.Tensor], exclude: torch.Tensor) -> torch.Tensor:
    """The activations evaluation is defined over: non-special positions only."""
    rows = []
    for tokens in contexts:
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        rows.append(cache[HOOK][~torch.isin(tokens, exclude)].float())
    return torch.cat(rows)


def relu_sae(d_sae: int) -> SAE:
    sae = build_sae(SAEConfig(architecture="relu", d_in=D_IN, d_sae=d_sae))
    return sae.eval()


def identity_sae() -> SAE:
    """relu(x) - relu(-x) == x exactly: features [I, -I], decoder rows [I; -I]."""
    sae = relu_sae(2 * D_IN)
    eye = torch.eye(D_IN)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def constant_sae(value: torch.Tensor) -> SAE:
    """No feature ever fires; the reconstruction is ``b_dec`` for every token."""
    sae = relu_sae(16)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc):
            p.zero_()
        sae.b_dec.copy_(value)
    return sae


def run_eval(model: Any, contexts: list[torch.Tensor], exclude: torch.Tensor, **saes: Any) -> Any:
    targets = [
        EvalTarget(name, HOOK, *sae) if isinstance(sae, tuple) else EvalTarget(name, HOOK, sae)
        for name, sae in saes.items()
    ]
    return evaluate(model, targets, contexts, exclude)


def test_perfect_sae_scores_perfectly(
    tiny_model: Any, contexts: list[torch.Tensor], exclude: torch.Tensor
) -> None:
    metrics, densities = run_eval(
        tiny_model, contexts, exclude, perfect=identity_sae(), scaled=(identity_sae(), 2.5)
    )
    for name in ("perfect", "scaled"):
        m = metrics[name]
        assert m["ce_loss_zero_ablated"] > m["ce_loss_clean"], "ablation must hurt to define 1"
        assert m["explained_variance"] == pytest.approx(1.0, abs=1e-6)
        assert m["fvu"] == pytest.approx(0.0, abs=1e-6)
        assert m["mse"] == pytest.approx(0.0, abs=1e-9)
        assert m["cosine_similarity"] == pytest.approx(1.0, abs=1e-5)
        assert m["l2_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert m["ce_loss_with_sae"] == pytest.approx(m["ce_loss_clean"], abs=1e-5)
        assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
        assert m["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
        assert m["l0"] == pytest.approx(D_IN), "one of x_i > 0, -x_i > 0 fires per dimension"
    # Feature i fires where x_i > 0, feature D_IN + i where x_i < 0.
    x = kept_acts(tiny_model, contexts, exclude)
    want = torch.cat([(x > 0).float().mean(0), (x < 0).float().mean(0)])
    torch.testing.assert_close(densities["perfect"], want)


def test_zero_sae_is_zero_ablation_and_mean_sae_explains_nothing(
    tiny_model: Any, contexts: list[torch.Tensor], exclude: torch.Tensor
) -> None:
    x = kept_acts(tiny_model, contexts, exclude)
    metrics, densities = run_eval(
        tiny_model,
        contexts,
        exclude,
        zero=constant_sae(torch.zeros(D_IN)),
        mean=constant_sae(x.mean(0)),
    )
    zero, mean = metrics["zero"], metrics["mean"]
    assert zero["ce_loss_with_sae"] == pytest.approx(zero["ce_loss_zero_ablated"], abs=1e-6)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert zero["kl_div_with_sae"] > 0
    assert zero["explained_variance"] < 0, "zero is worse than predicting the mean"
    assert zero["l0"] == 0 and zero["l1"] == 0
    assert zero["dead_features"] == 16 and zero["dense_features"] == 0
    assert bool((densities["zero"] == 0).all())
    # KL(clean || with SAE), averaged over every predicted position, by hand.
    kl, positions = 0.0, 0
    for tokens in contexts:
        keep = ~torch.isin(tokens, exclude)

        def zero_kept(act: torch.Tensor, hook: Any, keep: torch.Tensor = keep) -> torch.Tensor:
            act = act.clone()
            act[keep] = 0
            return act

        with torch.no_grad():
            clean = tiny_model(tokens)[:, :-1].log_softmax(-1)
            ablated = tiny_model.run_with_hooks(tokens, fwd_hooks=[(HOOK, zero_kept)])
        ablated = ablated[:, :-1].log_softmax(-1)
        kl += float((clean.exp() * (clean - ablated)).sum())
        positions += clean.shape[0] * clean.shape[1]
    assert zero["kl_div_with_sae"] == pytest.approx(kl / positions, rel=1e-4)
    assert mean["explained_variance"] == pytest.approx(0.0, abs=1e-4)
    assert mean["fvu"] == pytest.approx(1.0, abs=1e-4)


def test_random_sae_metrics_match_their_definitions(
    tiny_model: Any, contexts: list[torch.Tensor], exclude: torch.Tensor
) -> None:
    torch.manual_seed(3)
    sae = relu_sae(96)
    metrics, densities = run_eval(tiny_model, contexts, exclude, random=sae)
    m = metrics["random"]
    x = kept_acts(tiny_model, contexts, exclude)
    with torch.no_grad():
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
    n_special = sum(int(torch.isin(t, exclude).sum()) for t in contexts)
    assert n_special == 7, "six BOS and one EOS"
    assert m["eval_tokens"] == x.shape[0] == sum(t.numel() for t in contexts) - n_special
    sq_err = (x - x_hat).pow(2).sum()
    assert m["mse"] == pytest.approx(float(sq_err / x.numel()), rel=1e-4)
    total = (x - x.mean(0)).pow(2).sum()
    assert m["explained_variance"] == pytest.approx(float(1 - sq_err / total), rel=1e-4)
    assert m["l0"] == pytest.approx(float((feats > 0).float().sum(-1).mean()), rel=1e-5)
    assert m["l1"] == pytest.approx(float(feats.sum(-1).mean()), rel=1e-4)
    cos = F.cosine_similarity(x, x_hat, dim=-1).mean()
    assert m["cosine_similarity"] == pytest.approx(float(cos), rel=1e-4)
    density = (feats > 0).float().mean(0)
    torch.testing.assert_close(densities["random"], density)
    assert m["dead_features"] == int((density == 0).sum())
    assert m["dense_features"] == int((density > 0.1).sum())
    # Clean next-token cross-entropy over every position of every context.
    ce = []
    for tokens in contexts:
        with torch.no_grad():
            logits = tiny_model(tokens)
        ce.append(
            F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        )
    assert m["ce_loss_clean"] == pytest.approx(float(torch.cat(ce).mean()), rel=1e-5)
    gap = m["ce_loss_zero_ablated"] - m["ce_loss_clean"]
    recovered = (m["ce_loss_zero_ablated"] - m["ce_loss_with_sae"]) / gap
    assert m["ce_loss_recovered"] == pytest.approx(recovered, rel=1e-6)
    assert m["kl_div_with_sae"] > 0


# ---- one pass each: the same metrics as the straightforward evaluation, and fewer passes --------

MLP_IN, MLP_OUT = "blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out"


def reference(
    model: Any, target: EvalTarget, contexts: list[torch.Tensor], exclude: torch.Tensor
) -> dict[str, float]:
    """One dictionary's metrics the straightforward way: a cached clean pass, then one pass
    with its reconstruction spliced in and one with its target hook zeroed, full log-softmaxes
    (CE recovered is a ratio of these, checked against its definition above)."""
    sums = dict.fromkeys(("clean", "with", "zero", "kl", "sq", "var", "l0", "n"), 0.0)
    ys = []
    for tokens in contexts:
        keep = ~torch.isin(tokens, exclude)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
            feats, out = target.reconstruct(cache[target.hook][keep])
            y = cache[target.target_hook][keep].float()

            def put(values: torch.Tensor, keep: torch.Tensor = keep) -> Any:
                def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                    act = act.clone()
                    act[keep] = values
                    return act

                return hook_fn

            spliced = model.run_with_hooks(tokens, fwd_hooks=[(target.target_hook, put(out))])
            zeroed = model.run_with_hooks(tokens, fwd_hooks=[(target.target_hook, put(0 * out))])
        nxt = tokens[:, 1:].flatten()
        clean, with_sae, zero = (
            t[:, :-1].flatten(0, 1).log_softmax(-1) for t in (logits, spliced, zeroed)
        )
        for key, lp in (("clean", clean), ("with", with_sae), ("zero", zero)):
            sums[key] += float(F.nll_loss(lp, nxt, reduction="sum"))
        sums["kl"] += float(F.kl_div(with_sae, clean, log_target=True, reduction="sum"))
        sums["sq"] += float((y - out).pow(2).sum())
        sums["l0"] += float((feats > 0).sum())
        sums["n"] += nxt.numel()
        ys.append(y)
    y = torch.cat(ys)
    positions, tokens_kept = sums["n"], y.shape[0]
    ce = {k: sums[k] / positions for k in ("clean", "with", "zero")}
    return {
        "ce_loss_clean": ce["clean"],
        "ce_loss_with_sae": ce["with"],
        "ce_loss_zero_ablated": ce["zero"],
        "kl_div_with_sae": sums["kl"] / positions,
        "explained_variance": 1 - sums["sq"] / float((y - y.mean(0)).pow(2).sum()),
        "l0": sums["l0"] / tokens_kept,
    }


def sweep_and_transcoder() -> list[EvalTarget]:
    """Three SAEs of a sweep on one hook (one of them scaled) and a skip transcoder."""
    torch.manual_seed(5)
    transcoder = build_sae(
        SAEConfig(
            architecture="relu",
            d_in=D_IN,
            d_out=D_IN,
            d_sae=48,
            skip_connection=True,
            apply_b_dec_to_input=False,
        )
    ).eval()
    with torch.no_grad():
        transcoder.W_skip.normal_(std=0.05)
    return [
        EvalTarget("a", HOOK, relu_sae(96)),
        EvalTarget("b", HOOK, relu_sae(32), 0.5),
        EvalTarget("c", HOOK, identity_sae()),
        EvalTarget("tc", MLP_IN, transcoder, 2.0, MLP_OUT, 3.0),
    ]


def test_metrics_match_the_straightforward_evaluation(
    tiny_model: Any, contexts: list[torch.Tensor], exclude: torch.Tensor
) -> None:
    targets = sweep_and_transcoder()
    metrics, _ = evaluate(tiny_model, targets, contexts, exclude)
    for target in targets:
        want = reference(tiny_model, target, contexts, exclude)
        got = metrics[target.name]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (target.name, key)


def count_passes(model: Any) -> Any:
    """A list that grows by one at every forward pass of ``model`` (its first block runs once
    per pass)."""
    passes: list[int] = []
    handle = model.blocks[0].register_forward_hook(lambda *args: passes.append(1))
    return passes, handle


@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_a_run_computes_its_baselines_once(
    tiny_model: Any, contexts: list[torch.Tensor], exclude: torch.Tensor, cache_bytes: int
) -> None:
    """Two periodic evaluations of a sweep on one hook and a transcoder: the zero-ablated pass
    runs once per target hook and batch in the run, the clean pass once (its logits cached) or
    at every evaluation (cache too small); the dictionaries' spliced passes at every one."""
    targets = sweep_and_transcoder()
    evaluator = Evaluator(tiny_model, contexts, exclude, baselines=Baselines(cache_bytes))
    passes, handle = count_passes(tiny_model)
    try:
        first, _ = evaluator(targets)
        n_first = len(passes)
        second, _ = evaluator(targets)
        n_second = len(passes) - n_first
        together = evaluator.together(targets[-1:])
        n_together = len(passes) - n_first - n_second
    finally:
        handle.remove()
    batches, spliced = len(contexts), len(targets)
    clean = 0 if cache_bytes else 1
    assert n_first == batches * (1 + 2 + spliced), "clean, one ablation per target hook, splices"
    assert n_second == batches * (clean + spliced)
    assert n_together == batches * (clean + 1), "the transcoder's own ablation is reused"
    assert second == first
    assert {k: together[k] for k in together} == {k: first["tc"][k] for k in together}
    assert evaluator.seconds > 0


def test_baselines_refuse_other_contexts(
    tiny_model: Any, contexts: list[torch.Tensor], exclude: torch.Tensor
) -> None:
    baselines = Baselines()
    targets = [EvalTarget("a", HOOK, relu_sae(16))]
    evaluate(tiny_model, targets, contexts[:1], exclude, baselines=baselines)
    with pytest.raises(ValueError, match="other contexts"):
        evaluate(tiny_model, targets, contexts[1:], exclude, baselines=baselines)
