"""The pipeline: SFT, then the preference stage against the SFT model (one run per recipe with
``dpo.recipe: all``; ORPO instead trains from the base model in one stage), generations before and
after, a comparison by criterion on held-out data, and ``summary.json``. Composition only: the
stages are in :mod:`criteriapo.stages`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from criteriapo.config import Config
from criteriapo.criteria.pairs import RECIPES
from criteriapo.data.formats import DataKind
from criteriapo.data.loading import load_data
from criteriapo.distributed import SINGLE, World, barrier, device_for, init_world, joined_shares, my_share
from criteriapo.generation import Sampling, chat_messages, generate_batch
from criteriapo.models import load_model, load_tokenizer, resolve_model
from criteriapo.stages.common import StageResult
from criteriapo.stages.data import data_paths
from criteriapo.stages.methods import method_of
from criteriapo.stages.preference import check_choices, preflight_dpo, run_dpo
from criteriapo.stages.sft import run_sft

__all__ = [
    "PipelineResult",
    "check_choices",
    "data_paths",
    "run_dpo",
    "run_pipeline",
    "run_sft",
    "sample_replies",
]

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    sft: StageResult | None  # None when the preference stage trains from the base model (ORPO)
    dpo: dict[str, StageResult]  # one per recipe ("dpo" or "orpo" when the data are plain pairs)
    generations: list[dict[str, str]]
    seconds: dict[str, float]
    summary_path: Path
    comparison: Path | None = None


def sample_replies(cfg: Config, model_dir: Path, prompts: list[str], world: World = SINGLE) -> list[str]:
    """Greedy replies to ``prompts``, in one batch (with several processes, each answers its share)."""
    model = load_model(model_dir, dtype=cfg.model.dtype, device=device_for(world, cfg.model.device))
    tok, max_new_tokens = load_tokenizer(model_dir), cfg.eval.max_new_tokens
    conversations = [chat_messages(p) for p in my_share(prompts, world)]
    replies = generate_batch(model, tok, conversations, Sampling(max_new_tokens))
    return joined_shares([r.text for r in replies], world)


def _compare(
    cfg: Config, out: Path, start_name: str, start: Path, dpo: dict[str, StageResult], world: World
) -> Path:
    """Held-out criteria comparison of the starting model and each tuned one (and the base model
    with eval.compare_base), reward accuracy against the starting model; every process does its
    share."""
    from criteriapo.eval.criteria import compare

    files = data_paths(
        cfg.dpo.data.eval, str(start), cfg.dpo.criteria_data, world=world, device=cfg.model.device
    )
    held = load_data(files, kind=DataKind.MULTI_CRITERIA, on_bad_row="skip").examples
    base = [("base", cfg.model.name_or_path)] if cfg.eval.compare_base and start_name != "base" else []
    models = [*base, (start_name, str(start)), *((name, str(stage.model_dir)) for name, stage in dpo.items())]
    compare(
        models,
        held,
        out / "comparison",
        max_new_tokens=cfg.eval.max_new_tokens,
        reference=str(start),
        beta=cfg.dpo.beta,
        device=device_for(world, cfg.model.device),
        world=world,
    )
    return out / "comparison" / "comparison.md"


def _write_summary(
    out: Path,
    sft: StageResult | None,
    start: Path,
    dpo: dict[str, StageResult],
    seconds: dict[str, float],
    generations: list[dict[str, str]],
) -> Path:
    stages = {**({"sft": sft} if sft else {}), **dpo}
    summary = {
        "sft_model": str(sft.model_dir) if sft else None,
        "start_model": str(start),
        "seconds": seconds,
        "stage_seconds": {name: stage.seconds for name, stage in stages.items()},
        "generations": generations,
        "dpo": {
            name: {
                "model": str(stage.model_dir),
                "metrics": stage.metrics,
                "before": stage.before.as_dict() if stage.before else None,
                "after": stage.after.as_dict() if stage.after else None,
            }
            for name, stage in dpo.items()
        },
    }
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def run_pipeline(cfg: Config, resume: bool = False) -> PipelineResult:
    """SFT, then DPO against the SFT model (one run per recipe with ``dpo.recipe: all``, sharing one
    reference pass), generations before and after, and with criteria data a comparison by criterion."""
    check_choices(cfg)
    out = Path(cfg.output_dir)
    world = init_world()
    t0 = time.perf_counter()
    if world.main:  # fetch and check first; rank 0 alone downloads nothing and makes the built-in data
        resolve_model(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    t_fetch = time.perf_counter()
    if world.main:
        data_paths(cfg.sft.data.train)
    barrier(world)
    preflight_dpo(cfg)
    t_data = time.perf_counter()
    # DPO and KTO start from the SFT model; ORPO from the base model, in one stage
    method = method_of(cfg.dpo)
    sft = run_sft(cfg, run_dir=out / "sft", resume=resume) if method.after_sft else None
    trust = cfg.model.trust_remote_code
    start = sft.model_dir if sft else resolve_model(cfg.model.name_or_path, trust_remote_code=trust).path
    spec = str(sft.model_dir) if sft else cfg.model.name_or_path  # what the stage's card and checkpoint name
    recipes = list(RECIPES) if cfg.dpo.recipe == "all" else [cfg.dpo.recipe]
    # the SFT model's log-prob of each sequence is scored once for every recipe (the on-disk cache,
    # or with dpo.ref_cache false one dict shared here)
    ref_cache: dict | None = None if cfg.dpo.ref_cache else {}
    dpo = {
        r or method.name: run_dpo(cfg, spec, out / method.folder(r), r, ref_cache, resume) for r in recipes
    }
    t_train = time.perf_counter()
    # generation and evaluation: every process answers its share of the prompts (none waits idle)
    replies = {"before": sample_replies(cfg, start, cfg.eval.prompts, world)}
    for name, stage in dpo.items():
        replies[name] = sample_replies(cfg, stage.model_dir, cfg.eval.prompts, world)
    generations = [
        {"prompt": p, **{k: v[i] for k, v in replies.items()}} for i, p in enumerate(cfg.eval.prompts)
    ]
    start_name = "sft" if sft else "base"
    comparison = (
        _compare(cfg, out, start_name, start, dpo, world) if cfg.dpo.recipe and cfg.dpo.data.eval else None
    )
    t_end = time.perf_counter()
    stages = {**({"sft": sft} if sft else {}), **dpo}
    seconds = {
        "fetch": t_fetch - t0,
        "data": t_data - t_fetch,
        **{name: sum(stage.seconds.values()) for name, stage in stages.items()},
        "generate+eval": t_end - t_train,
        "total": t_end - t0,
    }
    path = _write_summary(out, sft, start, dpo, seconds, generations) if world.main else out / "summary.json"
    barrier(world)
    return PipelineResult(sft, dpo, generations, seconds, path, comparison)
