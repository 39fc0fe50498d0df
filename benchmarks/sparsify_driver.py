"""EleutherAI sparsify's side of compare_sparsify.py: train its TopK SAE on the saved contexts.

Runs in sparsify's own virtual environment (``pip install torch==2.13.0`` first, the CPU
build, then ``pip install eai-sparsify``), never drrik's: only the standard library and
compare_saelens's process helpers (stdlib too) are imported at the top. No hub access: the
model is the local HF directory and the data is the dataset compare_saelens.prepare_data saved.

Everything left to sparsify is its default for a run from Python: ``sparsify.Trainer`` with a
``TrainConfig`` (signum with schedule-free averaging, its width-scaled lr, no AuxK, b_dec started
at the first batch's mean, unit decoder rows, raw activations: no input normalization), the
dataset shuffled with its CLI's seed (42) and batches of whole contexts, the model in the dtype
its CLI picks on a CPU (the config's: float32) unless the spec says otherwise. What the
comparison fixes: the layer (``layers.N``, the residual stream after block N, i.e. TransformerLens
``blocks.N.hook_resid_post``), d_sae, k, the contexts, the excluded special tokens, the token
budget (whole batches, at least the budget of trainable tokens) and the seed.

    python benchmarks/sparsify_driver.py --spec SPEC.json --result RESULT.json

After training it saves a check file next to the SAE: layer activations of a few held-out
contexts and sparsify's own reconstruction of them, which compare_sparsify.py uses to check
that drrik's evaluator reads the converted SAE exactly as sparsify computes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_saelens import RSSMonitor, RunSpec  # noqa: E402  (stdlib only at import)

CHECK_FILE = "check.safetensors"


@dataclass
class SparsifySpec(RunSpec):
    """A RunSpec plus what only sparsify takes."""

    optimizer: str = "signum"  # sparsify's default
    sparsify_lr: float | None = None  # None: sparsify's own choice (scaled by width)
    exclude_tokens: list[int] = field(default_factory=list)
    check_contexts: int = 4

    @property
    def layer(self) -> int:
        """N of ``blocks.N.hook_resid_post``: sparsify hooks the output of ``layers.N``."""
        parts = self.hook.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_post":
            raise ValueError(
                f"sparsify hooks a layer's output: blocks.N.hook_resid_post, not {self.hook}"
            )
        return int(parts[1])


def training_rows(tokens: Any, exclude: Any, budget: int, batch_rows: int) -> tuple[int, int]:
    """The fewest whole batches of contexts holding at least ``budget`` trainable tokens, as
    (contexts, trainable tokens)."""
    import torch

    trainable = (~torch.isin(tokens, exclude)).sum(1).cumsum(0)
    rows = int(torch.searchsorted(trainable, budget)) + 1
    rows = -(-rows // batch_rows) * batch_rows
    if rows > len(tokens):
        raise ValueError(f"{len(tokens)} contexts hold fewer than {budget} trainable tokens")
    return rows, int(trainable[rows - 1])


def sparsify_worker(spec: SparsifySpec) -> dict[str, Any]:
    import datasets
    import torch
    from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer
    from transformers import AutoModel

    monitor = RSSMonitor()
    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()
    # AutoModel: the base model without the LM head, as sparsify's CLI loads it for loss "fvu".
    model = AutoModel.from_pretrained(spec.model_dir, dtype=getattr(torch, spec.model_dtype))
    model_load_s = time.perf_counter() - t0
    rss_model = RSSMonitor.rss_mib()
    t1 = monitor.now()
    data = datasets.load_from_disk(spec.data_dir)
    train = data["train"].rename_column("tokens", "input_ids").shuffle(seed=42)
    exclude = torch.tensor(spec.exclude_tokens, dtype=torch.long)
    batch_rows = spec.train_batch // spec.context_size
    rows, trainable = training_rows(
        torch.tensor(train[:]["input_ids"]), exclude, spec.tokens, batch_rows
    )
    train = train.select(range(rows)).with_format("torch")
    cfg = TrainConfig(
        SaeConfig(num_latents=spec.d_sae, k=spec.k),
        batch_size=batch_rows,
        optimizer=spec.optimizer,  # type: ignore[arg-type]
        lr=spec.sparsify_lr,
        exclude_tokens=spec.exclude_tokens,
        layers=[spec.layer],
        init_seeds=[spec.seed],
        save_every=10**9,  # only the final save
        log_to_wandb=False,
        save_dir=spec.out_dir,
        run_name="sparsify",
    )
    marks: dict[str, float] = {}
    save, fit = Trainer.save, Trainer.fit

    def timed_save(self: Any) -> None:
        monitor.mark(marks, "to")  # the loop ends at the final save
        save(self)

    def timed_fit(self: Any) -> None:
        monitor.mark(marks, "from")
        fit(self)

    Trainer.save, Trainer.fit = timed_save, timed_fit  # type: ignore[method-assign]
    Trainer(cfg, train, model).fit()
    total_s = monitor.now() - t1
    memory = monitor.stop(marks)
    sae_dir = Path(spec.out_dir) / "sparsify" / f"layers.{spec.layer}"
    save_check(spec, model, SparseCoder.load_from_disk(sae_dir), data["test"], sae_dir)
    return {
        "model_load_s": model_load_s,
        "setup_s": marks["from"] - t1,
        "train_loop_s": marks["to"] - marks["from"],
        "total_s_excl_model_load": total_s,
        "training_tokens": trainable,
        "training_contexts": rows,
        "steps": rows // batch_rows,
        "lr": cfg.lr,
        "rss_after_model_load_mib": round(rss_model, 1),
        "torch_threads": torch.get_num_threads(),
        "sae_dirs": {"topk": str(sae_dir)},
        **memory,
    }


def save_check(spec: SparsifySpec, model: Any, sae: Any, test: Any, sae_dir: Path) -> None:
    """Layer activations of the first held-out contexts (fp32 model) and sparsify's output."""
    import torch
    from safetensors.torch import save_file

    tokens = torch.tensor(test[: spec.check_contexts]["tokens"])
    captured: list[torch.Tensor] = []
    layer = model.base_model.layers[spec.layer]
    handle = layer.register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model.float()(tokens)
        handle.remove()
        x = captured[0].flatten(0, 1).float()
        top_acts, top_indices, _ = sae.encode(x)
        out = sae.decode(top_acts, top_indices)
    save_file({"tokens": tokens, "x": x, "sae_out": out}, str(sae_dir / CHECK_FILE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default="sparsify", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args()
    spec = SparsifySpec(**json.loads(args.spec.read_text()))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    args.result.write_text(json.dumps(sparsify_worker(spec)))


if __name__ == "__main__":
    main()
