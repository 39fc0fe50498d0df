"""The TopK SAE's sparse training path gives the dense path's losses and gradients."""

from __future__ import annotations

import pytest
import torch

from drrik.sae import SAEConfig, TopKSAE, build_sae

D_IN, D_SAE, K = 12, 64, 3


def pair(normalize: bool, aux_k: int = 5) -> tuple[TopKSAE, TopKSAE]:
    """Two identical TopK SAEs with random biases and uneven decoder rows: dense, sparse."""
    cfg = SAEConfig(
        architecture="topk", d_in=D_IN, d_sae=D_SAE, k=K, aux_k=aux_k, normalize_decoder=normalize
    )
    torch.manual_seed(0)
    dense = build_sae(cfg)
    with torch.no_grad():
        dense.b_enc.normal_(0, 0.3)
        dense.b_dec.normal_(0, 0.3)
        if not normalize:
            dense.W_dec.mul_(torch.linspace(0.2, 3.0, D_SAE)[:, None])
    sparse = build_sae(cfg)
    sparse.load_state_dict(dense.state_dict())
    dense.sparse_training, sparse.sparse_training = False, True
    return dense, sparse  # type: ignore[return-value]


def dead_mask(n_dead: int) -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
    return mask


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_dead", [0, 2, 20])  # none, fewer than aux_k, more than aux_k
def test_sparse_path_matches_dense(normalize: bool, n_dead: int) -> None:
    dense, sparse = pair(normalize)
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1))
    mask = dead_mask(n_dead)
    outs = []
    for sae in (dense, sparse):
        out = sae.training_forward(x, 0.0, mask)
        out.loss.backward()
        outs.append(out)
    a, b = outs
    torch.testing.assert_close(b.feature_acts, a.feature_acts)
    torch.testing.assert_close(b.x_hat, a.x_hat)
    for key in ("mse_loss", "aux_loss"):
        torch.testing.assert_close(b.losses[key], a.losses[key])
    assert (b.losses["aux_loss"] > 0) == (n_dead > 0)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(dict(sparse.named_parameters())[name].grad, p.grad)


def test_sparse_path_under_bf16_autocast_stays_close() -> None:
    dense, sparse = pair(False)
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = dense.training_forward(x, 0.0, dead_mask(20))
        b = sparse.training_forward(x, 0.0, dead_mask(20))
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss.float(), a.loss.float(), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(sparse.W_enc.grad, dense.W_enc.grad, rtol=5e-2, atol=5e-2)


def test_path_choice() -> None:
    big = build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=1024, k=8, aux_k=8))
    x = torch.randn(4, 16)
    assert big._takes_sparse_path(x)
    with torch.no_grad():
        assert not big._takes_sparse_path(x)  # evaluation: nothing to gain in backward
    small = build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=8))
    assert not small._takes_sparse_path(x)
    batch = build_sae(SAEConfig(architecture="batchtopk", d_in=16, d_sae=1024, k=8, aux_k=8))
    assert not batch._takes_sparse_path(x)  # a batch-wide top k is not a per-token one


def test_sparse_path_is_bit_reproducible() -> None:
    """Bit-exact resume needs the same gradients every time, threads or not."""
    torch.manual_seed(0)
    cfg = SAEConfig(
        architecture="topk", d_in=64, d_sae=1024, k=8, aux_k=32, normalize_decoder=False
    )
    sae = build_sae(cfg).train()
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1024, dtype=torch.bool)
    mask[:300] = True
    grads = []
    for _ in range(3):
        sae.zero_grad()
        sae.training_forward(x, 0.0, mask).loss.backward()
        grads.append([p.grad.clone() for p in sae.parameters()])
    assert sae._takes_sparse_path(x)
    for again in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], again, strict=True))
