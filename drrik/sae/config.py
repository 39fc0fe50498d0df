"""The SAE's own configuration: architecture, size, loss coefficients.

One flat dataclass for every architecture, so the CLI exposes each field once
(``--d-sae``, ``--k``, ``--l1-coefficient``). Fields an architecture does not use keep their
defaults; combinations that cannot work are refused in ``__post_init__`` with a one-line
:class:`~drrik.errors.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from simple_parsing.helpers import Serializable

from drrik import dtypes
from drrik.errors import require
from drrik.sae.registry import ARCHITECTURES, sae_class

DEFAULT_EXPANSION_FACTOR = 8
DEFAULT_L1_COEFFICIENT = 5.0
DEFAULT_K = 64
"""Features per token a topk/batchtopk keeps when neither k nor target_l0 is given: the
default run's sparsity (benchmarks/README.md, default_sae.py)."""


DICTIONARIES = ("sae", "crosscoder", "clt")
"""What one dictionary covers (``SAEConfig.dictionary``)."""
CLT_ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
"""The sparsity mechanisms a cross-layer transcoder's features may have."""


@dataclass
class SAEConfig(Serializable):
    """Shape, architecture and loss of one sparse autoencoder."""

    architecture: str = "topk"
    """SAE architecture: topk, batchtopk, matryoshka_batchtopk, relu, jumprelu or gated."""

    d_in: int = 0
    """Input width; 0 means 'take it from the model's hook at run time'."""

    d_out: int = 0
    """Output width of a transcoder; 0 means d_in (an SAE reconstructs its own input)."""

    skip_connection: bool = False
    """Transcoders only: add a trained linear skip x @ W_skip.T to the output (Paulo et al.
    2025, arXiv 2501.18823)."""

    d_sae: int | None = None
    """Number of features; set this or expansion_factor, not both."""

    expansion_factor: int | None = None
    """d_sae = expansion_factor * d_in when d_sae is not set (8 when neither is set)."""

    k: int | None = None
    """Active features per token for topk; average active features per token for batchtopk;
    unset = target_l0, else 64."""

    target_l0: int | None = None
    """Active features per token to train to. topk/batchtopk: k = target_l0 (leave k unset).
    relu/gated/jumprelu: a controller adapts the sparsity coefficient during training until
    the measured L0 matches, starting from l1_coefficient."""

    l1_coefficient: float = DEFAULT_L1_COEFFICIENT
    """Sparsity coefficient: L1 weight for relu/gated, L0 weight for jumprelu; unused by topk.
    With target_l0, the controller's starting value."""

    scale_sparsity_by_decoder_norm: bool = True
    """Weight each feature's L1 by its decoder-row norm (Anthropic, April 2024)."""

    normalize_decoder: bool | None = None
    """Keep decoder rows at unit norm; unset = the architecture's default (see docs)."""

    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding."""

    jumprelu_init_threshold: float = 0.001
    """JumpReLU: initial threshold of every feature (with ``target_l0``, the floor of the
    thresholds the data gives)."""

    jumprelu_bandwidth: float = 0.05
    """JumpReLU: width of the rectangle kernel in the straight-through estimator (SAELens's
    default). On inputs scaled to norm sqrt(d_in), 0.001 caught so few pre-activations that
    the thresholds hardly answered the coefficient and --target-l0 missed by 40 percent
    (benchmarks/)."""

    aux_k_coefficient: float = 1 / 32
    """TopK/BatchTopK: weight of the AuxK loss that lets dead features model the residual."""

    aux_k: int | None = None
    """TopK/BatchTopK: dead features used by AuxK; unset = d_in // 2 (OpenAI, 2024)."""

    use_ghost_grads: bool = False
    """ReLU only: ghost gradients for dead features."""

    batchtopk_threshold_momentum: float = 0.9
    """BatchTopK: EMA momentum of the inference threshold (min kept activation per batch).
    The activations drift while training, so the EMA lags by about 1 / (1 - momentum) steps:
    at 0.99 the threshold ended 10 to 20 percent above the last batches' and kept 23 to 30
    percent fewer than k features per held-out token after a few hundred steps."""

    matryoshka_widths: list[int] = field(default_factory=list)
    """matryoshka_batchtopk: the nested prefix widths, increasing and ending at d_sae (e.g.
    576 2304 4608); each prefix of the features is trained to reconstruct alone. Empty =
    d_sae/8, d_sae/4, d_sae/2, d_sae."""

    dtype: str = "float32"
    """Parameter dtype: float32, float64, bfloat16 or float16."""

    dictionary: str = "sae"
    """What one dictionary covers: sae (one per --hook: an SAE, or a transcoder with
    --target-hook), crosscoder (one reading every --hook jointly) or clt (a cross-layer
    transcoder over --layers, from each layer's --hook to its and every later --target-hook)."""

    hook_widths: list[int] = field(default_factory=list)
    """Filled at run time for a crosscoder or CLT: the width of each hook it reads, in order
    (d_in is their sum)."""

    def __post_init__(self) -> None:
        # Importing this module imports drrik.sae first, whose architecture imports fill the
        # registry before any config exists.
        require(
            self.architecture in ARCHITECTURES,
            "architecture",
            self.architecture,
            f"use one of {', '.join(ARCHITECTURES)}",
        )
        require(
            self.dictionary in DICTIONARIES,
            "dictionary",
            self.dictionary,
            f"use one of {', '.join(DICTIONARIES)}",
        )
        require(
            self.dictionary != "clt" or self.architecture in CLT_ARCHITECTURES,
            "architecture",
            self.architecture,
            f"a CLT's features are {', '.join(CLT_ARCHITECTURES)}",
        )
        sae_cls = sae_class(self)
        require(
            all(w > 0 for w in self.hook_widths),
            "hook_widths",
            self.hook_widths,
            "use positive widths (or leave it empty: the run fills it)",
        )
        require(self.d_in >= 0, "d_in", self.d_in, "use a positive width (or 0 = from the model)")
        require(self.d_out >= 0, "d_out", self.d_out, "use a positive width (or 0 = d_in)")
        require(
            self.d_sae is None or self.expansion_factor is None,
            "d_sae",
            self.d_sae,
            "set either d_sae or expansion_factor, not both",
        )
        require(self.d_sae is None or self.d_sae > 0, "d_sae", self.d_sae, "use a positive int")
        require(
            self.expansion_factor is None or self.expansion_factor > 0,
            "expansion_factor",
            self.expansion_factor,
            "use a positive int",
        )
        if sae_cls.needs_k:
            require(
                self.k is None or self.target_l0 is None,
                "target_l0",
                self.target_l0,
                f"it sets {self.architecture}'s k, and k={self.k} is set too; drop one of them",
            )
        require(self.k is None or self.k > 0, "k", self.k, "use a positive int")
        require(
            self.target_l0 is None or self.target_l0 > 0,
            "target_l0",
            self.target_l0,
            "use a positive number of active features per token",
        )
        self.check_widths()
        require(
            self.target_l0 is None or sae_cls.needs_k or self.l1_coefficient > 0,
            "l1_coefficient",
            self.l1_coefficient,
            "with target_l0 it is the controller's starting coefficient; use a value > 0",
        )
        require(self.aux_k is None or self.aux_k > 0, "aux_k", self.aux_k, "use a positive int")
        for name in ("l1_coefficient", "aux_k_coefficient"):
            value = getattr(self, name)
            require(value >= 0, name, value, "use a coefficient >= 0")
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            value = getattr(self, name)
            require(value > 0, name, value, "use a value > 0")
        require(
            0.0 <= self.batchtopk_threshold_momentum < 1.0,
            "batchtopk_threshold_momentum",
            self.batchtopk_threshold_momentum,
            "use a momentum in [0, 1)",
        )
        for width in self.matryoshka_widths:
            require(width > 0, "matryoshka_widths", self.matryoshka_widths, "use widths > 0")
        require(
            sorted(set(self.matryoshka_widths)) == self.matryoshka_widths,
            "matryoshka_widths",
            self.matryoshka_widths,
            "list the prefix widths in increasing order, ending at d_sae",
        )
        require(
            not self.use_ghost_grads or sae_cls.supports_ghost_grads,
            "use_ghost_grads",
            self.use_ghost_grads,
            f"ghost grads exist for architecture=relu only, not {self.architecture}",
        )
        dtypes.torch_dtype(self.dtype)  # refuses an unknown name

    def resolved_d_out(self) -> int:
        """Output width: d_out, else d_in."""
        return self.d_out or self.d_in

    def resolved_d_sae(self) -> int:
        """Number of features: d_sae, else expansion_factor * d_in (8x when neither is set)."""
        if self.d_sae is not None:
            return self.d_sae
        require(self.d_in > 0, "d_in", self.d_in, "set d_in (or d_sae) before sizing the SAE")
        return (self.expansion_factor or DEFAULT_EXPANSION_FACTOR) * self.d_in

    def resolved_k(self) -> int:
        """Features a topk/batchtopk keeps per token: k, else target_l0, else DEFAULT_K."""
        if self.k is not None:
            return self.k
        return self.target_l0 if self.target_l0 is not None else DEFAULT_K

    def resolved_normalize_decoder(self) -> bool:
        """Whether decoder rows are held at unit norm.

        Default: topk, batchtopk and jumprelu normalize (their sparsity terms ignore decoder
        norms, so unit rows only remove a scale ambiguity), and so does gated (measured:
        GatedSAE.default_normalize_decoder). relu normalizes only when the L1 is *not* weighted
        by decoder norms; with the weighted L1 (April 2024 recipe) the penalty already removes
        the incentive to grow rows, so rows stay free.
        """
        if self.normalize_decoder is not None:
            return self.normalize_decoder
        return sae_class(self).default_normalize_decoder(self)

    def resolved_aux_k(self) -> int:
        """Dead features the AuxK loss may use: aux_k, else d_in // 2, at most d_sae."""
        aux_k = self.aux_k if self.aux_k is not None else max(self.d_in // 2, 1)
        return min(aux_k, self.resolved_d_sae())

    def resolved_matryoshka_widths(self) -> list[int]:
        """The nested prefix widths: matryoshka_widths, else d_sae/8, d_sae/4, d_sae/2, d_sae
        (narrower prefixes dropped where d_sae is too small to halve)."""
        if self.matryoshka_widths:
            return list(self.matryoshka_widths)
        d_sae = self.resolved_d_sae()
        return sorted({d_sae // 8, d_sae // 4, d_sae // 2, d_sae} - {0})

    def l0_units(self) -> int:
        """How many ``k`` / ``target_l0`` a token's L0 holds: one per layer for a CLT, whose
        sparsity is set per layer, else one."""
        return max(len(self.hook_widths), 1) if self.dictionary == "clt" else 1

    def n_layers(self) -> int:
        """Layers a CLT covers: one per hook it reads."""
        return len(self.hook_widths)

    def check_clt(self) -> None:
        """A CLT's shape: equal layer widths that make up d_in, an output as wide as its input,
        the same number of features in every layer, no skip connection."""
        widths, n_layers = self.hook_widths, self.n_layers()
        require(len(set(widths)) == 1, "hook_widths", widths, "a CLT's layers share one width")
        require(
            self.d_in in (0, sum(widths)),
            "d_in",
            self.d_in,
            f"a CLT reads its layers' inputs side by side: d_in = {sum(widths)}",
        )
        require(
            self.d_out in (0, sum(widths)),
            "d_out",
            self.d_out,
            f"a CLT writes every layer it reads: d_out = {sum(widths)}",
        )
        require(
            not self.skip_connection,
            "skip_connection",
            True,
            "a CLT has no skip connection (circuit-tracer neither saves nor loads one)",
        )
        if self.d_in > 0 or self.d_sae is not None:
            d_sae = self.resolved_d_sae()
            require(
                d_sae % n_layers == 0,
                "d_sae",
                d_sae,
                f"a CLT gives each of its {n_layers} layers d_sae / {n_layers} features",
            )
            if sae_class(self).needs_k:
                k = self.resolved_k()
                per_layer = d_sae // n_layers
                require(k <= per_layer, "k", k, f"k is per layer: use k <= {per_layer}")

    def torch_dtype(self) -> torch.dtype:
        """The parameter dtype as a torch dtype."""
        return dtypes.DTYPES[self.dtype]

    def check_buildable(self) -> None:
        """Checks that need d_in; run when the SAE is built, after the trainer fills d_in."""
        require(self.d_in > 0, "d_in", self.d_in, "set d_in (the hook's width) before building")
        self.check_widths()

    def check_widths(self) -> None:
        """k and target_l0 fit the widths known so far: at most d_sae features can fire, and
        an L0 above d_in is no longer a sparse code of the input. Run at construction when a
        width is given, and again when the SAE is built, after the trainer fills d_in."""
        known = self.d_in > 0 or self.d_sae is not None
        if self.dictionary == "clt" and self.hook_widths:
            self.check_clt()
        if known and self.matryoshka_widths and self.architecture == "matryoshka_batchtopk":
            d_sae = self.resolved_d_sae()
            require(
                self.matryoshka_widths[-1] == d_sae,
                "matryoshka_widths",
                self.matryoshka_widths,
                f"end the prefix widths at d_sae ({d_sae})",
            )
        if self.target_l0 is None:  # else k is target_l0, checked below under its own name
            if known and ARCHITECTURES[self.architecture].needs_k:
                d_sae, k = self.resolved_d_sae(), self.resolved_k()
                require(k <= d_sae, "k", k, f"use k <= d_sae ({d_sae})")
            return
        if self.d_in > 0:
            require(
                self.target_l0 <= self.d_in,
                "target_l0",
                self.target_l0,
                f"use target_l0 <= d_in ({self.d_in})",
            )
        if known:
            d_sae = self.resolved_d_sae()
            require(
                self.target_l0 <= d_sae,
                "target_l0",
                self.target_l0,
                f"use target_l0 <= d_sae ({d_sae})",
            )
