"""``drrik report``: one self-contained HTML file about a trained SAE and its features.

The report is a single ``report/index.html`` with every image embedded (PNG data URIs) and no
external resource, so it opens offline and can be mailed or archived as one file. The overview
page shows the run summary, final metrics and plots; each selected feature has its own page
(``index.html#f<id>``, shown by CSS ``:target``): statistics, activation histogram, logit
effects, top contexts and quantile-band examples with every token coloured by activation.
The PNGs are also written to ``report/plots/`` and, when a wandb run is given, logged there.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from drrik import plots
from drrik.analysis import AnalysisResults, Example, analyze
from drrik.errors import require
from drrik.logs import get_logger
from drrik.run_dir import RunDir, write_text_atomic
from drrik.saved import SavedSAE

log = get_logger(__name__)

REPORT_DIR = "report"
REPORT_FILE = "index.html"
DEFAULT_N_FEATURES = 20

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
nav { position: sticky; top: 0; background: #23395d; color: #fff; padding: 8px 16px;
      font-size: 14px; z-index: 1; }
nav a { color: #cfe0ff; margin-right: 6px; }
main { padding: 8px 24px 40px; max-width: 1200px; }
.page { display: none; scroll-margin-top: 3em; }
.page:target { display: block; }
body:not(:has(.page:target)) #overview { display: block; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #eef1f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; background: #fff; margin: 4px 0; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.example { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap;
           background: #fff; border: 1px solid #e3e3e3; padding: 4px 6px; margin: 3px 0; }
.example .act { color: #666; display: inline-block; width: 5.5em; }
.tok { border-radius: 2px; }
.tok.max { outline: 2px solid #c0392b; }
.logits td.pos { color: #1b7a3d; } .logits td.neg { color: #a4262c; }
h3 { margin-top: 20px; }
"""

_CHECK_SCRIPT = """
addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).length;
  const page = document.querySelector(".page:target") || document.getElementById("overview");
  const shown = getComputedStyle(page).display !== "none";
  document.body.dataset.check =
    `images=${images.length} broken=${broken} page=${page.id} shown=${shown}`;
});
"""


def select_features(results: AnalysisResults, n: int = DEFAULT_N_FEATURES) -> list[int]:
    """``n`` features that fired, evenly spread from the rarest to the most frequent."""
    alive = (results.tensors["count"] > 0).nonzero().flatten()
    order = alive[results.density[alive].argsort()]
    if len(order) <= n:
        return order.tolist()
    picks = torch.linspace(0, len(order) - 1, n).round().long()
    return order[picks].tolist()


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td class='num'>{_fmt(v)}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _token_text(text: str) -> str:
    return html.escape(text.replace("\n", "\u21b5"))


def _example_html(results: AnalysisResults, example: Example, scale: float) -> str:
    spans = []
    for i, (token, act) in enumerate(zip(example.token_ids, example.activations, strict=True)):
        alpha = min(max(act / scale, 0.0), 1.0) if scale > 0 else 0.0
        cls = "tok max" if i == example.max_index else "tok"
        style = f"background: rgba(255, 128, 0, {alpha:.2f})" if alpha > 0 else ""
        spans.append(
            f'<span class="{cls}" style="{style}" title="{act:.4g}">'
            f"{_token_text(results.token(token))}</span>"
        )
    return (
        f'<div class="example"><span class="act">{example.activation:.3g}</span>'
        f"{''.join(spans)}</div>"
    )


def _logits_html(results: AnalysisResults, feature: int) -> str:
    promoted, suppressed = results.logit_effects(feature)
    if not promoted:
        return "<p>No direct logit effect: the SAE does not write to the residual stream.</p>"
    rows = "".join(
        f"<tr><td class='pos'>{_token_text(p)}</td><td class='num'>{pv:+.3g}</td>"
        f"<td class='neg'>{_token_text(n)}</td><td class='num'>{nv:+.3g}</td></tr>"
        for (p, pv), (n, nv) in zip(promoted, suppressed, strict=True)
    )
    head = "<tr><th>promoted</th><th>logit</th><th>suppressed</th><th>logit</th></tr>"
    return f"<table class='logits'>{head}{rows}</table>"


def _feature_page(results: AnalysisResults, feature: int, histogram: Path) -> str:
    density = float(results.density[feature])
    count = int(results.tensors["count"][feature])
    rank = float((results.density < density).double().mean())
    scale = float(results.max_activation[feature])
    stats = _table(
        [
            ("density", density),
            ("fires on", f"{count:,} of {results.n_tokens:,} tokens"),
            ("density percentile", f"{100 * rank:.0f}%"),
            ("max activation", scale),
            ("mean activation when active", float(results.mean_activation[feature])),
        ]
    )
    top = "".join(_example_html(results, e, scale) for e in results.top_examples(feature))
    bands = "".join(
        f"<h4>{html.escape(label)}</h4>" + "".join(_example_html(results, e, scale) for e in ex)
        for label, ex in results.band_examples(feature)
    )
    return f"""
<section class="page feature" id="f{feature}">
<h2>Feature {feature}</h2>
<div class="row"><div>{stats}</div><div>{_img(histogram, f"activation histogram {feature}")}</div>
</div>
<h3>Logit effects (direct, through the unembedding)</h3>
{_logits_html(results, feature)}
<h3>Top activating contexts</h3>
<p>Token colour: activation relative to the feature's max ({scale:.3g}); the outlined token
holds the context's maximum. Hover a token for its activation.</p>
{top or "<p>none</p>"}
<h3>Quantile-band examples</h3>
<p>A uniform sample of the contexts the feature fires on, cut into bands by activation.</p>
{bands or "<p>none</p>"}
</section>"""


def _summary_rows(saved: SavedSAE, results: AnalysisResults) -> list[tuple[str, Any]]:
    cfg_json = saved.cfg_json
    meta = saved.metadata
    hook = meta.get("hook_name", "")
    # A transcoder reads one hook and writes another: say so, or it reads like an SAE.
    transcoder = "hook_name_out" in meta
    rows: list[tuple[str, Any]] = [
        ("model", meta.get("model_name", "")),
        ("transcoder", f"{hook} → {saved.target_hook}") if transcoder else ("hook", hook),
        ("dataset", meta.get("dataset_path", "")),
        ("architecture", cfg_json.get("architecture", "")),
        ("d_in", cfg_json.get("d_in", "")),
        *([("d_out", cfg_json.get("d_out", ""))] if transcoder else []),
        ("d_sae", cfg_json.get("d_sae", "")),
    ]
    if "k" in cfg_json:
        rows.append(("k", cfg_json["k"]))
    if "training_tokens" in meta:
        rows.append(("training tokens", f"{meta['training_tokens']:,}"))
    rows += [
        ("analysed tokens", f"{results.n_tokens:,} ({results.meta['dataset']})"),
        ("features that fired", f"{int((results.tensors['count'] > 0).sum()):,}"),
        ("SAE directory", str(saved.sae_dir.resolve())),
    ]
    return rows


def write_report(
    path: str | Path,
    *,
    features: Sequence[int] | None = None,
    n_features: int = DEFAULT_N_FEATURES,
    sae_name: str | None = None,
    out: str | Path | None = None,
    analyze_kwargs: dict[str, Any] | None = None,
    wandb_run: Any = None,
) -> Path:
    """Write the report of a run (or saved SAE) and return the path of its ``index.html``.

    The saved analysis is reused; without one, :func:`drrik.analysis.analyze` runs first
    (``analyze_kwargs`` go to it). ``wandb_run``, an initialized wandb run, also gets the plots.
    """
    saved = SavedSAE.locate(path, sae_name)
    out_dir = Path(out) if out is not None else saved.output_dir(REPORT_DIR)
    require(not out_dir.is_file(), "out", str(out_dir), "it is a file; name a directory")
    require(n_features > 0, "n_features", n_features, "use a positive number")
    saved.check_features(features or [], field="features")
    if saved.has_analysis():
        results = saved.load_analysis()
    else:
        log.info("no saved analysis: analysing first (drrik analyze sets its budget)")
        results = analyze(path, sae_name=sae_name, **(analyze_kwargs or {}))
    plot_dir = out_dir / "plots"
    chosen = list(features) if features is not None else select_features(results, n_features)

    images: dict[str, Path] = {}
    metrics = RunDir(saved.run_dir).read_metrics() if saved.run_dir else []
    if metrics:
        images["training_curves"] = plots.plot_training_curves(
            metrics, plot_dir / "training_curves.png"
        )
    images["feature_density"] = plots.plot_feature_density(
        results.density, plot_dir / "feature_density.png"
    )
    stats = {
        "density": results.density,
        "max": results.max_activation,
        "mean": results.mean_activation,
    }
    for by, values in stats.items():
        images[f"top_features_by_{by}"] = plots.plot_top_features(
            values, plot_dir / f"top_features_by_{by}.png", by=by
        )
    histograms = {
        f: plots.plot_activation_histogram(
            *results.histogram(f), plot_dir / f"feature_{f}_histogram.png", f"Feature {f}"
        )
        for f in chosen
    }
    if wandb_run is not None:
        plots.log_to_wandb(wandb_run, images)

    index_rows = "".join(
        f"<tr><td><a href='#f{f}'>{f}</a></td><td class='num'>{float(results.density[f]):.3g}"
        f"</td><td class='num'>{float(results.max_activation[f]):.3g}</td>"
        f"<td class='num'>{float(results.mean_activation[f]):.3g}</td>"
        f"<td>{_token_text(' '.join(t for t, _ in results.logit_effects(f)[0][:5]))}</td></tr>"
        for f in chosen
    )
    eval_metrics = saved.metadata.get("eval", {})
    title = html.escape(f"drrik report: {saved.output_root.name}")
    nav = " ".join(f"<a href='#f{f}'>{f}</a>" for f in chosen)
    plot_html = "".join(_img(p, name) for name, p in images.items())
    pages = "".join(_feature_page(results, f, histograms[f]) for f in chosen)
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{_CSS}</style></head>
<body>
<nav><a href="#overview"><b>drrik report</b></a> features: {nav}</nav>
<main>
<section class="page" id="overview">
<h1>{title}</h1>
{_table(_summary_rows(saved, results))}
{"<h2>Final evaluation</h2>" + _table(list(eval_metrics.items())) if eval_metrics else ""}
<h2>Plots</h2>
{plot_html}
<h2>Selected features</h2>
<table><tr><th>feature</th><th>density</th><th>max</th><th>mean</th><th>top promoted tokens</th>
</tr>{index_rows}</table>
</section>
{pages}
</main>
<script>{_CHECK_SCRIPT}</script>
</body></html>
"""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = out_dir / REPORT_FILE
    write_text_atomic(index, document)
    return index
