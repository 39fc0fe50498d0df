"""Tutorial 5: train a transcoder for every layer, read one feature, export the set for circuits.

A transcoder reads one hook and reconstructs another: here each layer's MLP input
``blocks.{layer}.mlp.hook_in`` -> its output ``blocks.{layer}.hook_mlp_out``, so its features
stand in for the MLP's computation, which is what attribution graphs need. Each transcoder has
a linear skip (output = decode(encode(x)) + x @ W_skipᵀ), which takes the MLP's linear part off
the features. All layers train from one forward pass per batch, and the run saves each one in
its own directory:

    runs/transcoders/final/blocks.N.mlp.hook_in/     layer N's transcoder (cfg.json + safetensors)
    runs/transcoders/final/spliced_together.json     every transcoder spliced in at once
    runs/transcoders/analysis/blocks.N.mlp.hook_in/  the analysed layer's feature statistics
    runs/transcoders/circuit-tracer/                 the set in circuit-tracer's layout

Then one layer's transcoder is analysed like an SAE (tutorial 2): a feature's top contexts
show what it reads, and its decoder row through the unembedding shows what it writes.

    python tutorials/05_transcoders.py --out runs/transcoders

The default trains all 30 layers of the embedded SmolLM2; ``--layers 3 10`` trains fewer. The
command-line equivalent is ``drrik train --architecture topk --k 32 --skip-connection --hook
'blocks.{layer}.mlp.hook_in' --target-hook 'blocks.{layer}.hook_mlp_out' --layers all
--eval-together``, then ``drrik export RUN --to circuit-tracer --out DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from drrik.analysis import AnalysisConfig, analyze
from drrik.config import DataConfig, EvalConfig, ModelConfig, RunConfig, StoreConfig, TrainerConfig
from drrik.export_circuit_tracer import EXPORT_RECORD_FILE, export_transcoder_set
from drrik.model import resolve_model_source
from drrik.pipeline import train
from drrik.sae import SAEConfig

READS = "blocks.{layer}.mlp.hook_in"
WRITES = "blocks.{layer}.hook_mlp_out"


def model_layers(model: str) -> int:
    """The model's layer count, from its Hugging Face config (the embedded model's is local)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_source(model)).num_hidden_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/transcoders", help="run directory")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", nargs="+", default=["all"], help="layer numbers, or all")
    parser.add_argument("--tokens", type=int, default=250_000, help="training tokens")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=4096, help="activations per step")
    parser.add_argument("--buffer-batches", type=int, default=16, help="model batches mixed")
    parser.add_argument("--eval-contexts", type=int, default=64)
    parser.add_argument("--analysis-tokens", type=int, default=65_536, help="tokens to analyse")
    parser.add_argument("--analyze-layer", type=int, help="default: the middle trained layer")
    parser.add_argument("--export", help="circuit-tracer directory (default: OUT/circuit-tracer)")
    args = parser.parse_args()

    # 1. Describe the run: one (input, target) hook pair per layer, each a transcoder.
    n_layers = model_layers(args.model)
    cfg = RunConfig(
        model=ModelConfig(model=args.model, hook=[READS], target_hook=[WRITES], layers=args.layers),
        data=DataConfig(context_size=args.context_size),
        store=StoreConfig(
            train_batch_size_tokens=args.batch_tokens, n_batches_in_buffer=args.buffer_batches
        ),
        sae=SAEConfig(architecture="topk", k=32, expansion_factor=8, skip_connection=True),
        trainer=TrainerConfig(training_tokens=args.tokens, lr=1e-3),
        # eval_together also splices every layer's transcoder in during one forward pass.
        eval=EvalConfig(eval_contexts=args.eval_contexts, eval_together=True),
        out=args.out,
    )
    layers = [int(reads.split(".")[1]) for reads, _ in cfg.model.hook_pairs(n_layers)]

    # 2. Train every layer at once. The held-out metrics splice each transcoder's output into
    #    its MLP's output; the baseline zero-ablates that MLP.
    final = train(cfg)
    print(f"\nheld-out evaluation of {len(layers)} transcoders (model has {n_layers} layers):")
    print(f"  {'layer':>5} {'explained_var':>13} {'l0':>8} {'ce_recovered':>12} {'dead':>6}")
    for layer in layers:
        m = final[READS.format(layer=layer)]
        print(
            f"  {layer:>5} {m['explained_variance']:13.4g} {m['l0']:8.4g} "
            f"{m['ce_loss_recovered']:12.4g} {m['dead_features']:6d}"
        )
    together = final["spliced_together"]
    print(f"  all spliced in together: ce_loss_recovered {together['ce_loss_recovered']:.4g}")

    # 3. Analyse one layer's transcoder: what its features read (top contexts on the input
    #    hook) and what they write (the decoder row through the unembedding, as logits).
    layer = args.analyze_layer if args.analyze_layer is not None else layers[len(layers) // 2]
    results = analyze(
        args.out, AnalysisConfig(n_tokens=args.analysis_tokens), sae_name=READS.format(layer=layer)
    )
    alive = int((results.tensors["count"] > 0).sum())
    print(f"\nlayer {layer}: analysed {results.n_tokens:,} tokens; {alive} features fired")
    feature = int(results.max_activation.argmax())
    print(f"feature {feature}: density {float(results.density[feature]):.2e}, top contexts:")
    for example in results.top_examples(feature)[:3]:
        text = "".join(
            f"[[{results.token(t)}]]" if i == example.max_index else results.token(t)
            for i, t in enumerate(example.token_ids)
        )
        print(f"  {example.activation:7.3g}  {text!r}")
    promoted, suppressed = results.logit_effects(feature)
    print(f"  writes: promotes {[token for token, _ in promoted[:8]]}")
    print(f"          suppresses {[token for token, _ in suppressed[:8]]}")

    # 4. Export the set for circuit-tracer: one file per model layer, untrained ones zero.
    out = Path(args.export or Path(args.out) / "circuit-tracer")
    exported = export_transcoder_set(Path(args.out), out, n_layers=n_layers)
    trained = json.loads((exported / EXPORT_RECORD_FILE).read_text())["layers"]
    files = len(list(exported.glob("layer_*.safetensors")))
    print(f"\ncircuit-tracer transcoder set: {files} layer files, {len(trained)} trained")
    print(f"exported to {exported}")


if __name__ == "__main__":
    main()
