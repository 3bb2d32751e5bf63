"""Datasets named as on the Hub, read through ``datasets`` with nothing downloaded: a local clone of
a dataset repository (parquet files and its README's configs) and a snapshot in the local Hugging
Face cache, built here; and training by that name."""

from __future__ import annotations

import pytest

from criteriapo.data.hub import parse_hub
from criteriapo.data.loading import read_data
from criteriapo.errors import DataError
from tests.helpers import train_dpo_briefly

README = """---
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: data/train_prefs-*.parquet
  - split: test_prefs
    path: data/test_prefs-*.parquet
---
# A tiny preference dataset in UltraFeedback-binarized shape
"""


def rows(n: int, tag: str) -> list[dict]:
    out = []
    for i in range(n):
        q = {"role": "user", "content": f"{tag} question {i}?"}
        out.append(
            {
                "prompt": q["content"],
                "chosen": [q, {"role": "assistant", "content": f"A careful answer {i}."}],
                "rejected": [q, {"role": "assistant", "content": f"No idea {i}."}],
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
        )
    return out


def write_repo(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(README)
    pq.write_table(
        pa.Table.from_pylist(rows(6, "train")), folder / "data" / "train_prefs-00000-of-00001.parquet"
    )
    pq.write_table(
        pa.Table.from_pylist(rows(2, "test")), folder / "data" / "test_prefs-00000-of-00001.parquet"
    )
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """``owner/prefs`` in a local Hugging Face cache laid out as huggingface_hub keeps it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "datasets--owner--prefs"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_repo(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_local_dataset_repository_reads_by_folder_and_split(tmp_path):
    folder = write_repo(tmp_path / "prefs")
    data = read_data(str(folder), split="train_prefs")
    assert data.kind == "preference" and len(data.examples) == 6
    assert data.examples[0].prompt == [{"role": "user", "content": "train question 0?"}]
    assert len(read_data(str(folder), split="test_prefs").examples) == 2
    with pytest.raises(
        DataError, match="which split. It has train_prefs, test_prefs and none is named train"
    ):
        read_data(str(folder))


def test_a_hub_dataset_in_the_local_cache_reads_by_name(hub_cache):
    data = read_data("hub:owner/prefs?split=train_prefs")
    assert len(data.examples) == 6 and data.examples[0].source.file == "owner/prefs[train_prefs]"
    assert len(read_data("owner/prefs", split="test_prefs").examples) == 2  # the short name, data.split


def test_a_hub_dataset_not_cached_says_how_to_get_it(hub_cache):
    with pytest.raises(DataError, match=r"never downloads.*hf download --repo-type dataset owner/missing"):
        read_data("hub:owner/missing")
    with pytest.raises(DataError, match="no such file or folder here"):
        read_data("owner/missing")


@pytest.mark.parametrize(
    ("entry", "words"),
    [("hub:owner/prefs?splt=train", "unknown option splt"), ("hub:just-a-name", "named OWNER/NAME")],
)
def test_bad_hub_names_are_refused(entry, words):
    with pytest.raises(DataError, match=words):
        parse_hub(entry)


def test_local_paths_stay_local(tmp_path):
    assert parse_hub("data/train.jsonl") is None and parse_hub(str(tmp_path)) is None


@pytest.mark.parametrize("by", ["cache", "folder"])
def test_dpo_trains_on_a_dataset_named_as_on_the_hub(by, hub_cache, tmp_path, tiny_llama_dir, capsys):
    entry = "hub:owner/prefs?split=train_prefs" if by == "cache" else str(write_repo(tmp_path / "clone"))
    out = tmp_path / "run"
    assert train_dpo_briefly(tiny_llama_dir, entry, out, "dpo.data.split=train_prefs") == 0, (
        capsys.readouterr().err
    )
    assert (out / "dpo" / "model" / "model.safetensors").exists()
