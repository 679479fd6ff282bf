"""The run summary published as a Prefect markdown artifact: metrics per domain, transfer gain, registry decision."""

from __future__ import annotations

import json
from pathlib import Path

from stages.config import Paths, load_params


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def metrics_table(metrics: dict) -> list[str]:
    rows = {"test (in-domain)": metrics.get("test", {}), **metrics.get("domains", {})}
    header = ("| split / domain | candidate acc | unblended acc | baseline acc | transfer gain | macro-F1 | "
              "negative transfer |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        if m:
            lines.append(f"| {name} | {m['candidate_accuracy']:.4f} | {m.get('unblended_accuracy', float('nan')):.4f} | "
                         f"{m['baseline_accuracy']:.4f} | "
                         f"{m['transfer_gain']:+.4f} | {m['candidate_macro_f1']:.4f} | {m['negative_transfer']} |")
    return lines


def curve_table(curve: dict) -> list[str]:
    lines = [f"**Data efficiency** ({curve.get('strategy')}; test accuracy, mean over draws):", "",
             "| labels per class | transfer | no-transfer baseline | gain | draws |", "|---|---|---|---|---|"]
    for budget, m in curve.get("budgets", {}).items():
        name = f"all ({m['labels_per_class']})" if budget == "all" and "labels_per_class" in m else budget
        lines.append(f"| {name} | {m['transfer_accuracy']:.4f} | {m['baseline_accuracy']:.4f} | {m['gain']:+.4f} | "
                     f"{m['draws']} |")
    return lines


def adaptation_table(domains: dict) -> list[str]:
    lines = ["**Domain adaptation** (held-out rows never used to adapt; mean over draws):", "",
             "| domain | unadapted | adapted | gain | baseline | negative transfer |", "|---|---|---|---|---|---|"]
    for domain, m in domains.items():
        lines.append(f"| {domain} | {m['unadapted_accuracy']:.4f} | {m['adapted_accuracy']:.4f} | {m['gain']:+.4f} | "
                     f"{m['baseline_accuracy']:.4f} | {m['negative_transfer']} |")
    return lines


def studies_tables(root: Path, paths: Paths, stages: set[str]) -> list[str]:
    """The study figures, when this run's DAG had the study stages (ran or up to date)."""
    lines: list[str] = []
    if "studies/dvc.yaml:data_efficiency" in stages and (curve := _read(root / paths.data_efficiency_metrics)):
        lines += curve_table(curve) + [""]
    if "studies/dvc.yaml:adapt" in stages and (domains := _read(root / paths.adaptation_metrics)):
        lines += adaptation_table(domains) + [""]
    return lines


def summary_markdown(root: Path, results: list[dict]) -> str:
    params = load_params(root / "params.yaml")
    metrics = _read(root / params.paths.metrics)
    registry = _read(root / params.paths.registry)
    deployment = _read(root / params.paths.deployment)
    ran = [r["stage"] for r in results if not r["skipped"]]
    lines = ["# Transfer pipeline run", "", f"Stages reproduced: {', '.join(ran) or 'none (all up to date)'}", ""]
    lines += metrics_table(metrics) + [""]
    if registry:
        lines += [(f"**Registry:** `{registry['model_name']}` version {registry['version']} "
                   f"**{registry['decision']}**; champion is now version {registry.get('champion')}."), ""]
        lines += [f"- {reason}" for reason in registry.get("reasons", [])] + [""]
    if deployment:
        lines += [f"**Deploy:** {deployment.get('status')} (champion {deployment.get('champion')})", ""]
    lines += studies_tables(root, params.paths, {r["stage"] for r in results})
    return "\n".join(lines).rstrip() + "\n"


def failure_markdown(stage: str, error: BaseException, results: list[dict]) -> str:
    """The summary of a run that stopped at `stage`: the stage, the last lines of its error (the stage's own
    message, then DVC's), and what the run had reproduced before it."""
    ran = [r["stage"] for r in results if not r["skipped"]]
    tail = str(error).replace("~~~~", "~ ~ ~ ~").strip().splitlines()[-15:]  # the fence must not close early
    return "\n".join(["# Transfer pipeline run: failed", "", f"**Failed at `{stage}`** ({type(error).__name__}):",
                      "", "~~~~", *tail, "~~~~", "", f"Stages reproduced before it: {', '.join(ran) or 'none'}"])
