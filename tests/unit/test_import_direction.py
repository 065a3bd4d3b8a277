"""The import direction is services -> pipeline_stages -> models, and models/pipeline_stages stay I/O-free.

Checked statically over every module's AST (imports inside functions count too), so a violation
anywhere in a file fails the test, whether or not a test happens to execute that line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

#: package -> top-level modules it must never import
FORBIDDEN = {
    "models": {"pipeline_stages", "services", "infra", "kafka", "confluent_kafka", "redis", "fastapi", "starlette", "uvicorn"},
    "pipeline_stages": {"services", "infra", "kafka", "confluent_kafka", "redis", "fastapi", "starlette", "uvicorn"},
    "services/session_api": {"torch", "pipeline_stages"},   # models.inputs is torch-free and allowed
}


def imported_top_levels(source: str) -> set[str]:
    """Top-level module names imported anywhere in ``source`` (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def violations(package: str) -> list[str]:
    out = []
    base = ROOT / package
    for path in sorted(base.rglob("*.py")) if base.exists() else []:
        bad = imported_top_levels(path.read_text()) & FORBIDDEN[package]
        out.extend(f"{path.relative_to(ROOT)} imports {name}" for name in sorted(bad))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    assert violations(package) == []


def test_the_session_api_and_input_decoding_load_without_torch():
    """Static checks miss transitive imports: import for real in a fresh interpreter and look for torch."""
    import subprocess
    import sys

    mods = ["models.inputs"] + (["services.session_api.app"] if (ROOT / "services/session_api/app.py").exists() else [])
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + "print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", f"importing {mods} pulled in torch"


def test_the_checker_sees_nested_and_from_imports():
    src = "import os\nfrom redis.asyncio import Redis\ndef f():\n    import kafka.admin\n    from . import sibling\n"
    assert imported_top_levels(src) == {"os", "redis", "kafka"}


def test_models_and_stages_exist_to_be_checked():
    # An empty scan would pass vacuously; make sure the packages have code in them.
    assert any((ROOT / "models").rglob("*.py"))
    assert any((ROOT / "pipeline_stages").rglob("*.py"))
