"""The layers hold: dags -> the Airflow edge (tasks.py) -> independent stages -> the shared core.

import-linter checks the contracts in pyproject.toml (the same run as `make lint`); the second
test shows that a stage importing another stage really breaks them.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "plugins" / "sketchfab_similarity"
MAX_LINES = 350


def lint_imports(plugins_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(plugins_dir)}
    return subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.integration
def test_import_contracts_hold():
    result = lint_imports(ROOT / "plugins")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.integration
def test_a_stage_importing_another_stage_breaks_the_contracts(tmp_path):
    copy = tmp_path / "plugins"
    shutil.copytree(PACKAGE, copy / "sketchfab_similarity", ignore=shutil.ignore_patterns("__pycache__"))
    download = copy / "sketchfab_similarity" / "thumbnails" / "download.py"
    download.write_text(download.read_text() + "\nfrom ..crawl import records  # noqa: E402,F401\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "sketchfab_similarity.thumbnails.download" in result.stdout


def test_the_dag_files_import_only_the_edge_and_the_core():
    for dag_file in (ROOT / "dags").glob("*.py"):
        for node in ast.walk(ast.parse(dag_file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sketchfab_similarity"):
                names = [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    assert name.startswith(("sketchfab_similarity.tasks", "sketchfab_similarity.core.")), (
                        f"{dag_file.name} imports {name}: DAG files wire tasks; the work lives behind tasks.py"
                    )


def test_modules_are_small_or_say_why():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "Why this module is long:" in doc, f"{path.relative_to(ROOT)} has {lines} lines"


def test_the_sql_schema_agrees_with_the_core_constants():
    from sketchfab_similarity.core.featurespec import EMBEDDING_DIM
    from sketchfab_similarity.core.uids import UID_PATTERN

    sql = "\n".join(p.read_text() for p in sorted((ROOT / "sql").glob("*.sql")))
    assert f"vector({EMBEDDING_DIM})" in sql
    assert f"CHECK (uid ~ '{UID_PATTERN}')" in sql
