"""Typed configuration: dataclasses loaded from YAML, overridden by dotted ``key=value`` pairs,
validated once at start with messages that say what to change.

One file drives every command: ``criteriapo sft`` runs the ``sft`` section, ``criteriapo dpo`` the
``dpo`` section, ``criteriapo pipeline`` both, then evaluation and export.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from criteriapo.errors import ConfigError

log = logging.getLogger(__name__)


def _resume_free(default: Any) -> Any:
    """A field that may change between a run and its resumption (it does not touch the weights)."""
    return field(default=default, metadata={"resume": "free"})


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2"  # embedded name, local folder, .gguf file or cached hub id
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = _resume_free("auto")  # where a run computes does not change what it trains
    trust_remote_code: bool = False
    chat_template: str | None = None  # a .jinja file replacing the tokenizer's template (base models)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # files, saved datasets, or builtin:NAME
    eval: list[str] = field(default_factory=list)
    split: str | None = None
    on_bad_row: Literal["error", "skip"] = "error"
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    # a row larger than this (bytes of a JSONL line, else characters of text) is a bad row, refused
    # before it is parsed or tokenized (4 MiB: over a million tokens, far past any max_length); null: none
    max_row_bytes: int | None = 4 * 2**20
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    # a prompt that alone reaches max_length: cut (its start goes, by truncation_mode, leaving the
    # completion its own length up to half of max_length; the row is kept and counted), drop (the
    # row is left out, counted), or error (a bad row, as data.on_bad_row says)
    long_prompts: Literal["cut", "drop", "error"] = "cut"


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # wins over warmup_ratio when > 0
    # adamw: torch's AdamW. adamw_sr: torchao's AdamW whose bf16 weights and states round
    # stochastically, so updates far below bf16's spacing still add up (for train.precision bf16-true)
    name: Literal["adamw", "adamw_sr"] = "adamw"


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None  # stops early when set
    batch_size: int = 8  # examples per optimizer step (the global batch)
    micro_batch_size: int | None = None  # examples per forward (default batch_size); ratio = accumulation
    eval_every: int | None = _resume_free(None)  # steps; evaluation also runs at the end with eval data
    log_every: int = _resume_free(1)
    checkpoint_every: int | None = _resume_free(200)  # steps; also at the end and on SIGINT/SIGTERM
    keep_checkpoints: int = _resume_free(2)  # the newest K are kept
    # once the model is exported, its last checkpoint (weights and optimizer state: about 3x the model)
    # is deleted unless kept; finished.json then records the finished stage for --resume
    keep_final_checkpoint: bool = _resume_free(False)
    # a NaN/inf loss or gradient: stop, or drop that step
    on_nonfinite: Literal["stop", "skip"] = _resume_free("stop")
    # recompute each decoder block in backward (on by default, as in TRL): activations of one block
    # at a time; off costs more memory and saves the recompute (a third more forward work)
    gradient_checkpointing: bool = _resume_free(True)
    # with gradient checkpointing: keep attention's outputs from the forward instead of attending
    # again in backward (hidden-size floats per position and layer; README: activation checkpointing)
    keep_attention: bool = _resume_free(True)
    # with gradient checkpointing: keep the outputs of the matmuls that read the hidden width too
    # (q + k + v + o widths + 2 x the MLP's floats per position and layer on Llama: 8 x hidden on the
    # embedded model), so a Llama block's recompute runs no matmul (README: activation checkpointing)
    keep_projections: bool = _resume_free(False)
    # auto: fp32 when model.dtype is float32, else bf16-mixed. fp32: float32 weights and compute.
    # bf16-mixed: float32 (master) weights, compute under bf16 autocast. bf16-true: bfloat16 weights
    # and optimizer states (least memory; needs optim.name: adamw_sr unless lr is large, see README)
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-true"] = "auto"
    packing: bool = True  # several examples per row without padding; a DPO pair computes its prompt once
    group_by_length: bool = False  # batches of similar lengths (sorted within windows of 64 batches)
    # DPO: a prompt's pairs in one batch, so that the prompt and the replies they share (a reply chosen
    # on several criteria) are computed once; the order shuffles prompts instead of pairs
    share_prompts: bool = True
    optimizer_in_backward: bool = False  # step each weight when its gradient is done: no gradient memory
    # on a CPU: give freed memory back to the system after each step and four times within backward (a
    # lower peak; the next step faults the pages in again: about 5% slower at 2048 tokens, README:
    # returning memory). None: when gradient checkpointing or the optimizer in backward is on
    return_memory: bool | None = _resume_free(None)

    def __post_init__(self) -> None:
        if self.micro_batch_size is None:
            self.micro_batch_size = self.batch_size


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # or [all-linear]
    export: Literal["merged", "adapter"] = "merged"  # full weights, or an adapter folder naming its base


@dataclass
class SFTConfig:
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5))
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class CriteriaDataConfig:
    """How ``builtin:criteria-train`` / ``builtin:criteria-heldout`` are made: sampled from the model
    DPO starts from (see :mod:`criteriapo.criteria.maker`)."""

    prompts: int = 160
    samples: int = 4  # replies sampled per prompt
    held_out: float = 0.2
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    decoys: float = 1.0  # share of prompts given a decoy: a reply with a format nobody asked for
    batch_size: int = 64  # sequences sampled together (prompts x samples); under torchrun, per process


@dataclass
class DPOConfig:
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6))
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # the reference is then the adapters switched off
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    reference_free: bool = False
    precompute_ref_log_probs: bool = True  # reference = the starting weights, scored once, never held
    ref_cache: bool = True  # precomputed reference scores kept on disk (cache folder) for later runs
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0  # kto: loss weight of desirable completions
    undesirable_weight: float = 1.0  # kto: loss weight of undesirable ones
    disable_dropout: bool = True  # dropout off in policy, reference and LoRA, so step 1's log-ratios are 0
    ref_model: str | None = None  # another model as reference (kept frozen in memory)
    # criteria recipes: the data files are multi-criteria (UltraFeedback-style) and pairs are built
    recipe: Literal["vanilla", "mini", "finegrained", "all"] | None = None
    mini_size: int | None = None
    mini_min_margin: float = 0.5
    criterion_weights: dict[str, float] = field(default_factory=dict)
    condition_on_criterion: bool = False
    criteria_data: CriteriaDataConfig = field(default_factory=CriteriaDataConfig)


@dataclass
class EvalConfig:
    prompts: list[str] = field(default_factory=list)  # generated from before and after DPO
    max_new_tokens: int = 64
    compare_base: bool = True  # the comparison by criterion includes the base model (not only SFT and DPO)


@dataclass
class TrackingConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "criteriapo"
    wandb_mode: Literal["offline", "online"] = "offline"
    plots: bool = True
    progress: bool = True


@dataclass
class Config:
    output_dir: str = "runs/criteriapo"
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> Config:
        """Every value on its own and against the others. Names that registries above this module
        define (``dpo.loss_type``) are checked by :func:`criteriapo.stages.preference.check_choices`."""
        for name, stage in (("sft", self.sft), ("dpo", self.dpo)):
            _validate_stage(name, stage.data, stage.optim, stage.train)
            _validate_lora(name, stage.lora)
        d = self.dpo
        _positive("dpo.beta", d.beta)
        _positive("dpo.desirable_weight", d.desirable_weight)
        _positive("dpo.undesirable_weight", d.undesirable_weight)
        if not 0 <= d.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
        if d.rpo_alpha is not None and d.rpo_alpha < 0:
            raise ConfigError(f"dpo.rpo_alpha must be >= 0 or null, got {d.rpo_alpha}")
        if d.ref_model and d.reference_free:
            raise ConfigError("dpo.ref_model is set but dpo.reference_free is true: drop one of them")
        if d.mini_min_margin < 0:
            raise ConfigError(f"dpo.mini_min_margin must be >= 0, got {d.mini_min_margin}")
        if d.mini_size is not None and d.mini_size < 1:
            raise ConfigError(f"dpo.mini_size must be >= 1 or null, got {d.mini_size}")
        for k, w in d.criterion_weights.items():
            if w < 0:
                raise ConfigError(f"dpo.criterion_weights.{k} must be >= 0, got {w}")
        _validate_criteria_data(d.criteria_data)
        if self.eval.max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens must be >= 1, got {self.eval.max_new_tokens}")
        return self


def _validate_criteria_data(m: CriteriaDataConfig) -> None:
    for key in ("prompts", "samples", "max_new_tokens", "batch_size"):
        if getattr(m, key) < 1:
            raise ConfigError(f"dpo.criteria_data.{key} must be >= 1, got {getattr(m, key)}")
    if not 0 < m.held_out < 1:
        raise ConfigError(f"dpo.criteria_data.held_out must be in (0, 1), got {m.held_out}")
    if round(m.prompts * m.held_out) < 1 or round(m.prompts * m.held_out) >= m.prompts:
        raise ConfigError(
            f"dpo.criteria_data: held_out {m.held_out} of {m.prompts} prompts leaves no train or no "
            "held-out prompt; raise prompts or move held_out"
        )
    if m.temperature < 0:
        raise ConfigError(f"dpo.criteria_data.temperature must be >= 0, got {m.temperature}")
    if not 0 < m.top_p <= 1:
        raise ConfigError(f"dpo.criteria_data.top_p must be in (0, 1], got {m.top_p}")
    if not 0 <= m.decoys <= 1:
        raise ConfigError(f"dpo.criteria_data.decoys is a share of prompts, in [0, 1]; got {m.decoys}")


def _validate_lora(name: str, lora: LoraConfig) -> None:
    if lora.r < 1:
        raise ConfigError(f"{name}.lora.r must be >= 1, got {lora.r}")
    _positive(f"{name}.lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"{name}.lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ConfigError(f"{name}.lora.target_modules is empty: name the layers to adapt, or [all-linear]")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


LONG_PROMPTS = ("cut", "drop", "error")


def check_lengths(
    max_length: Any, max_prompt_length: Any, truncation_mode: Any, long_prompts: Any = "cut"
) -> None:
    """The length settings of tokenization (``data.max_length`` and the rest), as tokenization and
    the config read them."""
    for key, v in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{key} must be a positive integer or null, got {v!r}")
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ConfigError(f"truncation_mode must be keep_end or keep_start, got {truncation_mode!r}")
    if long_prompts not in LONG_PROMPTS:
        raise ConfigError(f"long_prompts must be one of {', '.join(LONG_PROMPTS)}, got {long_prompts!r}")
    if max_length and max_prompt_length and max_prompt_length >= max_length:
        raise ConfigError(
            f"max_prompt_length ({max_prompt_length}) must be below max_length "
            f"({max_length}) to leave room for the completion"
        )


def _validate_stage(name: str, data: DataConfig, optim: OptimConfig, train: TrainConfig) -> None:
    try:
        check_lengths(data.max_length, data.max_prompt_length, data.truncation_mode, data.long_prompts)
    except ConfigError as e:
        raise ConfigError(f"{name}.data.{e}") from None
    _positive(f"{name}.optim.lr", optim.lr)
    if optim.weight_decay < 0:
        raise ConfigError(f"{name}.optim.weight_decay must be >= 0, got {optim.weight_decay}")
    _positive(f"{name}.optim.eps", optim.eps)
    if optim.warmup_steps < 0:
        raise ConfigError(f"{name}.optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if not 0 <= train.seed < 2**32:
        raise ConfigError(f"{name}.train.seed must be in [0, 2**32), got {train.seed}")
    if not all(0 <= b < 1 for b in optim.betas):
        raise ConfigError(f"{name}.optim.betas must be in [0, 1), got {list(optim.betas)}")
    if optim.max_grad_norm is not None:
        _positive(f"{name}.optim.max_grad_norm", optim.max_grad_norm)
    if not 0 <= optim.warmup_ratio < 1:
        raise ConfigError(f"{name}.optim.warmup_ratio must be in [0, 1), got {optim.warmup_ratio}")
    for key in ("epochs", "batch_size", "micro_batch_size", "log_every", "keep_checkpoints"):
        if getattr(train, key) < 1:
            raise ConfigError(f"{name}.train.{key} must be >= 1, got {getattr(train, key)}")
    for key in ("max_steps", "eval_every", "checkpoint_every"):
        if getattr(train, key) is not None and getattr(train, key) < 1:
            raise ConfigError(f"{name}.train.{key} must be >= 1 or null, got {getattr(train, key)}")
    if train.optimizer_in_backward:
        _in_backward(name, train, optim)
    if train.keep_projections and not train.gradient_checkpointing:
        raise ConfigError(
            f"{name}.train.keep_projections keeps outputs from checkpointing's recompute, but "
            f"{name}.train.gradient_checkpointing is false (nothing is recomputed, everything is kept): "
            "set gradient_checkpointing: true, or drop keep_projections"
        )
    if optim.name == "adamw_sr" and train.precision != "bf16-true":
        raise ConfigError(
            f"{name}.optim.name adamw_sr rounds bf16 weights; with {name}.train.precision "
            f"{train.precision} the trained weights are float32. Use adamw, or train.precision: bf16-true"
        )
    if train.batch_size % train.micro_batch_size:
        raise ConfigError(
            f"{name}.train.batch_size ({train.batch_size}) must be a multiple of "
            f"micro_batch_size ({train.micro_batch_size})"
        )


def _in_backward(name: str, train: TrainConfig, optim: OptimConfig) -> None:
    """Stepping each weight inside backward leaves nothing to accumulate into, no global norm to clip
    by before the update, and no whole step to drop."""
    wrong = []
    if train.micro_batch_size != train.batch_size:
        sizes = f"{train.micro_batch_size} vs {train.batch_size}"
        wrong.append(f"{name}.train.micro_batch_size equal to batch_size ({sizes})")
    if optim.max_grad_norm is not None:
        wrong.append(f"{name}.optim.max_grad_norm: null (it is {optim.max_grad_norm})")
    if train.on_nonfinite != "stop":
        wrong.append(f"{name}.train.on_nonfinite: stop")
    if optim.name not in ("adamw", "adamw_sr"):
        wrong.append(f"{name}.optim.name: adamw or adamw_sr (it is {optim.name})")
    if wrong:
        raise ConfigError(f"{name}.train.optimizer_in_backward needs " + "; ".join(wrong))


# -- loading ---------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # the safe loader's own check refuses what cannot be a key
            if key in seen:
                raise ConfigError(
                    f"line {key_node.start_mark.line + 1}: {key!r} is given twice in one section (first on "
                    f"line {seen[key]}); keep one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """``path`` (YAML) over the defaults, then ``overrides`` like ``dpo.beta=0.2``; validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except ConfigError as e:
            raise ConfigError(f"{path}, {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}): save it as UTF-8"
            ) from None
        if raw is None:
            log.warning("%s is empty: every setting takes its default", path)
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. dpo.beta=0.2")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed)
    return from_dict(Config, raw).validate()


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[last] = value


RENAMED = {  # keys of earlier versions, and what to write instead
    "TrainConfig": {
        "mixed_precision": "use precision: bf16-mixed (for mixed_precision: bf16) or fp32 (for no)",
    },
}


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, refusing unknown keys and values of the wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key in RENAMED.get(cls.__name__, {}):
            raise ConfigError(f"{path}: renamed; {RENAMED[cls.__name__][key]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{path}: unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {_coerce(args[0], k, path): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            value = [value]  # a single path where a list is expected
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(
                _coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-5 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")  # a programmer error


def resume_free_keys(cls: type | None = None, prefix: str = "") -> tuple[str, ...]:
    """Dotted names of the fields declared with :func:`_resume_free`, under every section."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("resume") == "free":
            out.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out.extend(resume_free_keys(hints[f.name], f"{prefix}{f.name}."))
    return tuple(out)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
