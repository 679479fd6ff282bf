"""Does pulling the adapted model back towards the source, or averaging several adaptation runs, lift a domain?

Few-shot adaptation trains the movie-trained candidate for `adapt.steps` steps on 32 rows per class, which can
overfit them. For each held-out domain and seed this draws the shots exactly as `stages.adapt` does and scores, on
the rows adapt scores (split in two stratified halves, A and B, so a variant picked on one can be checked on the other):

- shots only: the candidate adapted on the shots, as `stages.adapt` does (its "shots only" column);
- + unadapted: the mean of its class probabilities and the unadapted candidate's (two models at serving time);
- WiSE-FT a: one model whose weights are (1 - a) x the candidate's + a x the adapted ones (Wortsman et al. 2022,
  "Robust fine-tuning of zero-shot models");
- soup of K: K adaptation runs whose seeds differ (batch order, dropout), weights averaged into one model
  (Wortsman et al. 2022, "Model soups"); ensemble of K: the mean of their probabilities (K models at serving time).

Run `dvc repro` first (it reads the candidate, its predictions and the splits):

    python -m benchmarks.adaptation_variants [--seeds 0 1 2] [--runs 4] [--alphas 0.5 0.7] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks import write_report
from benchmarks.adaptation_ceiling import halves
from stages.adapt import Candidate, accuracy, draw_target, load_candidate, train_on_shots
from stages.config import Params, load_params
from stages.evaluate import UNBLENDED, probabilities
from stages.model import classify
from stages.preprocess import HELDOUT

Weights = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # encoder, head


def weights_of(model: Candidate) -> Weights:
    """A CPU copy of the encoder's and the head's weights (the head is still on the CPU before training)."""
    return ({k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()},
            {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()})


def combine(states: list[dict[str, torch.Tensor]], coefficients: list[float]) -> dict[str, torch.Tensor]:
    """sum_i c_i x state_i for floating-point tensors; other tensors (integer ids, counters) from the last state."""
    return {key: sum(c * s[key] for c, s in zip(coefficients, states)) if states[-1][key].is_floating_point()
            else states[-1][key] for key in states[-1]}


def interpolate(start: Weights, end: Weights, alpha: float) -> Weights:
    """WiSE-FT: (1 - alpha) x start + alpha x end."""
    return combine([start[0], end[0]], [1 - alpha, alpha]), combine([start[1], end[1]], [1 - alpha, alpha])


def soup(runs: list[Weights]) -> Weights:
    """The uniform average of runs that started from the same weights."""
    share = [1 / len(runs)] * len(runs)
    return combine([r[0] for r in runs], share), combine([r[1] for r in runs], share)


def variant_proba(params: Params, scored: list[str], unadapted: np.ndarray, shots: pd.DataFrame, seed: int,
                  runs: int, alphas: list[float]) -> dict[str, np.ndarray]:
    """Each variant's class probabilities on `scored`. Run k trains with seed + 1000 k, so run 0 is adapt's; every
    run starts from the candidate's weights, loaded once."""
    batch = 2 * params.fine_tune.finetune.batch_size
    model = load_candidate(params.paths.model)
    start = weights_of(model)

    def load(weights: Weights) -> None:
        model.encoder.load_state_dict(weights[0])
        model.head.load_state_dict(weights[1])

    def scored_proba() -> np.ndarray:
        return classify(model.encoder, model.tokenizer, model.head, scored, model.max_length, batch)

    def with_weights(weights: Weights) -> np.ndarray:
        load(weights)
        return scored_proba()

    trained, proba = [], []
    for k in range(runs):
        load(start)
        train_on_shots(params, model, shots, seed + 1000 * k)
        trained.append(weights_of(model))
        proba.append(scored_proba())

    out = {"shots only": proba[0], "+ unadapted": (proba[0] + unadapted) / 2}
    out |= {f"WiSE-FT {alpha}": with_weights(interpolate(start, trained[0], alpha)) for alpha in alphas}
    if runs > 1:
        out |= {f"soup of {runs}": with_weights(soup(trained)), f"ensemble of {runs}": np.mean(proba, axis=0)}
    return out


def domain_points(params: Params, name: str, domain: pd.DataFrame, candidate: np.ndarray, seed: int, runs: int,
                  alphas: list[float]) -> list[dict]:
    target = draw_target(domain, params.adapt, seed, name)
    scored = target.scored
    half_a = scored.index.isin(halves(scored, seed)[1].index)
    y = scored["label_id"].to_numpy()
    start = time.perf_counter()
    proba = variant_proba(params, scored["text"].tolist(), candidate[scored.index], target.shots, seed, runs, alphas)
    proba = {"unadapted": candidate[scored.index], **proba}
    seconds = round(time.perf_counter() - start, 1)  # every variant of this draw together
    return [{"domain": name, "seed": seed, "variant": variant, "accuracy": accuracy(p, y),
             "half_a": accuracy(p[half_a], y[half_a]), "half_b": accuracy(p[~half_a], y[~half_a]),
             "draw_seconds": seconds} for variant, p in proba.items()]


def positive(value: str) -> int:
    if int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 run")
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=positive, default=4, help="adaptation runs in the soup and the ensemble")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7], help="WiSE-FT mixing weights")
    parser.add_argument("--domains", nargs="+", help="held-out domains to measure (default: all)")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    params = load_params()
    splits = pd.read_parquet(params.paths.splits)
    candidate = probabilities(pd.read_parquet(params.paths.predictions), UNBLENDED)
    heldout = splits[splits["split"] == HELDOUT]
    points = pd.DataFrame([point for name, domain in heldout.groupby("domain", sort=True)
                           if not args.domains or name in args.domains
                           for seed in args.seeds
                           for point in domain_points(params, str(name), domain, candidate, seed, args.runs,
                                                      args.alphas)])
    means = points.groupby(["domain", "variant"], sort=False)[["accuracy", "half_a", "half_b"]].mean().round(4)
    means["gain_over_shots_only"] = (means["accuracy"] - means["accuracy"].xs("shots only", level="variant")
                                     .reindex(means.index, level="domain")).round(4)
    print(f"adapt.labels_per_class={params.adapt.labels_per_class}, adapt.steps={params.adapt.steps}, "
          f"seeds {args.seeds}; accuracy on the rows adapt scores (and on each half), means over seeds:")
    print(means.to_string())
    if args.out:
        command = ["--seeds", *map(str, args.seeds), "--runs", str(args.runs), "--alphas", *map(str, args.alphas),
                   *(["--domains", *args.domains] if args.domains else [])]
        record = {"command": "python -m benchmarks.adaptation_variants " + " ".join(command),
                  "adapt": params.adapt.model_dump(mode="json"), "points": points.to_dict(orient="records"),
                  "means": means.reset_index().to_dict(orient="records")}
        write_report(record, args.out)


if __name__ == "__main__":
    main()
