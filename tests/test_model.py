"""Loading models, checking hooks, and the truncated forward pass the store relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from drrik.config import ModelConfig
from drrik.dtypes import torch_dtype
from drrik.errors import ConfigError
from drrik.model import (
    check_hooks,
    hook_dims,
    hook_layer,
    load_model,
    run_hooks,
    stop_at_layer,
)


def _config_error(field: str, fn: Any, *args: Any, **kwargs: Any) -> str:
    """Run ``fn``; it must raise a one-line ConfigError naming ``field``. Returns the message."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert info.value.field == field and message.startswith(f"{field}=")
    assert "\n" not in message
    return message


# -- the embedded model --------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_gives_finite_activations(smollm2: Any) -> None:
    tokens = smollm2.to_tokens("Sparse autoencoders find features in activations.")
    acts = run_hooks(smollm2, tokens, ["blocks.6.hook_resid_post"])["blocks.6.hook_resid_post"]
    assert acts.shape == (1, tokens.shape[1], 576)
    assert torch.isfinite(acts).all() and acts.abs().max() > 0
    assert smollm2.cfg.n_layers == 30


@pytest.mark.slow
def test_embedded_model_knows_the_capital_of_france(smollm2: Any) -> None:
    text = smollm2.generate(
        "The capital of France is", max_new_tokens=5, do_sample=False, verbose=False
    )
    assert "Paris" in text


# -- hooks and the truncated forward -------------------------------------------------------
def test_stop_at_layer() -> None:
    assert hook_layer("blocks.12.hook_resid_post") == 12
    assert hook_layer("hook_embed") is None
    assert stop_at_layer(["blocks.6.hook_resid_post", "blocks.2.hook_mlp_out"]) == 7
    assert stop_at_layer(["blocks.0.hook_resid_pre", "ln_final.hook_normalized"]) is None


def test_forward_stops_after_the_last_hooked_layer(tiny_model: Any) -> None:
    fired: list[str] = []

    def record(act: torch.Tensor, hook: Any) -> torch.Tensor:
        fired.append(hook.name)
        return act

    tokens = torch.randint(3, 1000, (2, 8))
    # Block 2's first computation (its attention input) and a later block's output must not run.
    later = [("blocks.2.attn.hook_in", record), ("blocks.3.hook_resid_post", record)]
    with tiny_model.hooks(fwd_hooks=later):
        run_hooks(tiny_model, tokens, ["blocks.1.hook_resid_post"])
    assert fired == []
    with tiny_model.hooks(fwd_hooks=later):  # the same hooks do fire on a full forward
        tiny_model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
    assert len(fired) == 2


def test_run_hooks_equals_a_full_forward(tiny_model: Any) -> None:
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_attn_out"]
    tokens = torch.randint(3, 1000, (3, 10))
    got = run_hooks(tiny_model, tokens, hooks)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=hooks)
    for hook in hooks:
        torch.testing.assert_close(got[hook], cache[hook])
    assert hook_dims(tiny_model, hooks) == {h: tiny_model.cfg.d_model for h in hooks}


def test_a_model_object_is_accepted(tiny_model: Any) -> None:
    assert load_model(tiny_model) is tiny_model
    _config_error("model", load_model, torch.nn.Linear(2, 2))


# -- bad input -----------------------------------------------------------------------------
def test_unknown_hub_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _config_error("model", load_model, "no-such-org/no-such-model-xyz")


def test_missing_local_paths(tmp_path: Path) -> None:
    assert "no such file" in _config_error("model", load_model, str(tmp_path / "missing"))
    _config_error("model", load_model, str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    assert "config.json" in _config_error("model", load_model, str(tmp_path / "empty"))


def test_unknown_hook_lists_close_names(tiny_model: Any) -> None:
    message = _config_error("hook", check_hooks, tiny_model, ["blocks.1.hook_resid_pots"])
    assert "blocks.1.hook_resid_post" in message
    _config_error("hook", check_hooks, tiny_model, ["blocks.9.hook_resid_post"])


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("model", {"model": "  "}),
        ("hook", {"hook": "blocks.1.hook resid"}),
        ("hook", {"hook": "blocks.1.hook_resid_post,blocks.1.hook_resid_post"}),
        ("model_dtype", {"model_dtype": "float8"}),
    ],
)
def test_model_config_validation(field: str, kwargs: dict[str, Any]) -> None:
    _config_error(field, ModelConfig, **kwargs)


def test_model_config_hook_list() -> None:
    cfg = ModelConfig(hook="blocks.1.hook_resid_post, blocks.3.hook_mlp_out")
    assert cfg.hook_names == ["blocks.1.hook_resid_post", "blocks.3.hook_mlp_out"]
    assert torch_dtype("bfloat16") is torch.bfloat16
    _config_error("dtype", torch_dtype, "int8")
