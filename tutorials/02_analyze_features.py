"""Tutorial 2: find out what the SAE's features respond to, and open the HTML report.

One streamed pass over held-out text records, per feature: how often it fires, its max and
mean activation, its top-activating contexts (a window of tokens around the strongest token,
with the activation of every token), examples from lower quantile bands, and its direct effect
on the output logits. The results are saved in RUN/analysis/ and reused by the report and by
steering. Then ``write_report`` writes RUN/report/index.html: one self-contained file (open it
in any browser, offline) with the run's metrics, plots and a page per selected feature.

    python tutorials/02_analyze_features.py --run runs/tutorial

The command-line equivalents are ``drrik analyze RUN`` and ``drrik report RUN``.
"""

from __future__ import annotations

import argparse

from drrik.analysis import AnalysisConfig, analyze
from drrik.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/tutorial", help="run directory from tutorial 1")
    parser.add_argument("--tokens", type=int, default=65_536, help="tokens to analyse")
    parser.add_argument("--features", type=int, default=20, help="feature pages in the report")
    args = parser.parse_args()

    # 1. Analyse: memory stays bounded by the SAE's width, whatever the token budget.
    results = analyze(args.run, AnalysisConfig(n_tokens=args.tokens))
    alive = int((results.tensors["count"] > 0).sum())
    print(f"analysed {results.n_tokens:,} tokens; {alive} of {results.d_sae} features fired")

    # 2. The five strongest features, each with its best context (the max token in [[ ]])
    #    and the tokens it pushes up through the unembedding.
    for feature in results.max_activation.argsort(descending=True)[:5].tolist():
        best = results.top_examples(feature)[0]
        text = "".join(
            f"[[{results.token(t)}]]" if i == best.max_index else results.token(t)
            for i, t in enumerate(best.token_ids)
        )
        promoted = [token for token, _ in results.logit_effects(feature)[0][:5]]
        print(
            f"\nfeature {feature}: density {float(results.density[feature]):.2e}, "
            f"max {best.activation:.3g}\n  {text!r}\n  promotes {promoted}"
        )

    # 3. The report: plots and feature pages in one offline HTML file.
    index = write_report(args.run, n_features=args.features)
    print(f"\nreport: {index.resolve().as_uri()}")
    print("next: python tutorials/03_steer_generation.py --run", args.run)


if __name__ == "__main__":
    main()
