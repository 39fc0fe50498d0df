"""Tutorial 3: steer the model's generation with an SAE feature.

Steering adds a feature's decoder direction to the model's activations at the SAE's hook on
every position while the model generates (Hugging Face's own KV-cached ``generate``). The
strength is in units of the feature's largest activation seen in the analysis (tutorial 2):
5 means "five times as strongly as it ever fired". Clamp mode sets the feature's activation
to the strength instead.

We pick the feature that is most active on a piece of text, then compare greedy completions of
an unrelated prompt at increasing strengths: the baseline (strength 0) is the model's own.

    python tutorials/03_steer_generation.py --run runs/tutorial

The command-line equivalent is ``drrik steer RUN --prompt ... --feature F --compare 0,5,10``.
"""

from __future__ import annotations

import argparse

from drrik.steering import SAESteering


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/tutorial", help="run directory from tutorial 1")
    parser.add_argument("--concept", default="The dog barked at the cat in the garden.")
    parser.add_argument("--prompt", default="My favourite thing to do on a Sunday is")
    parser.add_argument("--strengths", default="2,5,10", help="comma-separated, x max activation")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    steering = SAESteering.from_run(args.run)

    # 1. Which features fire on the concept text? Ranked by activation relative to their max.
    found = steering.find_steering_features(args.concept, top_k=5)
    for row in found:
        print(row)
    feature = found[0]["feature"]

    # 2. Baseline vs steered completions, generated as one batch.
    strengths = [float(s) for s in args.strengths.split(",")]
    steering.compare_steering(args.prompt, feature, strengths, max_new_tokens=args.max_new_tokens)

    # 3. Several features at once, each with its own strength, on a batch of prompts; sampled.
    two = [row["feature"] for row in found[:2]]
    outputs = steering.generate(
        [args.prompt, "Once upon a time"],
        two,
        [strengths[0], strengths[0] / 2],
        max_new_tokens=args.max_new_tokens,
        temperature=0.8,
        seed=0,
    )
    print(f"\nfeatures {two}, sampled: {outputs}")


if __name__ == "__main__":
    main()
