"""The data a stage reads: built-in datasets by name (the criteria data sampled from the model a
stage starts from), files read, validated, made into pairs by a recipe and tokenized."""

from __future__ import annotations

import logging
from pathlib import Path

from criteriapo.config import CriteriaDataConfig, DataConfig, to_dict
from criteriapo.criteria.pairs import RecipeOptions, build_pairs
from criteriapo.data.builtin import builtin_path
from criteriapo.data.formats import DataKind
from criteriapo.data.hub import parse_hub
from criteriapo.data.loading import load_data
from criteriapo.data.tokenize import ChatTokenizer, TokenizeOptions, tokenize_examples
from criteriapo.distributed import SINGLE, World, all_gather_objects, barrier
from criteriapo.errors import ConfigError
from criteriapo.models import resolve_model

log = logging.getLogger(__name__)


CRITERIA_BUILTINS = ("criteria-train", "criteria-heldout")


def data_paths(
    entries: list[str],
    model: str | None = None,
    maker: CriteriaDataConfig | None = None,
    *,
    world: World = SINGLE,
    device: str = "cpu",
) -> list[Path | str]:
    """Paths as given; ``builtin:NAME`` names a dataset the project makes itself: ``sft``,
    ``preference-train``, ``preference-eval``, or ``criteria-train`` / ``criteria-heldout``: replies
    sampled from ``model`` (the model DPO starts from, so the data is on-policy) with the settings
    ``maker`` (``dpo.criteria_data``), made once per model and settings into the cache, on
    ``device`` and shared by the processes of ``world``."""
    out = []
    for e in entries:
        name = e.removeprefix("builtin:")
        if name == e:
            out.append(e if parse_hub(e) is not None else Path(e))  # a Hub dataset stays a name
        elif name in CRITERIA_BUILTINS:
            if model is None:
                raise ConfigError(f"{e} is sampled from the model DPO starts from; name it in dpo.data only")
            out.append(
                builtin_criteria(model, maker or CriteriaDataConfig(), world, device)
                / f"{name.removeprefix('criteria-')}.jsonl"
            )
        else:
            try:
                out.append(builtin_path(name))
            except ValueError as err:
                raise ConfigError(f"{err}, {', '.join(CRITERIA_BUILTINS)}") from None
    return out


def builtin_criteria(
    model: str, maker: CriteriaDataConfig, world: World = SINGLE, device: str = "cpu"
) -> Path:
    from criteriapo.criteria.maker import MakerOptions, make_criteria_dataset, maker_digest
    from criteriapo.fsutil import cache_dir, file_lock
    from criteriapo.models.refcache import folder_digest

    source = resolve_model(model)
    opts = MakerOptions(**to_dict(maker))
    # a changed maker or another model (by the digest of its files), a new folder
    folder = cache_dir() / "data" / f"criteria-{maker_digest(opts)}-{folder_digest(source.path)[:12]}"
    if world.distributed:
        # every process samples its share of the replies and rank 0 writes the folder (no file lock:
        # a process waiting for it could not take part in the sampling)
        if not all(all_gather_objects((folder / "heldout.jsonl").exists(), world)):
            _say_making(opts.samples, source.spec, world)
            make_criteria_dataset(folder, str(source.path), opts, world, device)
        barrier(world)
        return folder
    with file_lock(folder.with_suffix(".lock")):
        if not (folder / "heldout.jsonl").exists():
            _say_making(opts.samples, source.spec, world)
            make_criteria_dataset(folder, str(source.path), opts, device=device)
    return folder


def _say_making(samples: int, spec: str, world: World) -> None:
    if world.main:
        log.warning(
            "making the criteria data: %d replies per prompt from %s%s (minutes, unless sampled before)",
            samples,
            spec,
            f", shared by {world.size} processes" if world.distributed else "",
        )


def tokenize_options(data: DataConfig) -> TokenizeOptions:
    return TokenizeOptions(data.max_length, data.max_prompt_length, data.truncation_mode, data.long_prompts)


def tokenized(
    data: DataConfig,
    files: list[str],
    kind: DataKind,
    tok: ChatTokenizer,
    run_dir: Path | None,
    recipe: str | None = None,
    recipe_opts: RecipeOptions | None = None,
    model: str | None = None,
    maker: CriteriaDataConfig | None = None,
    counts: dict[str, int] | None = None,
    *,
    world: World = SINGLE,
    device: str = "cpu",
) -> list:
    """Load, validate and tokenize; with a recipe, the files are multi-criteria data made into pairs.
    ``model`` and ``maker`` make the built-in criteria data (see :func:`data_paths`; sampled on
    ``device``, shared by the processes of ``world``). Rows whose
    prompt was cut or dropped to fit max_length are counted in ``counts`` and said in a warning."""
    if not files:
        return []
    report = run_dir / "bad_rows.jsonl" if run_dir is not None else None
    loaded = load_data(
        data_paths(files, model, maker, world=world, device=device),
        kind=DataKind.MULTI_CRITERIA if recipe else kind,
        split=data.split,
        on_bad_row=data.on_bad_row,
        report_path=report,
        max_row_bytes=data.max_row_bytes,
    )
    examples = (
        build_pairs(recipe, loaded.examples, recipe_opts or RecipeOptions()) if recipe else loaded.examples
    )
    if not examples:
        raise ConfigError(f"the {recipe} recipe built no pairs from {', '.join(files)}")
    opts = tokenize_options(data)
    seen: dict[str, int] = {}
    out = tokenize_examples(
        examples, tok, opts, kind=kind, on_bad_row=data.on_bad_row, report_path=report, counts=seen
    )
    if seen["prompt_cut"] or seen["prompt_dropped"]:
        done = "cut from the start" if data.truncation_mode == "keep_end" else "cut at the end"
        n = seen["prompt_cut"] or seen["prompt_dropped"]
        log.warning(
            "%s: %d of %d rows have a prompt that alone reaches max_length %s; %s "
            "(data.long_prompts: %s; cut, drop or error)",
            ", ".join(files),
            n,
            len(examples),
            data.max_length,
            f"their prompt was {done}" if seen["prompt_cut"] else "they were left out",
            data.long_prompts,
        )
    if counts is not None:
        for k, v in seen.items():
            counts[k] = counts.get(k, 0) + v
    return out
