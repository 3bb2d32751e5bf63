"""The preference methods, each declared in one place: what it is called (its run folder, model
card and tracker name), the data it reads, how its examples are scored and cached (as pairs, or as
pair views), its task, whether the pipeline trains it after SFT or from the base model, what its
model card says, and the settings it refuses. ``dpo.loss_type`` picks one: ``kto`` KTO, ``orpo``
ORPO, any other loss of :data:`criteriapo.losses.dpo.LOSSES` the DPO family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criteriapo.config import Config, DPOConfig
from criteriapo.criteria.pairs import RECIPES
from criteriapo.data.tokenize import TokenizedPair, TokenizedUnpaired, assign_kl
from criteriapo.errors import ConfigError
from criteriapo.losses.dpo import LOSSES, loss_spec
from criteriapo.stages.data import tokenize_options
from criteriapo.train.tasks import DPOTask, KTOTask


@dataclass(frozen=True)
class Method:
    name: str  # the run folder (``NAME`` or ``NAME-RECIPE``), the card's and the tracker's name
    title: str  # as a person reads it: DPO, ORPO, KTO
    data_kind: str  # what its files hold: preference pairs, or unpaired labelled completions
    task: type  # DPOTask or KTOTask
    after_sft: bool  # in the pipeline: from the SFT model; else one stage from the base model
    describe: Callable[[DPOConfig, str | None], str]  # the model card's method line
    refuse: Callable[[DPOConfig], str | None]  # a setting it cannot use, as a message, or None
    # after tokenizing, the train and eval examples' finishing touch (KTO: their KL completions)
    finish_examples: Callable[[list, list, DPOConfig], None] | None = None
    # an example as the pair it is scored and cached as (KTO: its completion, then its KL completion)
    pair_view: Callable[[Any], TokenizedPair] | None = None

    def prepare(self, train: list, evals: list, d: DPOConfig) -> None:
        if self.finish_examples is not None:
            self.finish_examples(train, evals, d)

    def as_pairs(self, examples: list) -> list:
        """The examples as the pairs they are scored and cached as."""
        return examples if self.pair_view is None else [self.pair_view(e) for e in examples]

    def folder(self, recipe: str | None) -> str:
        return f"{self.name}-{recipe}" if recipe else self.name


def _dpo_refuses(d: DPOConfig) -> str | None:
    spec = loss_spec(d.loss_type)
    if spec.reference_free and d.ref_model:
        return f"dpo.ref_model: {d.loss_type} uses no reference model; leave it unset"
    if spec.chosen_nll and d.rpo_alpha:
        return (
            f"dpo.rpo_alpha: {d.loss_type} has the chosen replies' NLL in its loss already (weight "
            f"{spec.chosen_nll}); leave rpo_alpha unset"
        )
    return None


def _kto_refuses(d: DPOConfig) -> str | None:
    if d.reference_free:
        return "dpo.reference_free: KTO's rewards are log-ratios against a reference; set it false"
    if d.recipe:
        return "dpo.recipe builds pairs from multi-criteria data; KTO reads unpaired rows or pairs"
    for key, value in (("rpo_alpha", d.rpo_alpha), ("label_smoothing", d.label_smoothing or None)):
        if value is not None:
            return f"dpo.{key}: a setting of the paired losses, which KTO has no use for"
    return None


def _describe_dpo(d: DPOConfig, recipe: str | None) -> str:
    return f"DPO (loss_type {d.loss_type}, beta {d.beta}" + (f", recipe {recipe})" if recipe else ")")


def _assign_kl(train: list, evals: list, d: DPOConfig) -> None:
    """Each example's mismatched completion, fixed by the seed."""
    opts = tokenize_options(d.data)
    for i, examples in enumerate((train, evals)):
        assign_kl(examples, d.train.seed + i, opts)


def _describe_kto(d: DPOConfig, recipe: str | None) -> str:
    weights = f"desirable_weight {d.desirable_weight}, undesirable_weight {d.undesirable_weight}"
    return f"KTO (beta {d.beta}, {weights})"


METHODS: dict[str, Method] = {
    "dpo": Method("dpo", "DPO", "preference", DPOTask, True, _describe_dpo, _dpo_refuses),
    "orpo": Method(
        "orpo",
        "ORPO",
        "preference",
        DPOTask,
        False,
        lambda d, recipe: f"ORPO (beta {d.beta}, no reference)",
        _dpo_refuses,
    ),
    "kto": Method(
        "kto",
        "KTO",
        "unpaired",
        KTOTask,
        True,
        _describe_kto,
        _kto_refuses,
        _assign_kl,
        TokenizedUnpaired.as_pair,
    ),
}


def method_of(d: DPOConfig) -> Method:
    """The method ``dpo.loss_type`` names; a :class:`ConfigError` listing the choices otherwise."""
    if d.loss_type in METHODS and d.loss_type != "dpo":
        return METHODS[d.loss_type]
    if d.loss_type not in LOSSES:
        choices = ", ".join([*LOSSES, "kto"])
        raise ConfigError(f"dpo.loss_type: unknown loss {d.loss_type!r}; choose one of {choices}")
    return METHODS["dpo"]


def check_method(d: DPOConfig) -> Method:
    """The method, after refusing the settings it cannot use."""
    method = method_of(d)
    if (problem := method.refuse(d)) is not None:
        raise ConfigError(problem)
    return method


def title_of(folder: str) -> str:
    """What a preference stage's folder says it trained (``dpo-finegrained``: DPO)."""
    method = METHODS.get(folder.partition("-")[0])
    return method.title if method else "DPO"


def stage_dirs(cfg: Config, command: str) -> list[Path]:
    """The stage folders that ``criteriapo COMMAND`` (sft, dpo, orpo, kto or pipeline) writes under
    output_dir."""
    out, d = Path(cfg.output_dir), cfg.dpo
    method = method_of(d)
    if command == "sft":
        return [out / "sft"]
    if command in ("dpo", "orpo", "kto"):
        return [out / method.folder(d.recipe if d.recipe != "all" else None)]
    dpo = [out / method.folder(r) for r in (list(RECIPES) if d.recipe == "all" else [d.recipe])]
    return [out / "sft", *dpo] if method.after_sft else dpo
