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
    run_cached: bool = True  # DVC keeps its runs in the run cache: no output is both uncached and a plain out
    extra: dict = field(default_factory=dict)


def _delays(value: float | list[float]) -> float | tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, list) else float(value)


def address(stage: PipelineStage, root: Path) -> str:
    """How `dvc repro` run in `root` names the stage: `name` in root's dvc.yaml, else `path/dvc.yaml:name`."""
    dvcfile = Path(stage.dvcfile.path).resolve()
    if dvcfile == (root / "dvc.yaml").resolve():
        return stage.name
    return f"{dvcfile.relative_to(root.resolve()).as_posix()}:{stage.name}"


def _spec(stage: PipelineStage, name: str, upstream: list[str]) -> StageSpec:
    options = dict((stage.meta or {}).get("prefect", {}))
    return StageSpec(
        name=name,
        upstream=tuple(sorted(upstream)),
        tags=tuple(options.pop("tags", ())),
        retries=int(options.pop("retries", 0)),
        retry_delay_seconds=_delays(options.pop("retry_delay_seconds", 10.0)),
        timeout_seconds=options.pop("timeout_seconds", None),
        run_cached=all(out.use_cache or out.is_metric or out.is_plot for out in stage.outs),
        extra=options,
    )


def _dependencies_first(graph: nx.DiGraph, names: dict[PipelineStage, str]) -> list[PipelineStage]:
    # Edges point from a stage to the stages it depends on.
    return list(reversed(list(nx.lexicographical_topological_sort(graph, key=names.__getitem__))))


def read_dag(root: Path, studies: bool = False) -> list[StageSpec]:
    """Stages of `root`/dvc.yaml in an order where every stage follows the stages it depends on; with `studies`,
    then those of every other dvc.yaml (e.g. studies/dvc.yaml), so that a long or failing study never holds up
    register and deploy."""
    with Repo(str(root)) as repo:
        top = Path(repo.root_dir)
        # `.dvc` files (data tracked with `dvc add`) are nodes too; they run nothing, so only dvc.yaml's stages
        # become tasks.
        full = repo.index.graph
        names = {s: address(s, top) for s in full if isinstance(s, PipelineStage)}
        main = [s for s, name in names.items() if ":" not in name]
        graph = full.subgraph(list(names) if studies else main)
        order = _dependencies_first(full.subgraph(main), names)
        order += [s for s in _dependencies_first(graph, names) if s not in order]
        return [_spec(stage, names[stage], [names[dep] for dep in graph.successors(stage)]) for stage in order]
