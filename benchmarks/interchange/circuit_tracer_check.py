"""circuit-tracer's side (run in an environment with circuit-tracer 0.5, not drrik): load the
set that write_dictionaries.py exported, compare it with SAELens, build an attribution graph.

1. ``load_transcoder_from_hub(<absolute path>)`` loads ``OUT/circuit-tracer`` (an absolute
   path is read as its own cache directory). Each trained layer's forward
   (``encode`` then ``decode`` with the skip term) is compared with SAELens's forward of the
   saved transcoder (``OUT/io/saelens-<name>.safetensors``, from saelens_check.py); every
   padding layer must output zeros.
2. ``ReplacementModel.from_pretrained(model, set, backend="nnsight")`` on the model the set
   names, then ``attribute`` on a short prompt (token ids starting with BOS), reporting the
   graph's size and circuit-tracer's replacement and completeness scores.

The model directory drrik writes comes from transformers 5, whose config.json keeps
``rope_theta`` under ``rope_parameters`` and names a tokenizer class transformers 4.57 lacks;
4.57 would silently fall back to rope_theta 10,000. So step 2 runs on a copy with those two
keys rewritten (weights linked, not copied); the graph's first logit target should be
" Paris".

Prints one JSON object.

    /work/venv-ct/bin/python benchmarks/interchange/circuit_tracer_check.py /tmp/interchange
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

PROMPT = "The capital of France is"


def compare_layers(out: Path, transcoders: Any) -> dict[str, object]:
    """Each exported layer against SAELens's forward of the transcoder it came from."""
    export = json.loads((out / "circuit-tracer" / "drrik_export.json").read_text())
    layers = {int(layer): Path(source).name for layer, source in export["layers"].items()}
    result: dict[str, object] = {}
    with torch.no_grad():
        for layer, name in sorted(layers.items()):
            io = load_file(str(out / "io" / f"saelens-{name}.safetensors"))
            diff = (transcoders.transcoders[layer](io["x"]) - io["out"]).abs().max().item()
            result[f"layer_{layer}"] = {
                "max_abs_vs_saelens": diff,
                "max_rel_vs_saelens": diff / io["out"].abs().max().item(),
            }
        padded = [i for i in range(len(transcoders.transcoders)) if i not in layers]
        outputs = [transcoders.transcoders[i](io["x"]).abs().max().item() for i in padded]
    result["padding_layers"] = len(padded)
    result["padding_max_abs_output"] = max(outputs, default=0.0)
    return result


def compat_model_dir(model_dir: Path, target: Path) -> Path:
    """``model_dir`` readable by transformers 4.57: rope_theta at the top, a known tokenizer."""
    target.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        link = target / f.name
        if f.name not in ("config.json", "tokenizer_config.json") and not link.exists():
            link.symlink_to(f)
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10_000.0))
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (target / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return target


def attribution_graph(out: Path, set_dir: Path, model_name: str) -> dict[str, object]:
    """A replacement model on the exported set and one attribution graph."""
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores

    model_dir = compat_model_dir(Path(model_name), out / "model-transformers-4.57")
    start = time.perf_counter()
    model = ReplacementModel.from_pretrained(
        str(model_dir), str(set_dir), backend="nnsight", device=torch.device("cpu")
    )
    loaded = time.perf_counter() - start
    tokenizer = model.tokenizer
    ids = [tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
    start = time.perf_counter()
    graph = attribute(
        torch.tensor(ids), model, max_n_logits=5, batch_size=64, max_feature_nodes=256
    )
    replacement, completeness = compute_graph_scores(graph)
    result: dict[str, object] = {
        "model_load_s": round(loaded, 1),
        "attribute_s": round(time.perf_counter() - start, 1),
        "prompt_ids": ids,
        "active_features": int(graph.active_features.shape[0]),
        "selected_features": int(graph.selected_features.shape[0]),
        "adjacency_shape": list(graph.adjacency_matrix.shape),
        "logit_targets": [tokenizer.decode([int(t)]) for t in graph.logit_token_ids],
        "replacement_score": replacement,
        "completeness_score": completeness,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    set_dir = (args.out / "circuit-tracer").resolve()
    results: dict[str, object] = {
        "python": sys.version.split()[0],
        **{
            p: importlib.metadata.version(p)
            for p in ("circuit-tracer", "transformers", "nnsight", "torch")
        },
    }
    transcoders, config = load_transcoder_from_hub(str(set_dir), device=torch.device("cpu"))
    results["loaded"] = {
        "class": type(transcoders).__name__,
        "layers": len(transcoders.transcoders),
        "d_transcoder": transcoders.d_transcoder,
        "skip_connection": transcoders.skip_connection,
        "feature_input_hook": transcoders.feature_input_hook,
        "feature_output_hook": transcoders.feature_output_hook,
    }
    results["layers"] = compare_layers(args.out, transcoders)
    try:
        results["attribution"] = attribution_graph(args.out, set_dir, config["model_name"])
    except Exception as exc:  # the loader result stands on its own; record why the graph failed
        results["attribution"] = {
            "error": f"{type(exc).__name__}: {exc}",
            "where": traceback.format_exc().strip().splitlines()[-3:],
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
