"""The run summary published as a Prefect markdown artifact: metrics per domain, transfer gain, registry decision."""

from __future__ import annotations

import json
from pathlib import Path

from stages.config import load_params


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
        lines += [f"**Deploy:** {deployment.get('status')} (champion {deployment.get('champion')})"]
    return "\n".join(lines)


def failure_markdown(stage: str, error: BaseException, results: list[dict]) -> str:
    """The summary of a run that stopped at `stage`: the stage, the last lines of its error (the stage's own
    message, then DVC's), and what the run had reproduced before it."""
    ran = [r["stage"] for r in results if not r["skipped"]]
    tail = str(error).replace("~~~~", "~ ~ ~ ~").strip().splitlines()[-15:]  # the fence must not close early
    return "\n".join(["# Transfer pipeline run: failed", "", f"**Failed at `{stage}`** ({type(error).__name__}):",
                      "", "~~~~", *tail, "~~~~", "", f"Stages reproduced before it: {', '.join(ran) or 'none'}"])
