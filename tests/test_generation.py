"""Generation is Hugging Face's own: unsteered greedy output equals the HF model's, token for
token; the HF sites drrik hooks see what the TransformerLens hook points see; both backends
steer alike."""

from __future__ import annotations

import pytest
import torch
from saved_sae import HOOK

from drrik.generation import generate_tokens, hf_site, plain_hf_model
from drrik.model import load_model, run_hooks
from drrik.sae import SAEConfig, build_sae
from drrik.steering import SAESteering

PROMPTS = [
    "My favourite thing to do on a sunny Sunday is",
    "def add(a, b):\n    return",
    "The capital of France is a city that",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
NEW_TOKENS = 20


def zero_sae(d_in: int):
    return build_sae(SAEConfig(architecture="relu", d_in=d_in, d_sae=16))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_equals_hugging_face(smollm2, smollm2_dir, dtype):
    """The reference is transformers' own ``generate`` on the same weights, loaded by
    transformers itself, with the eager attention the hooked model runs (TransformerLens needs
    it for attention patterns; sdpa rounds differently in bf16)."""
    from transformers import AutoModelForCausalLM

    model = smollm2 if dtype == "float32" else load_model("smollm2-135m", dtype=dtype)
    steering = SAESteering(model, zero_sae(model.cfg.d_model), "blocks.5.hook_resid_post")
    tokens, mask = steering._encode(PROMPTS)
    assert len(set(mask.sum(1).tolist())) == len(PROMPTS)  # every row padded differently
    reference = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    special = steering.special
    expected = reference.generate(
        input_ids=tokens,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=special.eos,
        pad_token_id=steering._pad,
    )[:, tokens.shape[1] :]
    assert expected.shape[1] == NEW_TOKENS

    got = generate_tokens(
        model, tokens, mask, NEW_TOKENS, eos_token_id=special.eos, pad_token_id=steering._pad
    )
    assert torch.equal(got, expected)
    texts = steering.tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert steering.generate_batch(PROMPTS, max_new_tokens=NEW_TOKENS) == texts
    assert len(set(texts)) == len(PROMPTS) and all("--" not in t for t in texts)
    if dtype == "float32":  # the forward path too (it recomputes, so bf16 may round apart)
        by_forward = generate_tokens(
            model,
            tokens,
            mask,
            NEW_TOKENS,
            eos_token_id=special.eos,
            pad_token_id=steering._pad,
            backend="forward",
        )
        assert torch.equal(by_forward, expected)


SITED = [
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_resid_post",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_mlp_out",
    "blocks.1.mlp.hook_in",
    "blocks.1.attn.hook_z",
]


@pytest.mark.parametrize("hook", SITED)
def test_hf_site_sees_what_the_hook_point_sees(tiny_model, hook):
    tokens = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = run_hooks(tiny_model, tokens, [hook])[hook]
    if expected.ndim == 4:  # hook_z: [batch, pos, head, d_head], o_proj's input flattens heads
        expected = expected.flatten(2)
    site = hf_site(tiny_model, hook)
    assert site is not None
    before = (dict(site[0]._forward_hooks), dict(site[0]._forward_pre_hooks))
    hf, copies = plain_hf_model(tiny_model)
    seen: list[torch.Tensor] = []
    module, side = copies[id(site[0])], site[1]
    if side == "in":
        handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    else:
        handle = module.register_forward_hook(
            lambda _, __, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
    with torch.no_grad():
        hf(input_ids=tokens)
    handle.remove()
    torch.testing.assert_close(seen[0], expected)
    assert (site[0]._forward_hooks, site[0]._forward_pre_hooks) == before  # original untouched


def test_internal_hooks_have_no_hf_site(tiny_model):
    assert hf_site(tiny_model, "blocks.1.ln2.hook_normalized") is None
    assert hf_site(tiny_model, "blocks.1.hook_no_such_point") is None


def test_backends_steer_alike(tiny_model):
    """The same edit through HF's generate (forward hook at the HF site) and through the
    recomputing forward loop (TransformerLens hook) gives the same tokens, padding included."""
    steering = SAESteering(tiny_model, zero_sae(tiny_model.cfg.d_model), HOOK)
    tokens, mask = steering._encode(PROMPTS[:3])
    torch.manual_seed(3)
    direction = torch.randn(tiny_model.cfg.d_model) * 4

    def edit(act: torch.Tensor) -> torch.Tensor:
        return direction.expand_as(act)

    keep = mask.clone()
    keep[:, -2] = 0  # leave one prompt position alone
    common = dict(hook=HOOK, edit=edit, prompt_mask=keep, eos_token_id=None, pad_token_id=0)
    by_hf = generate_tokens(tiny_model, tokens, mask, 8, backend="hf", **common)
    by_forward = generate_tokens(tiny_model, tokens, mask, 8, backend="forward", **common)
    assert torch.equal(by_hf, by_forward)
    assert not torch.equal(by_hf, generate_tokens(tiny_model, tokens, mask, 8, pad_token_id=0))
    internal = {**common, "hook": "blocks.1.ln2.hook_normalized"}
    steered = generate_tokens(tiny_model, tokens, mask, 8, **internal)  # falls back to forward
    assert not torch.equal(steered, generate_tokens(tiny_model, tokens, mask, 8, pad_token_id=0))
    with pytest.raises(ValueError, match="backend='forward'"):
        generate_tokens(tiny_model, tokens, mask, 8, backend="hf", **internal)
