"""Steering: exact baseline at strength 0, visible change at large strength, clamp semantics,
batch = one by one, seeded sampling, low-precision models."""

from __future__ import annotations

import pytest
import torch
from saved_sae import HOOK, TC_IN, TC_OUT, make_run, saved_transcoder, sparse_sae, text_file

from drrik.cli import main
from drrik.errors import ConfigError
from drrik.model import load_model
from drrik.sae import SAEConfig, build_sae
from drrik.steering import SAESteering

PROMPTS = ["The capital of France is", "def main():\n    return", "Hello"]
NEW = 6


@pytest.fixture(scope="module")
def steering(tiny_model) -> SAESteering:
    sae = sparse_sae(tiny_model)
    return SAESteering(tiny_model, sae, HOOK, max_activations=torch.full((sae.d_sae,), 0.5))


def test_strength_zero_equals_baseline(steering):
    baseline = steering.generate(PROMPTS[0], max_new_tokens=NEW)
    assert steering.generate(PROMPTS[0], 5, 0.0, max_new_tokens=NEW) == baseline
    assert steering.generate(PROMPTS, [1, 2], [0.0, 0.0], max_new_tokens=NEW)[0] == baseline


def test_large_strength_changes_greedy_output(steering):
    baseline = steering.generate(PROMPTS[0], max_new_tokens=NEW)
    steered = steering.generate(PROMPTS[0], 5, 200.0, max_new_tokens=NEW)
    assert steered != baseline
    # units: strength 1 x max (0.5 here) is absolute strength 0.5
    in_max = steering.generate(PROMPTS[0], 5, 300.0, max_new_tokens=NEW)
    assert in_max == steering.generate(PROMPTS[0], 5, 150.0, max_new_tokens=NEW, units="absolute")


def test_batch_equals_one_by_one(steering):
    # prompts of different lengths: the batch is left-padded, each prompt alone is not
    batch = steering.generate(PROMPTS, [3, 7], [2.0, 1.0], max_new_tokens=NEW)
    singles = [steering.generate(p, [3, 7], [2.0, 1.0], max_new_tokens=NEW) for p in PROMPTS]
    assert batch == singles
    assert len(set(batch)) == len(PROMPTS)  # the prompts really differ
    assert batch != steering.generate(PROMPTS, max_new_tokens=NEW)  # and steering acted


def test_clamp_mode_sets_the_activation(tiny_model):
    """With an SAE whose encoder inverts its (orthonormal) decoder on these inputs (biases keep
    every pre-activation positive), encoding the steered activation gives exactly the clamped
    value at every steered position."""
    d = tiny_model.cfg.d_model
    sae = build_sae(SAEConfig(architecture="relu", d_in=d, d_sae=8, apply_b_dec_to_input=False))
    q, _ = torch.linalg.qr(torch.randn(d, 8))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
        sae.b_enc.fill_(10.0)
        sae.b_dec.zero_()
    steering = SAESteering(tiny_model, sae.eval(), HOOK)
    seen: list[torch.Tensor] = []
    # layer 2's input (hook_resid_pre) in the HF modules that generation runs
    layer = tiny_model.blocks[2].original_component
    handle = layer.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        steering.generate(
            PROMPTS[0], [2, 5], [1.5, 0.0], mode="clamp", units="absolute", max_new_tokens=3
        )
    finally:
        handle.remove()
    assert [s.shape[1] for s in seen] == [6, 1, 1]  # prompt, then one KV-cached step each
    feats = sae.encode(torch.cat([seen[0][0, 1:], *[s[0] for s in seen[1:]]])).detach()
    torch.testing.assert_close(feats[:, 2], torch.full_like(feats[:, 2], 1.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats[:, 5], torch.zeros_like(feats[:, 5]), atol=1e-4, rtol=0)
    assert not torch.allclose(sae.encode(seen[0][0, :1]).detach()[:, 2], torch.tensor(1.5))


def test_compare_steering_and_sampling(steering, capsys):
    table = steering.compare_steering(PROMPTS[0], 5, [0.0, 200.0], max_new_tokens=NEW)
    assert table["baseline"] == steering.generate(PROMPTS[0], max_new_tokens=NEW)
    assert table["strength=0"] == table["baseline"]
    assert table["strength=200"] != table["baseline"]
    assert "strength=200x max" in capsys.readouterr().out
    sampled = [
        steering.generate(PROMPTS, max_new_tokens=NEW, temperature=1.0, seed=s) for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_find_features_and_direction(steering):
    found = steering.find_steering_features("The capital of France is Paris", top_k=5)
    assert 0 < len(found) <= 5
    scores = [row["relative_to_feature_max"] for row in found]
    assert scores == sorted(scores, reverse=True)
    assert all(row["max_activation"] > 0 for row in found)
    direction = steering.get_steering_direction(found[0]["feature"])
    row = steering.sae.W_dec[found[0]["feature"]].detach()
    assert direction.norm() == pytest.approx(1.0)
    assert torch.cross(direction[:3], row[:3] / row.norm(), dim=0).abs().max() < 1e-6


def test_bfloat16_model_steers(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype="bfloat16")
    steering = SAESteering(model, sparse_sae(model), HOOK)
    baseline = steering.generate(PROMPTS[0], max_new_tokens=NEW)
    assert steering.generate(PROMPTS[0], 5, 0.0, units="absolute", max_new_tokens=NEW) == baseline
    for mode in ("add", "clamp"):
        assert (
            steering.generate(PROMPTS[0], 5, 200.0, units="absolute", mode=mode, max_new_tokens=NEW)
            != baseline
        )


def test_refusals(steering):
    with pytest.raises(ConfigError, match="feature"):
        steering.generate(PROMPTS[0], steering.sae.d_sae, 1.0)
    with pytest.raises(ConfigError, match="mode"):
        steering.generate(PROMPTS[0], 1, 1.0, mode="multiply")
    bare = SAESteering(steering.model, steering.sae, HOOK)
    with pytest.raises(ConfigError, match="drrik analyze"):
        bare.generate(PROMPTS[0], 1, 1.0)


def test_cmd_steer(tiny_model, tiny_model_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_model, tiny_model_dir, text_file(tmp_path / "d.txt"))
    argv = [str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--max-new-tokens", "4"]
    assert main(["steer", *argv, "--feature", "5", "--strength", "300"]) == 0
    out = capsys.readouterr().out
    assert out.count("baseline:") == 2 and out.count("steered:") == 2
    assert main(["steer", *argv, "--find"]) == 0
    assert "'feature':" in capsys.readouterr().out


def test_a_transcoder_steers_at_its_target_hook(
    tiny_model, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A transcoder's decoder row lives in its target's space: ``add`` puts it at
    ``hook_name_out`` (the MLP's output), so block 1's output moves by exactly strength x
    W_dec[f], and clamp (whose feature is read at another hook) is refused."""
    tc_in, tc_out = TC_IN, TC_OUT
    tc = build_sae(
        SAEConfig(architecture="relu", d_in=tiny_model.cfg.d_model, d_sae=8, skip_connection=True)
    )
    saved_transcoder(tmp_path / "tc", tiny_model_dir, tc, text_file(tmp_path / "d.txt", 40))
    steering = SAESteering.from_run(tmp_path / "tc", model=tiny_model)
    assert (steering.hook, steering.target_hook) == (tc_in, tc_out)
    outputs: list[torch.Tensor] = []
    block = tiny_model.blocks[1].original_component
    handle = block.register_forward_hook(
        lambda _, __, out: outputs.append((out[0] if isinstance(out, tuple) else out).clone())
    )
    try:
        for strength in (0.0, 3.0):
            steering.generate(PROMPTS[0], 2, strength, units="absolute", max_new_tokens=1)
    finally:
        handle.remove()
    moved = (outputs[1] - outputs[0])[0]  # [pos, d_model]; BOS (position 0) is left alone
    torch.testing.assert_close(moved[0], torch.zeros_like(moved[0]))
    expected = (3.0 * tc.W_dec[2]).detach().expand_as(moved[1:])
    torch.testing.assert_close(moved[1:], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="mode"):
        steering.generate(PROMPTS[0], 2, 1.0, mode="clamp", units="absolute")
    monkeypatch.setattr(SAESteering, "from_run", None)  # refused before any model loads
    argv = [str(tmp_path / "tc"), "--prompt", "a", "--feature", "2", "--mode", "clamp"]
    assert main(["steer", *argv]) == 2
    assert "mode='clamp'" in capsys.readouterr().err
