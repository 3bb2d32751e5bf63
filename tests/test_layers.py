"""The layering contract in pyproject.toml ([tool.importlinter]): kept by the package as it is, and
broken by a deliberate upward import (data importing the pipeline), so the check can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _lint(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_layers(tmp_path):
    out = _lint(ROOT / "src", tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "src" / "criteriapo", src / "criteriapo", ignore=shutil.ignore_patterns("__pycache__")
    )
    records = src / "criteriapo" / "data" / "records.py"
    records.write_text(records.read_text() + "\nimport criteriapo.pipeline  # noqa: E402,F401\n")
    out = _lint(src, tmp_path)
    assert out.returncode != 0
    assert "criteriapo.data.records -> criteriapo.pipeline" in out.stdout


def test_no_function_in_the_package_is_over_60_lines():
    import ast

    long = []
    for path in sorted((ROOT / "src" / "criteriapo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}: {node.name} ({lines} lines)")
    assert not long, "split these: " + "; ".join(long)
