"""Plots as data (CSV for `dvc plots`) and as PNG (for people and MLflow), from an evaluation report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

CONFUSION_CSV = "confusion.csv"
PER_DOMAIN_CSV = "per_domain.csv"
CALIBRATION_CSV = "calibration.csv"


def confusion_rows(matrix: list[list[int]], labels: list[str]) -> pd.DataFrame:
    """One row per test example, the shape DVC's confusion template reads."""
    rows = [(labels[i], labels[j]) for i, line in enumerate(matrix) for j, n in enumerate(line) for _ in range(n)]
    return pd.DataFrame(rows, columns=["actual", "predicted"])


def per_domain_rows(report: dict) -> pd.DataFrame:
    groups = {"test": report["test"], **report["domains"]}
    return pd.DataFrame([{"series": f"{group} / {model}", "group": group, "model": model,
                          "accuracy": round(entry[model]["accuracy"], 4)}
                         for group, entry in groups.items() for model in ("candidate", "baseline")])


def save_figure(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="actual", title="candidate, test split")
    for i, line in enumerate(matrix):
        for j, n in enumerate(line):
            ax.text(j, i, str(n), ha="center", va="center")
    save_figure(fig, path)


def plot_per_domain(rows: pd.DataFrame, path: Path) -> None:
    table = rows.pivot(index="group", columns="model", values="accuracy")
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(table) + 1.5))
    table[["baseline", "candidate"]].plot.barh(ax=ax, xlim=(0, 1), title="accuracy: transfer vs no-transfer baseline")
    ax.set_xlabel("accuracy")
    save_figure(fig, path)


def plot_calibration(bins: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o")
    ax.set(xlabel="confidence", ylabel="accuracy", title="reliability, test split", xlim=(0, 1), ylim=(0, 1))
    save_figure(fig, path)


def write_plots(report: dict, labels: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    test = report["test"]["candidate"]
    confusion_rows(test["confusion_matrix"], labels).to_csv(folder / CONFUSION_CSV, index=False)
    rows = per_domain_rows(report)
    rows.to_csv(folder / PER_DOMAIN_CSV, index=False)
    pd.DataFrame(test["reliability"]).to_csv(folder / CALIBRATION_CSV, index=False)
    plot_confusion(test["confusion_matrix"], labels, folder / "confusion.png")
    plot_per_domain(rows, folder / "per_domain.png")
    plot_calibration(test["reliability"], folder / "calibration.png")
