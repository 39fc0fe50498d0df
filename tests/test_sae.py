"""SAE family: forward passes and losses against hand computations, gradients, the decoder
constraint, folding, saving in SAELens's layout, dead-feature tracking and resampling."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import drrik.sae.saving as saving
from drrik.errors import ConfigError
from drrik.sae import (
    ARCHITECTURES,
    KNOWN_ARCHITECTURES,
    SAE,
    BatchTopKSAE,
    DeadFeatureTracker,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    ReLUSAE,
    SAEConfig,
    TopKSAE,
    TrainOutput,
    build_sae,
    load_sparsity,
    register,
    resample_dead_features,
)

D_IN, D_SAE = 6, 10


def make(architecture: str, seed: int = 0, **overrides) -> SAE:
    """A small SAE with every parameter randomized (biases too), so hand checks see them."""
    kwargs = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE}
    if ARCHITECTURES[architecture].needs_k:
        kwargs["k"] = 3
    kwargs.update(overrides)
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(**kwargs))
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "log_threshold":
                param.copy_(torch.empty_like(param).uniform_(-2.0, -0.5))
            elif name != "W_dec":
                param.add_(0.3 * torch.randn_like(param))
    return sae


def inputs(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def expected_mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((x_hat - x) ** 2).sum(dim=1).mean()


# ---- config --------------------------------------------------------------------------------


def test_config_defaults_and_resolution() -> None:
    cfg = SAEConfig(d_in=16)
    assert cfg.resolved_d_sae() == 128
    assert SAEConfig(d_in=16, expansion_factor=2, k=8).resolved_d_sae() == 32
    assert SAEConfig(d_in=16, d_sae=40, k=8).resolved_d_sae() == 40
    relu = SAEConfig(architecture="relu")
    assert relu.resolved_normalize_decoder() is False  # decoder-norm-weighted L1
    assert SAEConfig(
        architecture="relu", scale_sparsity_by_decoder_norm=False
    ).resolved_normalize_decoder()
    assert SAEConfig(architecture="topk", k=4).resolved_normalize_decoder()
    assert SAEConfig(architecture="gated").resolved_normalize_decoder()  # measured: benchmarks/
    assert (
        SAEConfig(architecture="topk", k=4, normalize_decoder=False).resolved_normalize_decoder()
        is False
    )
    assert SAEConfig(architecture="topk", k=4, d_in=64).resolved_aux_k() == 32
    # k: given, else the target L0, else the default run's 64.
    assert SAEConfig(architecture="topk", k=4).resolved_k() == 4
    assert SAEConfig(architecture="batchtopk", target_l0=12).resolved_k() == 12
    assert SAEConfig().architecture == "topk" and SAEConfig().resolved_k() == 64
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"d_sae": 32, "expansion_factor": 4}, "d_sae", "not both"),
        ({"architecture": "topk", "k": 4, "target_l0": 4}, "target_l0", "drop one"),
        ({"architecture": "batchtopk", "k": 4, "target_l0": 8}, "target_l0", "drop one"),
        ({"l1_coefficient": -1.0}, "l1_coefficient", ">= 0"),
        ({"aux_k_coefficient": -0.1}, "aux_k_coefficient", ">= 0"),
        ({"architecture": "topk", "k": 0}, "k", "positive"),
        ({"architecture": "topk", "k": 2, "use_ghost_grads": True}, "use_ghost_grads", "relu"),
        ({"dtype": "float8"}, "dtype", "float32"),
        ({"batchtopk_threshold_momentum": 1.0}, "batchtopk_threshold_momentum", "[0, 1)"),
    ],
)
def test_config_rejects_bad_input(kwargs: dict, field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        SAEConfig(**kwargs)
    message = str(err.value)
    assert err.value.field == field and message.startswith(f"{field}=")
    assert hint in message and "\n" not in message


SHIPPED = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
}


class ToySAE(SAE):
    """An architecture drrik does not ship: what a user adds in one file plus one registration."""

    architecture = "toy"
    saelens_architecture = "standard"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    def training_forward(
        self,
        x: torch.Tensor,
        sparsity_coefficient: float | torch.Tensor,
        dead_mask: torch.Tensor | None = None,
    ) -> TrainOutput:
        feature_acts = self.encode(x)
        x_hat = self.decode(feature_acts)
        losses = {
            "mse_loss": self.mse(x_hat, x),
            "l1_loss": sparsity_coefficient * self.feature_total(feature_acts),
        }
        loss = torch.stack(list(losses.values())).sum()
        return TrainOutput(loss=loss, losses=losses, feature_acts=feature_acts, x_hat=x_hat)


@pytest.fixture
def toy_registered() -> Iterator[None]:
    """ToySAE in the registry for one test (the line drrik.sae's import would run)."""
    register(ToySAE)
    yield
    del ARCHITECTURES[ToySAE.architecture]


def listed_architectures() -> list[str]:
    """The names the config's error for an unknown architecture offers."""
    with pytest.raises(ConfigError) as err:
        SAEConfig(architecture="vanilla")
    assert err.value.field == "architecture" and err.value.value == "vanilla"
    return err.value.fix.removeprefix("use one of ").split(", ")


def check_trains_saves_and_reloads(sae: SAE, directory: Path) -> None:
    """One optimizer step changes the SAE; saved and reloaded, it is the same class, config and
    function."""
    before = sae.W_enc.detach().clone()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    out = sae.training_forward(inputs(32), 0.1, torch.zeros(sae.d_sae, dtype=torch.bool))
    out.loss.backward()
    sae.remove_parallel_decoder_grad()
    optimizer.step()
    sae.normalize_decoder_rows()
    assert torch.isfinite(out.loss) and not torch.equal(sae.W_enc, before)
    sae.eval().save(directory)
    loaded = SAE.load(directory)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    x = inputs(12, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-6, atol=1e-6)


def test_registry_holds_exactly_the_shipped_architectures() -> None:
    assert ARCHITECTURES == SHIPPED
    assert set(KNOWN_ARCHITECTURES) == set(SHIPPED)
    for name, cls in SHIPPED.items():
        assert cls.architecture == name and type(make(name)) is cls


def test_unknown_architecture_lists_exactly_the_registered_ones() -> None:
    assert sorted(listed_architectures()) == sorted(SHIPPED)


@pytest.mark.parametrize("architecture", KNOWN_ARCHITECTURES)
def test_every_registered_architecture_trains_saves_and_reloads(
    tmp_path: Path, architecture: str
) -> None:
    check_trains_saves_and_reloads(make(architecture), tmp_path / "sae")


def test_one_registration_makes_a_new_architecture_usable(
    toy_registered: None, tmp_path: Path
) -> None:
    """An architecture defined outside drrik: validated, built by name, trained, saved and
    reloaded by drrik's own code once it is registered, with nothing else changed."""
    assert sorted(listed_architectures()) == sorted([*SHIPPED, "toy"])
    cfg = SAEConfig(architecture="toy", d_in=D_IN, d_sae=D_SAE)
    assert cfg.resolved_normalize_decoder() is False  # the base class's default
    sae = build_sae(cfg)
    assert type(sae) is ToySAE
    check_trains_saves_and_reloads(sae, tmp_path / "toy")
    with pytest.raises(ConfigError, match="ghost grads"):
        SAEConfig(architecture="toy", use_ghost_grads=True)


def test_build_needs_d_in_and_k_within_d_sae() -> None:
    with pytest.raises(ConfigError, match="d_in"):
        build_sae(SAEConfig())
    with pytest.raises(ConfigError, match="k <= d_sae"):
        build_sae(SAEConfig(architecture="topk", d_in=4, d_sae=8, k=9))


# ---- initialization ------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", KNOWN_ARCHITECTURES)
def test_init_is_seeded_tied_and_normed(architecture: str) -> None:
    cfg = SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=3)
    torch.manual_seed(5)
    a = build_sae(cfg)
    torch.manual_seed(5)
    b = build_sae(cfg)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.W_enc, a.W_dec.T)
    assert torch.count_nonzero(a.b_enc) == 0 and torch.count_nonzero(a.b_dec) == 0
    target = 1.0 if cfg.resolved_normalize_decoder() else 0.1
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.full((D_SAE,), target))
    assert a.W_enc.shape == (D_IN, D_SAE) and a.b_dec.shape == (D_IN,)


# ---- forward passes and losses against hand computations -----------------------------------


@pytest.mark.parametrize("scale_by_norm", [True, False])
def test_relu_forward_and_loss(scale_by_norm: bool) -> None:
    sae = make("relu", scale_sparsity_by_decoder_norm=scale_by_norm)
    x, lam = inputs(), 0.7
    W_enc, W_dec, b_enc, b_dec = (t.detach() for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec))
    pre = (x - b_dec) @ W_enc + b_enc
    f = torch.where(pre > 0, pre, torch.zeros(()))
    x_hat = f @ W_dec + b_dec
    weights = W_dec.norm(dim=1) if scale_by_norm else torch.ones(D_SAE)
    l1 = (f * weights).sum(dim=1).mean()
    out = sae.training_forward(x, lam)
    torch.testing.assert_close(out.feature_acts, f)
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.losses["mse_loss"], expected_mse(x_hat, x))
    torch.testing.assert_close(out.losses["l1_loss"], lam * l1)
    torch.testing.assert_close(out.loss, expected_mse(x_hat, x) + lam * l1)
    torch.testing.assert_close(sae(x), x_hat)


def test_relu_without_b_dec_on_input() -> None:
    sae = make("relu", apply_b_dec_to_input=False)
    x = inputs()
    pre = x @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x), pre.clamp_min(0))


def _topk_by_hand(scores: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(scores)
    for row in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: -float(scores[row, j]))
        for j in order[:k]:
            out[row, j] = max(float(scores[row, j]), 0.0)
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_forward_and_loss(normalize: bool) -> None:
    sae = make("topk", normalize_decoder=normalize)
    if not normalize:
        with torch.no_grad():  # uneven row norms, so ranking by contribution matters
            sae.W_dec.mul_(torch.linspace(0.2, 3.0, D_SAE)[:, None])
    x = inputs()
    W_dec = sae.W_dec.detach()
    norms = W_dec.norm(dim=1) if not normalize else torch.ones(D_SAE)
    pre = (x - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()
    acts = _topk_by_hand(pre * norms, 3)
    x_hat = (acts / norms) @ W_dec + sae.b_dec.detach()
    out = sae.training_forward(x, 123.0)  # the coefficient is ignored by topk
    torch.testing.assert_close(out.feature_acts, acts)
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.loss, expected_mse(x_hat, x))
    assert ((out.feature_acts > 0).sum(dim=1) <= 3).all()
    if not normalize:  # decoder norms changed which features were selected
        assert not torch.equal(acts > 0, _topk_by_hand(pre, 3) > 0)


def test_topk_aux_loss_by_hand() -> None:
    sae = make("topk", aux_k=2, aux_k_coefficient=0.5)
    x = inputs()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    out = sae.training_forward(x, 0.0, dead)
    W_dec = sae.W_dec.detach()
    pre = (x - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()
    residual = x - out.x_hat.detach()
    masked = torch.full_like(pre, -1e9)
    masked[:, dead] = pre[:, dead]
    aux_acts = _topk_by_hand(masked, 2)
    aux_err = expected_mse(aux_acts @ W_dec, residual)
    scale = min(3 / 2, 1.0)
    torch.testing.assert_close(out.losses["aux_loss"], 0.5 * scale * aux_err)
    torch.testing.assert_close(out.loss, out.losses["mse_loss"] + out.losses["aux_loss"])
    # the aux term's gradient reaches only dead features' decoder rows
    sae.zero_grad()
    out.losses["aux_loss"].backward()
    assert sae.W_dec.grad[~dead].abs().max() == 0
    assert sae.W_dec.grad[dead].abs().max() > 0
    # no dead features: zero aux loss
    none_dead = sae.training_forward(x, 0.0, torch.zeros(D_SAE, dtype=torch.bool))
    assert none_dead.losses["aux_loss"] == 0


def test_gated_forward_and_loss() -> None:
    sae = make("gated")
    x, lam = inputs(), 0.3
    p = {n: t.detach() for n, t in sae.named_parameters()}
    xc = x - p["b_dec"]
    gate = xc @ p["W_enc"] + p["b_enc"]
    mag = xc @ (p["W_enc"] * torch.exp(p["r_mag"])) + p["b_mag"]
    f = (gate > 0).float() * mag.clamp_min(0)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    l1 = (gate.clamp_min(0) * p["W_dec"].norm(dim=1)).sum(dim=1).mean()
    aux = expected_mse(gate.clamp_min(0) @ p["W_dec"] + p["b_dec"], x)
    out = sae.training_forward(x, lam)
    torch.testing.assert_close(out.feature_acts, f)
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.losses["mse_loss"], expected_mse(x_hat, x))
    torch.testing.assert_close(out.losses["l1_loss"], lam * l1)
    torch.testing.assert_close(out.losses["aux_loss"], aux)
    torch.testing.assert_close(sae.encode(x), f)
    # the auxiliary reconstruction does not train the decoder
    sae.zero_grad()
    out.losses["aux_loss"].backward()
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().max() == 0
    assert sae.W_enc.grad.abs().max() > 0


def test_jumprelu_forward_and_loss() -> None:
    sae = make("jumprelu")
    x, lam = inputs(), 0.05
    theta = sae.log_threshold.detach().exp()
    pre = (x - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()
    f = torch.where(pre > theta, pre, torch.zeros(()))
    x_hat = f @ sae.W_dec.detach() + sae.b_dec.detach()
    l0 = (pre > theta).float().sum(dim=1).mean()
    out = sae.training_forward(x, lam)
    torch.testing.assert_close(out.feature_acts, f)
    torch.testing.assert_close(out.losses["mse_loss"], expected_mse(x_hat, x))
    torch.testing.assert_close(out.losses["l0_loss"], lam * l0)
    assert 0 < l0 < D_SAE  # the random thresholds actually cut some features


def _jumprelu_probe() -> tuple[JumpReLUSAE, torch.Tensor]:
    """d_in = d_sae = 3, identity encoder, zero biases, threshold 0.5, bandwidth 0.2:
    pre-activations equal the inputs."""
    cfg = SAEConfig(
        architecture="jumprelu",
        d_in=3,
        d_sae=3,
        jumprelu_init_threshold=0.5,
        jumprelu_bandwidth=0.2,
    )
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
    # window (0.4, 0.6): 0.45 in (below theta), 0.55 in (above), 0.9 and 0.1 outside
    x = torch.tensor([[0.45, 0.55, 0.9], [0.55, 0.1, 0.58]], requires_grad=True)
    return sae, x


def test_jumprelu_ste_threshold_gradient() -> None:
    sae, x = _jumprelu_probe()
    sae.encode(x).sum().backward()
    # d/dtheta = -(theta/eps) * K((z-theta)/eps) summed over the batch; theta/eps = 2.5
    grad_theta = torch.tensor([-2.5 - 2.5, -2.5 + 0.0, 0.0 - 2.5])
    torch.testing.assert_close(sae.log_threshold.grad, 0.5 * grad_theta)  # d theta/d log = theta
    # d/dz = H(z - theta): exact, not straight-through
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))


def test_jumprelu_l0_step_gradient() -> None:
    sae, x = _jumprelu_probe()
    out = sae.training_forward(x, 1.0)
    sae.zero_grad()
    out.losses["l0_loss"].backward()
    torch.testing.assert_close(out.losses["l0_loss"], torch.tensor((2 + 2) / 2))
    # d H(z - theta)/d theta = -(1/eps) K((z-theta)/eps), averaged over the batch of 2
    grad_theta = torch.tensor([-5.0 - 5.0, -5.0, -5.0]) / 2
    torch.testing.assert_close(sae.log_threshold.grad, 0.5 * grad_theta)
    assert x.grad is None or x.grad.abs().max() == 0  # no gradient to z through the step
    assert sae.W_enc.grad is None or sae.W_enc.grad.abs().max() == 0


@pytest.mark.parametrize("architecture", KNOWN_ARCHITECTURES)
def test_losses_sum_to_loss_and_backprop(architecture: str) -> None:
    sae = make(architecture)
    dead = torch.arange(D_SAE) % 3 == 0
    out = sae.training_forward(inputs(), 0.2, dead)
    torch.testing.assert_close(torch.stack(list(out.losses.values())).sum(), out.loss)
    assert all(v.dim() == 0 for v in out.losses.values())
    out.loss.backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()


@pytest.mark.parametrize(
    ("architecture", "sparse"), [(a, False) for a in KNOWN_ARCHITECTURES] + [("topk", True)]
)
def test_a_target_replaces_the_input_in_every_reconstruction_loss(
    architecture: str, sparse: bool
) -> None:
    """What a transcoder needs: the decoder reconstructs ``target``, the encoder reads ``x``.
    With ``target=x`` nothing changes; with another target every reconstruction term (MSE,
    AuxK, ghost grads, gated's auxiliary) measures against it."""
    overrides = {"use_ghost_grads": True} if architecture == "relu" else {}
    sae = make(architecture, **overrides)
    if hasattr(sae, "sparse_training"):
        sae.sparse_training = sparse
    x, y, dead = inputs(), inputs(seed=2), torch.arange(D_SAE) % 3 == 0
    plain, same = sae.training_forward(x, 0.2, dead), sae.training_forward(x, 0.2, dead, x)
    for key, value in plain.losses.items():
        torch.testing.assert_close(same.losses[key], value)
    other = sae.training_forward(x, 0.2, dead, y)
    torch.testing.assert_close(other.x_hat, plain.x_hat)  # the encoder still reads x
    torch.testing.assert_close(other.losses["mse_loss"], expected_mse(plain.x_hat, y))
    for key in set(plain.losses) - {"mse_loss", "l1_loss", "l0_loss"}:
        assert not torch.equal(other.losses[key], plain.losses[key]), key


# ---- ghost grads ---------------------------------------------------------------------------


def test_ghost_grads_reach_only_dead_features() -> None:
    sae = make("relu", use_ghost_grads=True)
    x = inputs(16)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[0, 3, 8]] = True
    out = sae.training_forward(x, 0.1, dead)
    torch.testing.assert_close(
        out.losses["ghost_loss"], out.losses["mse_loss"]
    )  # value matches MSE
    sae.zero_grad()
    out.losses["ghost_loss"].backward()
    assert sae.W_enc.grad[:, ~dead].abs().max() == 0
    assert sae.W_dec.grad[~dead].abs().max() == 0
    assert sae.b_enc.grad[~dead].abs().max() == 0
    assert sae.W_enc.grad[:, dead].abs().sum(dim=0).min() > 0
    assert sae.W_dec.grad[dead].abs().sum(dim=1).min() > 0
    no_dead = sae.training_forward(x, 0.1, torch.zeros(D_SAE, dtype=torch.bool))
    assert no_dead.losses["ghost_loss"] == 0
    assert "ghost_loss" not in make("relu").training_forward(x, 0.1, dead).losses


def test_ghost_grad_value_by_hand() -> None:
    sae = make("relu", use_ghost_grads=True)
    x = inputs(4)
    dead = torch.tensor([True, False] * (D_SAE // 2))
    out = sae.training_forward(x, 0.0, dead)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    residual = (x - out.x_hat).detach()
    g = (torch.exp(pre) * dead.float()) @ sae.W_dec
    g = g * (residual.norm(dim=1, keepdim=True) / (2 * g.norm(dim=1, keepdim=True))).detach()
    ghost = ((g - residual) ** 2).sum(dim=1)
    ratio = ((residual**2).sum(dim=1) / ghost).detach()
    expected = (ratio * ghost).mean()
    torch.testing.assert_close(out.losses["ghost_loss"], expected)
    sae.zero_grad()
    out.losses["ghost_loss"].backward()
    got = sae.W_dec.grad.clone()
    sae.zero_grad()
    expected.backward()
    torch.testing.assert_close(got, sae.W_dec.grad)


# ---- decoder constraint --------------------------------------------------------------------


def test_remove_parallel_grad_is_exactly_the_parallel_part() -> None:
    sae = make("topk")
    sae.normalize_decoder_rows()
    sae.training_forward(inputs(), 0.0).loss.backward()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    after = sae.W_dec.grad
    unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close((after * unit).sum(dim=1), torch.zeros(D_SAE), atol=1e-6, rtol=0)
    removed = before - after
    torch.testing.assert_close(removed, (before * unit).sum(dim=1, keepdim=True) * unit)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_decoder_rows_stay_unit_norm(opt_cls: type[torch.optim.Optimizer]) -> None:
    sae = make("topk")
    sae.normalize_decoder_rows()
    optimizer = opt_cls(sae.parameters(), lr=1e-2)
    for step in range(5):
        optimizer.zero_grad()
        sae.training_forward(inputs(seed=step), 0.0).loss.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder_rows()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_sgd_step_with_projection_barely_changes_norms() -> None:
    """With the parallel part removed, an SGD step moves rows orthogonally: norms change only
    to second order, so renormalizing is a small correction, not a fight with the gradient."""
    sae = make("topk")
    sae.normalize_decoder_rows()
    sae.training_forward(inputs(), 0.0).loss.backward()
    sae.remove_parallel_decoder_grad()
    lr = 1e-3
    with torch.no_grad():
        moved = sae.W_dec - lr * sae.W_dec.grad
    change = (moved.norm(dim=1) - 1).abs().max()
    assert change <= (lr * sae.W_dec.grad.norm(dim=1)).pow(2).max() + 1e-7


def test_unnormalized_architecture_leaves_decoder_alone() -> None:
    sae = make("relu")  # decoder-norm-weighted L1: rows free
    sae.training_forward(inputs(), 1.0).loss.backward()
    grad, W_dec = sae.W_dec.grad.clone(), sae.W_dec.detach().clone()
    sae.remove_parallel_decoder_grad()
    sae.normalize_decoder_rows()
    assert torch.equal(sae.W_dec.grad, grad) and torch.equal(sae.W_dec, W_dec)


# ---- batchtopk -----------------------------------------------------------------------------


def test_batchtopk_mean_l0_is_k_and_threshold_is_learned() -> None:
    sae = make("batchtopk", batchtopk_threshold_momentum=0.9)
    x = inputs(16)
    out = sae.training_forward(x, 0.0)
    l0 = (out.feature_acts > 0).sum(dim=1).float()
    assert l0.mean() == 3 and l0.max() > l0.min()  # k on average, not per token
    pre = (x - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()
    kept = pre.flatten().topk(3 * 16).values
    torch.testing.assert_close(sae.threshold, kept.min())  # first update sets it
    first = sae.threshold.clone()
    x2 = inputs(16, seed=9)
    sae.training_forward(x2, 0.0)
    pre2 = (x2 - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()
    kept2 = pre2.flatten().topk(3 * 16).values.min()
    torch.testing.assert_close(sae.threshold, 0.9 * first + 0.1 * kept2)
    sae.eval()
    torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))
    sae.eval().training_forward(x, 0.0)  # eval mode: threshold frozen
    torch.testing.assert_close(sae.threshold, 0.9 * first + 0.1 * kept2)


def test_batchtopk_saved_as_jumprelu_gives_similar_acts(tmp_path) -> None:
    sae = make("batchtopk", normalize_decoder=False)
    x = inputs(64, seed=3)
    for _ in range(30):
        train_acts = sae.training_forward(x, 0.0).feature_acts
    sae.save(tmp_path / "sae")
    with open(tmp_path / "sae" / "cfg.json") as f:
        cfg = json.load(f)
    assert cfg["architecture"] == "jumprelu"
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    torch.testing.assert_close(weights["threshold"], sae.threshold.expand(D_SAE))
    # read it as SAELens would: a plain jumprelu SAE
    del cfg["drrik"]
    with open(tmp_path / "sae" / "cfg.json", "w") as f:
        json.dump(cfg, f)
    as_jumprelu = SAE.load(tmp_path / "sae")
    assert type(as_jumprelu) is JumpReLUSAE
    # Fresh inputs for the exact comparison: the threshold was learned on x, so some of x's
    # pre-activations sit on it, where float rounding decides either way.
    fresh = inputs(64, seed=4)
    torch.testing.assert_close(as_jumprelu.encode(fresh), sae.eval().encode(fresh))
    jump_acts = as_jumprelu.encode(x)
    agree = ((jump_acts > 0) == (train_acts > 0)).float().mean()
    assert agree > 0.9
    assert abs((jump_acts > 0).sum(dim=1).float().mean() - 3) < 1.0


# ---- folding an input scale ----------------------------------------------------------------


@pytest.mark.parametrize("architecture", KNOWN_ARCHITECTURES)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_fold_activation_scale_is_exact(architecture: str, apply_b_dec: bool) -> None:
    sae = make(architecture, normalize_decoder=False, apply_b_dec_to_input=apply_b_dec)
    if isinstance(sae, BatchTopKSAE):
        sae.training_forward(inputs(32), 0.0)  # learn a non-zero threshold
    sae.eval()
    x, scale = inputs(16, seed=4) * 2.0, 3.7
    with torch.no_grad():
        expected = sae(x * scale) / scale
        expected_acts = sae.encode(x * scale) / scale
        norms = sae.W_dec.norm(dim=1).clone()
        sae.fold_activation_scale(scale)
        torch.testing.assert_close(sae(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae.encode(x), expected_acts, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), norms)  # decoder rows keep norms
    with pytest.raises(ValueError, match="finite scale > 0") as err:  # a caller's bug
        sae.fold_activation_scale(0.0)
    assert not isinstance(err.value, ConfigError)


# ---- saving --------------------------------------------------------------------------------

SAELENS_WEIGHTS = {
    "relu": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "topk": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "batchtopk": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"},
    "matryoshka_batchtopk": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"},
    "jumprelu": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"},
    "gated": {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"},
}
SAELENS_NAMES = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
}


@pytest.mark.parametrize("architecture", KNOWN_ARCHITECTURES)
@pytest.mark.parametrize("normalize", [True, False])
def test_save_load_round_trip(tmp_path, architecture: str, normalize: bool) -> None:
    sae = make(architecture, normalize_decoder=normalize)
    if isinstance(sae, BatchTopKSAE):
        sae.training_forward(inputs(32), 0.0)
    sae.eval()
    x = inputs(12, seed=7)
    sparsity = torch.linspace(-5, -1, D_SAE)
    meta = {"hook_name": "blocks.0.hook_resid_post", "model_name": "tiny"}
    sae.save(tmp_path / "sae", sparsity=sparsity, metadata=meta)

    loaded = SAE.load(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(load_sparsity(tmp_path / "sae"), sparsity)

    with open(tmp_path / "sae" / "cfg.json") as f:
        cfg = json.load(f)
    assert cfg["architecture"] == SAELENS_NAMES[architecture]
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg["dtype"] == "float32"
    assert cfg["device"] == "cpu" and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    if architecture == "topk":
        assert cfg["k"] == 3
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert set(weights) == SAELENS_WEIGHTS[architecture]
    assert weights["W_enc"].shape == (D_IN, D_SAE) and weights["W_dec"].shape == (D_SAE, D_IN)


@pytest.mark.parametrize("architecture", ["relu", "topk", "jumprelu", "gated"])
def test_load_saelens_written_dir(tmp_path, architecture: str) -> None:
    """A directory without drrik's block (as SAELens writes it) loads as the matching class."""
    sae = make(architecture, normalize_decoder=False).eval()
    sae.save(tmp_path / "sae")
    with open(tmp_path / "sae" / "cfg.json") as f:
        cfg = json.load(f)
    del cfg["drrik"]
    with open(tmp_path / "sae" / "cfg.json", "w") as f:
        json.dump(cfg, f)
    loaded = SAE.load(tmp_path / "sae")
    assert type(loaded) is type(sae)
    x = inputs(12, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-6, atol=1e-6)


def test_save_replaces_atomically_and_survives_a_crash(tmp_path, monkeypatch) -> None:
    target = tmp_path / "sae"
    first = make("relu", seed=0)
    first.save(target)
    second = make("relu", seed=1)
    second.save(target)  # overwrite an existing SAE
    assert torch.equal(SAE.load(target).W_enc, second.W_enc.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp dirs left

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        make("relu", seed=2).save(target)
    assert torch.equal(SAE.load(target).W_enc, second.W_enc.detach())  # old SAE intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


# ---- dead features -------------------------------------------------------------------------


def test_dead_feature_tracker() -> None:
    tracker = DeadFeatureTracker(4)
    acts = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    tracker.update(acts)
    assert tracker.tokens_since_fired.tolist() == [0, 3, 0, 3]
    tracker.update(torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]]))
    assert tracker.tokens_since_fired.tolist() == [2, 5, 2, 0]
    assert tracker.dead_mask(5).tolist() == [False, True, False, False]
    assert tracker.dead_mask(2).tolist() == [True, True, True, False]
    restored = DeadFeatureTracker(4)
    restored.load_state_dict(tracker.state_dict())
    assert torch.equal(restored.tokens_since_fired, tracker.tokens_since_fired)
    tracker.update(torch.zeros(2, 3, 4))  # [batch, seq, d_sae] counts 6 tokens
    assert tracker.tokens_since_fired.tolist() == [8, 11, 8, 6]


def _sae_with_dead_features() -> tuple[SAE, torch.Tensor, torch.optim.Adam]:
    sae = make("relu")
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[2, 5, 9]] = True
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for step in range(2):
        optimizer.zero_grad()
        sae.training_forward(inputs(seed=step), 1.0).loss.backward()
        optimizer.step()
    with torch.no_grad():
        sae.b_enc[dead] = -100.0  # these never fire
    return sae, dead, optimizer


def test_resampling_revives_dead_features_and_resets_adam() -> None:
    sae, dead, optimizer = _sae_with_dead_features()
    x = inputs(32, seed=11)
    assert (sae.encode(x)[:, dead] == 0).all()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {
        n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in sae.named_parameters()
    }
    alive_enc_norm = sae.W_enc.detach()[:, ~dead].norm(dim=0).mean()

    resample_dead_features(sae, optimizer, dead, x)

    fires = (sae.encode(x)[:, dead] > 0).any(dim=0)
    assert fires.all()
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(sae.W_enc[:, dead].norm(dim=0), (0.2 * alive_enc_norm).expand(3))
    assert (sae.b_enc[dead] == 0).all()
    assert torch.equal(sae.W_enc[:, ~dead], before["W_enc"][:, ~dead])
    assert torch.equal(sae.W_dec[~dead], before["W_dec"][~dead])
    assert torch.equal(sae.b_enc[~dead], before["b_enc"][~dead])
    assert torch.equal(sae.b_dec, before["b_dec"])
    for name, axis in (("W_enc", 1), ("W_dec", 0), ("b_enc", 0)):
        state = optimizer.state[getattr(sae, name)]
        for key in ("exp_avg", "exp_avg_sq"):
            old = moments[name][key]
            assert (state[key].index_select(axis, dead.nonzero().squeeze(1)) == 0).all()
            alive_idx = (~dead).nonzero().squeeze(1)
            assert torch.equal(
                state[key].index_select(axis, alive_idx), old.index_select(axis, alive_idx)
            )
            assert old.index_select(axis, alive_idx).abs().sum() > 0
    assert torch.equal(optimizer.state[sae.b_dec]["exp_avg"], moments["b_dec"]["exp_avg"])


def test_resampling_prefers_badly_reconstructed_inputs() -> None:
    """Only one input has any reconstruction error, so every dead feature points along it."""
    sae, dead, optimizer = _sae_with_dead_features()
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.clamp_(max=0.0)  # zero input -> zero activations -> perfect reconstruction
    x = torch.zeros(20, D_IN)
    x[13] = torch.tensor([3.0, -1.0, 0.0, 2.0, 0.5, 1.0])
    resample_dead_features(sae, optimizer, dead, x)
    direction = x[13] / x[13].norm()
    torch.testing.assert_close(sae.W_dec[dead], direction.expand(3, D_IN))


@pytest.mark.parametrize("architecture", ["gated", "jumprelu", "topk"])
def test_resampling_resets_architecture_parameters(architecture: str) -> None:
    sae = make(architecture)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[0, 4]] = True
    resample_dead_features(sae, None, dead, inputs(16))
    if architecture == "gated":
        assert (sae.r_mag[dead] == 0).all() and (sae.b_mag[dead] == 0).all()
        assert (sae.r_mag[~dead] != 0).all()
    if architecture == "jumprelu":
        expected = torch.full((2,), math.log(sae.cfg.jumprelu_init_threshold))
        torch.testing.assert_close(sae.log_threshold[dead].detach(), expected)
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("architecture", KNOWN_ARCHITECTURES)
def test_training_forward_under_bf16_autocast(architecture: str) -> None:
    sae = make(architecture, use_ghost_grads=architecture == "relu")
    dead = torch.arange(D_SAE) % 2 == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_forward(inputs(16), 0.1, dead)
    assert out.losses["mse_loss"].dtype == torch.float32  # compared against the fp32 input
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(sae.W_enc.grad).all()
