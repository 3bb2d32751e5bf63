"""The training methods, each declared in one place: what it is called (its run folder, model card
and tracker name), the config section it reads, the data it reads, its reference, how its examples
are scored and cached (as pairs, or as pair views), its task, whether the pipeline trains it after SFT
or from the base model, what its model card says, and the settings it refuses. ``sft`` is the
supervised stage; ``dpo.loss_type`` picks the preference method: ``kto`` KTO, ``orpo`` ORPO, any
other loss of :data:`criteriapo.losses.dpo.LOSSES` the DPO family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from criteriapo.config import Config, DPOConfig, SFTConfig
from criteriapo.criteria.pairs import RECIPES
from criteriapo.data.formats import DataKind
from criteriapo.data.tokenize import TokenizedPair, TokenizedUnpaired, assign_kl
from criteriapo.errors import ConfigError
from criteriapo.losses.dpo import LOSSES, loss_spec
from criteriapo.stages.data import tokenize_options
from criteriapo.train.tasks import DPOTask, KTOTask, SFTTask


class Reference(Enum):
    """What a method's log-ratios are taken against (:func:`criteriapo.stages.preference.references`
    provides it)."""

    NONE = "none"  # SFT, ORPO, and the reference-free DPO losses (SimPO, dpo.reference_free)
    PRECOMPUTED = "precomputed"  # the starting weights (LoRA: adapters off) score each sequence once
    # a model loaded beside the policy and frozen: dpo.ref_model, or a copy of the starting weights;
    # it scores each batch, or (dpo.ref_model with precompute_ref_log_probs) each sequence once
    FROZEN_MODEL = "frozen model"
    ADAPTERS_OFF = "adapters off"  # the LoRA policy itself, its adapters switched off, scores each batch


def _dropout_setting(d: DPOConfig) -> bool:
    return d.disable_dropout


@dataclass(frozen=True)
class Method:
    """A training method as the stages see it: they read its entry, never branch on its name."""

    name: str  # the run folder (``NAME`` or ``NAME-RECIPE``), the card's and the tracker's name
    title: str  # as a person reads it: SFT, DPO, ORPO, KTO
    data_kind: DataKind  # what its files hold: SFT rows, preference pairs, or unpaired completions
    task: type  # SFTTask, DPOTask or KTOTask
    reference: Callable[[Any], Reference]  # from its section's settings
    after_sft: bool  # in the pipeline: from the SFT model; else one stage from the base model
    describe: Callable[[Any, str | None], str]  # the model card's method line (settings, recipe)
    refuse: Callable[[Any], str | None]  # a setting it cannot use, as a message, or None
    section: str = "dpo"  # the config section of its settings, and the key of its messages and checkpoints
    # whether dropout is switched off (dpo.disable_dropout: so that step 1's log-ratios are 0)
    dropout_off: Callable[[Any], bool] = _dropout_setting
    # the dpo section's criteria data: builtin:criteria-* sampled from the model it starts from
    # (dpo.criteria_data), pairs built by dpo.recipe (recorded in its checkpoints, KTO's refused)
    criteria: bool = True
    # after tokenizing, the train and eval examples' finishing touch (KTO: their KL completions)
    finish_examples: Callable[[list, list, DPOConfig], None] | None = None
    # an example as the pair it is scored and cached as (KTO: its completion, then its KL completion)
    pair_view: Callable[[Any], TokenizedPair] | None = None

    def config(self, cfg: Config) -> SFTConfig | DPOConfig:
        """Its settings: ``cfg.sft`` or ``cfg.dpo``."""
        return getattr(cfg, self.section)

    def prepare(self, train: list, evals: list, d: SFTConfig | DPOConfig) -> None:
        if self.finish_examples is not None:
            self.finish_examples(train, evals, d)

    def as_pairs(self, examples: list) -> list:
        """The examples as the pairs they are scored and cached as (SFT's: as they are)."""
        return examples if self.pair_view is None else [self.pair_view(e) for e in examples]

    def folder(self, recipe: str | None) -> str:
        return f"{self.name}-{recipe}" if recipe else self.name


def _no_reference(settings: Any) -> Reference:
    return Reference.NONE


def _model_reference(d: DPOConfig) -> Reference:
    """The reference of a method against a reference model (DPO, KTO): the starting weights, scored
    once before training; with precompute_ref_log_probs false they score each batch, as a frozen copy
    or, under LoRA, as the policy with its adapters off. dpo.ref_model is always loaded frozen."""
    if not d.precompute_ref_log_probs and not d.ref_model:
        return Reference.ADAPTERS_OFF if d.lora.enabled else Reference.FROZEN_MODEL
    return Reference.FROZEN_MODEL if d.ref_model else Reference.PRECOMPUTED


def _dpo_reference(d: DPOConfig) -> Reference:
    reference_free = d.reference_free or loss_spec(d.loss_type).reference_free  # SimPO, for one
    return Reference.NONE if reference_free else _model_reference(d)


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


_DPO = Method(
    name="dpo",
    title="DPO",
    data_kind=DataKind.PREFERENCE,
    task=DPOTask,
    reference=_dpo_reference,
    after_sft=True,
    describe=_describe_dpo,
    refuse=_dpo_refuses,
)

METHODS: dict[str, Method] = {
    "sft": Method(
        name="sft",
        title="SFT",
        data_kind=DataKind.SFT,
        task=SFTTask,
        reference=_no_reference,
        after_sft=False,
        describe=lambda s, recipe: "SFT",
        refuse=lambda s: None,
        section="sft",
        dropout_off=lambda s: False,
        criteria=False,
    ),
    "dpo": _DPO,
    # DPO's pairs, task and refusals, with no reference: one stage from the base model
    "orpo": replace(
        _DPO,
        name="orpo",
        title="ORPO",
        reference=_no_reference,
        after_sft=False,
        describe=lambda d, recipe: f"ORPO (beta {d.beta}, no reference)",
    ),
    "kto": Method(
        name="kto",
        title="KTO",
        data_kind=DataKind.UNPAIRED,
        task=KTOTask,
        reference=_model_reference,
        after_sft=True,
        describe=_describe_kto,
        refuse=_kto_refuses,
        finish_examples=_assign_kl,
        pair_view=TokenizedUnpaired.as_pair,
    ),
}


def method_of(d: DPOConfig) -> Method:
    """The preference method ``dpo.loss_type`` names (``orpo``, ``kto``, else a loss of the DPO
    family); a :class:`ConfigError` listing the choices otherwise."""
    named = METHODS.get(d.loss_type)
    if named is not None and named.section == "dpo" and named.name != "dpo":
        return named
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
    method, sft = method_of(d), out / METHODS["sft"].folder(None)
    if command == "sft":
        return [sft]
    if command in ("dpo", "orpo", "kto"):
        return [out / method.folder(d.recipe if d.recipe != "all" else None)]
    dpo = [out / method.folder(r) for r in (list(RECIPES) if d.recipe == "all" else [d.recipe])]
    return [sft, *dpo] if method.after_sft else dpo
