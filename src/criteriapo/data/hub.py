"""Datasets named as the Hugging Face Hub names them, read through ``datasets.load_dataset``
without any download: from a local clone of a dataset repository (a folder of parquet, JSON or CSV
files, with its README's ``configs``), or from the local Hugging Face cache (a snapshot that
``hf download --repo-type dataset OWNER/NAME`` or an earlier online load left there).

A data entry names one as ``hub:OWNER/NAME``, or ``OWNER/NAME`` where no such local path exists,
with options after ``?``: ``split`` (default: data.split, else ``train``, else the only split),
``subset`` (the dataset's config name), ``revision``; e.g.
``hub:HuggingFaceH4/ultrafeedback_binarized?split=train_prefs``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from criteriapo.errors import DataError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
OPTIONS = ("split", "subset", "revision")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow")


@dataclass(frozen=True)
class HubSpec:
    repo: str
    split: str | None = None
    subset: str | None = None
    revision: str | None = None
    named: bool = True  # hub: written out; else a name that is no local path


def parse_hub(entry: str) -> HubSpec | None:
    """The dataset an entry names on the Hub, or None when it names a local file or folder."""
    explicit = entry.startswith("hub:")
    name, _, query = entry.removeprefix("hub:").partition("?")
    if not explicit and (
        Path(entry).exists() or not HUB_ID.match(name) or query or name.lower().endswith(DATA_SUFFIXES)
    ):
        return None
    if not HUB_ID.match(name):
        raise DataError(
            f"{entry}: a Hub dataset is named OWNER/NAME, e.g. hub:HuggingFaceH4/ultrafeedback_binarized"
        )
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DataError(f"{entry}: unknown option {', '.join(unknown)}; the options are {', '.join(OPTIONS)}")
    get = options.get
    return HubSpec(name, get("split") or None, get("subset") or None, get("revision") or None, explicit)


def is_dataset_repo(folder: Path) -> bool:
    """A local clone of a dataset repository: a folder with a README or data files, not a folder
    written by ``save_to_disk``."""
    if (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists():
        return False
    return (folder / "README.md").is_file() or any(p.suffix in DATA_SUFFIXES for p in folder.rglob("*"))


def snapshot(spec: HubSpec) -> Path | None:
    """The dataset's snapshot folder in the local Hugging Face cache, if it is there."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(spec.repo, repo_type="dataset", revision=spec.revision, local_files_only=True)
        )
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError is an OSError)
        return None


def read_hub(spec: HubSpec, split: str | None) -> tuple[str, Iterator[dict[str, Any]]]:
    """The rows of the dataset's split (``spec.split``, else ``split``), and its label for messages."""
    folder = snapshot(spec)
    if folder is None:
        loaded = _from_datasets_cache(spec)
        where = f"{spec.repo} (the datasets cache)"
    else:
        loaded = load_folder(folder, spec.subset, f"{spec.repo} ({folder})")
        where = spec.repo
    return _split_of(loaded, spec.split or split, where)


def read_repo_folder(folder: Path, split: str | None) -> tuple[str, Iterator[dict[str, Any]]]:
    return _split_of(load_folder(folder, None, str(folder)), split, str(folder))


def load_folder(folder: Path, subset: str | None, where: str) -> Any:
    import datasets

    try:
        with _quiet():
            return datasets.load_dataset(str(folder), name=subset)
    except ValueError as e:  # an unknown config name, or files it cannot read
        raise DataError(f"{where}: cannot load it with datasets: {e}") from None
    except (OSError, datasets.exceptions.DatasetGenerationError) as e:
        raise DataError(f"{where}: cannot read its files: {e}") from None


def _from_datasets_cache(spec: HubSpec) -> Any:
    """An earlier online ``load_dataset`` left Arrow files in the datasets cache: read those, offline."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True  # never reach for the network
    try:
        with _quiet():
            return datasets.load_dataset(spec.repo, name=spec.subset, revision=spec.revision)
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError):
        local = "" if spec.named else "no such file or folder here, and "
        raise DataError(
            f"{spec.repo}: {local}not in the local Hugging Face cache as a Hub dataset, and CriteriaPO "
            f"never downloads. Where you have network: `hf download --repo-type dataset {spec.repo}` "
            "(then it is in the cache), or clone the dataset repository and name its folder"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _split_of(loaded: Any, split: str | None, where: str) -> tuple[str, Iterator[dict[str, Any]]]:
    names = list(loaded.keys())
    if split is None:
        split = "train" if "train" in loaded else (names[0] if len(names) == 1 else None)
    if split is None:
        raise DataError(
            f"{where}: which split? It has {', '.join(names)} and none is named train; choose one "
            "(?split=NAME after the dataset's name, or data.split)"
        )
    if split not in loaded:
        raise DataError(
            f"{where}: split {split!r} not found; it has {', '.join(names)}; choose one "
            "(?split=NAME after the dataset's name, or data.split)"
        )
    return f"{where}[{split}]", iter(loaded[split])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars from datasets while it reads (ours report the work)."""
    import datasets

    was = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()
