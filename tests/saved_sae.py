"""A saved SAE on the tiny model whose features span densities from 30% to dead, for the
analysis, report, steering and compat tests (no training needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from drrik.model import run_hooks
from drrik.sae import SAE, SAEConfig, build_sae, save_sae

HOOK = "blocks.1.hook_resid_post"
D_SAE = 96
N_DEAD = 4
CONTEXT_SIZE = 32


def text_file(path: Path, paragraphs: int = 400) -> Path:
    """Varied English prose (Python's bundled docs), one paragraph per document."""
    from pydoc_data.topics import topics

    text = "\n\n".join(" ".join(p.split()) for t in topics.values() for p in t.split("\n\n"))
    chunks = [c for c in text.split("\n\n") if len(c) > 40][:paragraphs]
    path.write_text("\n\n".join(chunks))
    return path


def sparse_sae(model: Any, seed: int = 0) -> SAE:
    """A ReLU SAE whose encoder biases give feature f a density near logspace(-0.5, -3)[f]
    on random tokens, and whose last ``N_DEAD`` features never fire."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(architecture="relu", d_in=model.cfg.d_model, d_sae=D_SAE))
    tokens = torch.randint(3, 5000, (16, CONTEXT_SIZE))
    x = run_hooks(model, tokens, [HOOK])[HOOK].reshape(-1, sae.d_in)
    pre = sae.pre_acts(x).sort(dim=0).values  # [tokens, d_sae], ascending
    density = torch.logspace(-0.5, -3, D_SAE)
    rank = ((1 - density) * (pre.shape[0] - 1)).long()
    with torch.no_grad():
        sae.b_enc -= pre.gather(0, rank[None]).squeeze(0)
        sae.b_enc[-N_DEAD:] = -1e4
    return sae.eval()


def make_run(run_dir: Path, model: Any, model_dir: Path, dataset: Path) -> Path:
    """``run_dir/final`` holding :func:`sparse_sae` with the metadata a trained run records."""
    metadata = {
        "model_name": str(model_dir),
        "hook_name": HOOK,
        "context_size": CONTEXT_SIZE,
        "prepend_bos": True,
        "dataset_path": str(dataset),
    }
    save_sae(sparse_sae(model), run_dir / "final", metadata=metadata)
    return run_dir


TC_IN, TC_OUT = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"


def saved_transcoder(path: Path, model_dir: Path, sae: SAE, dataset: Path) -> Path:
    """``sae`` saved at ``path`` as a transcoder of block 1's MLP (input hook -> output hook)."""
    metadata = {
        "model_name": str(model_dir),
        "hook_name": TC_IN,
        "hook_name_out": TC_OUT,
        "context_size": 32,
        "dataset_path": str(dataset),
    }
    save_sae(sae, path, metadata=metadata)
    return path
