"""The stage graph, read from dvc.yaml through DVC's own API: the only declaration of the DAG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
from dvc.repo import Repo
from dvc.stage import PipelineStage


@dataclass(frozen=True)
class StageSpec:
    """One dvc.yaml stage, with the Prefect options declared under its `meta.prefect`."""

    name: str
    upstream: tuple[str, ...]
    tags: tuple[str, ...] = ()
    retries: int = 0
    retry_delay_seconds: float | tuple[float, ...] = 10.0  # a list: one delay per retry (backoff)
    timeout_seconds: float | None = None
    extra: dict = field(default_factory=dict)


def _delays(value: float | list[float]) -> float | tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, list) else float(value)


def _spec(stage, upstream: list[str]) -> StageSpec:
    options = dict((stage.meta or {}).get("prefect", {}))
    return StageSpec(
        name=stage.addressing,
        upstream=tuple(sorted(upstream)),
        tags=tuple(options.pop("tags", ())),
        retries=int(options.pop("retries", 0)),
        retry_delay_seconds=_delays(options.pop("retry_delay_seconds", 10.0)),
        timeout_seconds=options.pop("timeout_seconds", None),
        extra=options,
    )


def read_dag(root: Path, studies: bool = False) -> list[StageSpec]:
    """Stages of `root`/dvc.yaml (and, with `studies`, of every other dvc.yaml, e.g. studies/dvc.yaml) in an
    order where every stage follows the stages it depends on."""
    with Repo(str(root)) as repo:
        main_file = Path(repo.root_dir, "dvc.yaml").resolve()
        # Edges point from a stage to the stages it depends on. `.dvc` files (data tracked with `dvc add`)
        # are nodes too; they run nothing, so only dvc.yaml's stages become tasks.
        full = repo.index.graph
        graph = full.subgraph([s for s in full if isinstance(s, PipelineStage)
                               and (studies or Path(s.dvcfile.path).resolve() == main_file)])
        order = list(reversed(list(nx.lexicographical_topological_sort(graph, key=lambda s: s.addressing))))
        return [_spec(stage, [dep.addressing for dep in graph.successors(stage)]) for stage in order]
