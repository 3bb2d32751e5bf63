"""Export: a standard Hugging Face model folder with a model card whose quick start works as written."""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError

import criteriapo
from criteriapo.errors import CriteriaPOError
from criteriapo.fsutil import publish_dir, staging_dir, write_error
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

    def render(self, model_dir: Path) -> str:
        import torch
        import transformers

        header = yaml.safe_dump(
            {
                "base_model": self.base_model,
                "library_name": "transformers",
                "pipeline_tag": "text-generation",
                "tags": ["criteriapo", *self.method.lower().split()[:1]],
            },
            sort_keys=False,
        )
        hp = yaml.safe_dump(self.hyperparameters, sort_keys=False).rstrip()
        metrics = "\n".join(
            f"| {k} | {v:.4g} |" for k, v in self.metrics.items() if isinstance(v, int | float)
        )
        notes = "".join(f"- {n}\n" for n in self.notes)
        return f"""---
{header}---

# {self.name}

A fine-tuned version of `{self.base_model}`, trained with **{self.method}** by
CriteriaPO {criteriapo.__version__}.

## Quick start

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{model_dir}")
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

| metric | value |
|---|---|
{metrics}

## Framework versions

- CriteriaPO {criteriapo.__version__}
- Transformers {transformers.__version__}
- PyTorch {torch.__version__}
- Python {platform.python_version()}
"""


def export_model(model: Any, tokenizer: Any, out_dir: Path, card: ModelCard) -> Path:
    """Write config, model.safetensors, tokenizer files, chat template, generation config and
    README.md into ``out_dir``, atomically (a temporary folder renamed into place)."""
    out_dir = Path(out_dir)
    tmp = None
    try:
        tmp = staging_dir(out_dir)
        model.save_pretrained(tmp, safe_serialization=True)
        if not (tmp / "generation_config.json").exists() and getattr(model, "generation_config", None):
            model.generation_config.save_pretrained(tmp)  # an adapter folder keeps its base's settings
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card.render(out_dir.resolve()), encoding="utf-8")
        publish_dir(tmp, out_dir)
        record_digests(out_dir)  # the reference cache's key of this folder, while its bytes are warm
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = " (the previous model folder there is untouched)" if out_dir.exists() else ""
        raise ExportError(f"could not write the model folder {out_dir}: {write_error(e)}{kept}") from e
    return out_dir
