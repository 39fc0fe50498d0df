"""Tutorial 4: your own model and dataset from the Hugging Face Hub, on a GPU, with wandb.

Any decoder model TransformerLens's TransformerBridge can boot works: a Hub name, a local
directory saved with ``save_pretrained``, or a ``.gguf`` file. Any dataset with a ``text``
column (or pretokenized ``tokens``/``input_ids``) works: a Hub name (streamed, nothing is
downloaded whole) or a local txt/json/jsonl/parquet file or directory.

On a GPU box (the Hub reachable, ``pip install drrik wandb``, then ``wandb login`` or
WANDB_API_KEY in the environment or a .env file):

    python tutorials/04_own_model_gpu_wandb.py \\
        --model EleutherAI/pythia-70m-deduped --hook blocks.3.hook_resid_post \\
        --dataset NeelNanda/pile-10k --device cuda --tokens 50_000_000 \\
        --wandb-mode online --wandb-project my-saes --out runs/pythia-l3

Training curves, the feature-density histogram and the final SAE go to the wandb run; the
report's plots go to a second wandb run of job type "analysis". Use ``--wandb-mode offline``
on machines without network access (``wandb sync`` uploads later), or ``disabled``.
A run stopped by SIGTERM writes a checkpoint; the same command resumes it.

Hub names need the network; for a dry run pass local stand-ins, e.g.
``--model path/to/hf_model_dir --dataset docs.txt --device cpu --tokens 20000``.
"""

from __future__ import annotations

import argparse

from drrik.analysis import AnalysisConfig, analyze
from drrik.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    StoreConfig,
    TrainerConfig,
)
from drrik.pipeline import train
from drrik.report import write_report
from drrik.sae import SAEConfig
from drrik.wandb_logging import WandbConfig, WandbLogger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="EleutherAI/pythia-70m-deduped")
    parser.add_argument("--hook", default="blocks.3.hook_resid_post")
    parser.add_argument("--dataset", default="NeelNanda/pile-10k")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=50_000_000, help="training tokens")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--buffer-batches", type=int, default=64)
    parser.add_argument("--analysis-tokens", type=int, default=1_000_000)
    parser.add_argument("--wandb-mode", default="online", choices=["online", "offline", "disabled"])
    parser.add_argument("--wandb-project", default="drrik")
    parser.add_argument("--out", default="runs/own-model")
    args = parser.parse_args()

    on_gpu = args.device.startswith("cuda")
    wandb_cfg = WandbConfig(wandb_mode=args.wandb_mode, wandb_project=args.wandb_project)
    cfg = RunConfig(
        # A bf16 model halves memory and doubles throughput on a GPU; the SAE stays fp32.
        model=ModelConfig(
            model=args.model,
            hook=args.hook,
            device=args.device,
            model_dtype="bfloat16" if on_gpu else "float32",
        ),
        data=DataConfig(dataset=args.dataset, context_size=args.context_size),
        store=StoreConfig(
            train_batch_size_tokens=args.batch_tokens,
            n_batches_in_buffer=args.buffer_batches,
            store_batch_size_prompts=32 if on_gpu else 8,
        ),
        sae=SAEConfig(architecture="topk", k=64, expansion_factor=16),
        trainer=TrainerConfig(
            training_tokens=args.tokens,
            lr=2e-4,
            lr_warm_up_steps=1000 if args.tokens > 10_000_000 else 0,
            lr_decay_steps=args.tokens // args.batch_tokens // 5,
            autocast=on_gpu,  # bf16 autocast for the SAE's matmuls
        ),
        eval=EvalConfig(eval_every_tokens=args.tokens // 10, eval_contexts=256 if on_gpu else 8),
        wandb=wandb_cfg,
        out=args.out,
    )
    train(cfg)

    # Analyse on the GPU too, then log the report's plots to wandb.
    analyze(args.out, AnalysisConfig(n_tokens=args.analysis_tokens), device=args.device)
    analysis_wandb = WandbConfig(
        wandb_mode=args.wandb_mode,
        wandb_project=args.wandb_project,
        wandb_run_name=f"{cfg.out.rstrip('/').split('/')[-1]}-report",
    )
    logger = WandbLogger(analysis_wandb, args.out, {"run": args.out, "job_type": "analysis"})
    try:
        index = write_report(args.out, wandb_run=logger.run)
    finally:
        logger.finish()
    print(f"report: {index.resolve().as_uri()}")


if __name__ == "__main__":
    main()
