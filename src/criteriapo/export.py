"""Export: a standard Hugging Face model folder with a model card whose quick start works as written."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError

import criteriapo
from criteriapo.errors import CriteriaPOError
from criteriapo.fsutil import atomic_dir, plain_modes, write_error
from criteriapo.models.refcache import record_digests


class ExportError(CriteriaPOError):
    """The model folder could not be written."""


@dataclass
class ModelCard:
    name: str
    base_model: str
    method: str
    datasets: list[str]
    hyperparameters: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    example_prompt: str = "What is the capital of France?"
    notes: list[str] = field(default_factory=list)

    def front_matter(self) -> str:
        hub = hub_id(self.base_model)
        return yaml.safe_dump(
            {
                **({"base_model": hub} if hub else {}),  # the Hub's field names a Hub model only
                "library_name": "transformers",
                "pipeline_tag": "text-generation",
                "tags": ["criteriapo", *self.method.lower().split()[:1]],
            },
            sort_keys=False,
        )

    def render(self, model_dir: Path) -> str:
        import torch
        import transformers

        header = self.front_matter()
        hp = yaml.safe_dump(self.hyperparameters, sort_keys=False).rstrip()
        metrics = "\n".join(
            f"| {k} | {v:.4g} | {METRIC_MEANINGS.get(k.removeprefix('eval/'), '')} |"
            for k, v in self.metrics.items()
            if isinstance(v, int | float)
        )
        shown = _shown_path(model_dir)
        notes = "".join(f"- {n}\n" for n in self.notes)
        return f"""---
{header}---

# {self.name}

A fine-tuned version of `{self.base_model}`, trained with **{self.method}** by
CriteriaPO {criteriapo.__version__}.

## Quick start

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{shown}")  # or its Hub id once pushed
messages = [{{"role": "user", "content": "{self.example_prompt}"}}]
output = generator(messages, max_new_tokens=64, do_sample=False)
print(output[0]["generated_text"][-1]["content"])
```

## Training

- Method: {self.method}
- Base model: `{self.base_model}`
- Data: {", ".join(f"`{d}`" for d in self.datasets) or "-"}
{notes}
### Hyperparameters

```yaml
{hp}
```

### Final metrics

`eval/...`: on the held-out data; the others: the last training step.

| metric | value | meaning |
|---|---|---|
{metrics}

## Framework versions

- CriteriaPO {criteriapo.__version__}
- Transformers {transformers.__version__}
- PyTorch {torch.__version__}
- Python {platform.python_version()}
"""


METRIC_MEANINGS = {
    "loss": "the training objective",
    "rewards/accuracies": "share of pairs whose chosen reply gains more log-probability over the reference "
    "than the rejected one (TRL's name; what DPO optimises)",
    "rewards/margins": "mean of beta x (chosen - rejected) log-ratio against the reference",
    "rewards/chosen": "mean of beta x log-ratio of the chosen replies against the reference",
    "rewards/rejected": "mean of beta x log-ratio of the rejected replies against the reference",
    "preference_accuracy": "share of pairs whose chosen reply has the higher summed log-probability "
    "(no reference: favours the shorter reply)",
    "logp_margin": "mean summed log-probability of chosen minus rejected (no reference)",
    "logps/chosen": "mean summed log-probability of the chosen replies",
    "logps/rejected": "mean summed log-probability of the rejected replies",
    "logps/token": "mean log-probability per completion token",
    "tokens_per_second": "training speed, sequence tokens per second",
}


def hub_id(base_model: str) -> str | None:
    """The Hub id of the model a run started from, for the card's ``base_model`` field: a Hub id as
    given, an embedded model's id, or what a local folder's own card names; None for a local folder
    with no such record."""
    from criteriapo.models import find_embedded

    if (m := find_embedded(base_model)) is not None:
        return m.hf_id
    path = Path(base_model).expanduser()
    if not path.exists():
        return base_model if base_model.count("/") == 1 else None
    card = path / "README.md" if path.is_dir() else None
    if card is not None and card.is_file():
        text = card.read_text(encoding="utf-8")
        if text.startswith("---\n") and "\n---" in text[4:]:
            try:
                front = yaml.safe_load(text[4 : text.index("\n---", 4)])
            except yaml.YAMLError:
                return None
            if isinstance(front, dict) and isinstance(front.get("base_model"), str):
                return front["base_model"]
    return None


def _shown_path(model_dir: Path) -> str:
    """The model folder as the user would type it: relative to the working folder when inside it."""
    full = Path(model_dir).resolve()
    try:
        return str(full.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(full)


def export_model(model: Any, tokenizer: Any, out_dir: Path, card: ModelCard) -> Path:
    """Write config, model.safetensors, tokenizer files, chat template, generation config and
    README.md into ``out_dir``, atomically (a temporary folder renamed into place)."""
    out_dir = Path(out_dir)
    try:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if not (tmp / "generation_config.json").exists() and getattr(model, "generation_config", None):
                model.generation_config.save_pretrained(tmp)  # an adapter folder keeps its base's settings
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(card.render(out_dir.resolve()), encoding="utf-8")
            plain_modes(tmp)  # model.safetensors comes out 0600 from its temporary file
        record_digests(out_dir)  # the reference cache's key of this folder, while its bytes are warm
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own
        kept = " (the previous model folder there is untouched)" if out_dir.exists() else ""
        raise ExportError(f"could not write the model folder {out_dir}: {write_error(e)}{kept}") from e
    return out_dir
