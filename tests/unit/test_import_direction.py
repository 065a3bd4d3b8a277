"""Imports point one way, and the light services stay light.

- ``services -> pipeline_stages -> models``; models and pipeline_stages stay I/O-free (no Kafka,
  Redis or web framework).
- The model core (``models/*.py``) never imports ``models.training`` or ``models.quality``: those
  build on the core, not the other way round.
- ``infra/`` (local stack, topic definitions) imports no service.
- The session API and the stream packager never import torch, not even through another module.

Checked statically over every module's AST (imports inside functions count too, relative imports are
resolved), so a violation anywhere in a file fails the test whether or not a test executes that line.
The torch rule is also checked for real in a fresh interpreter, which sees transitive imports. Each
rule has a negative control showing that the checker catches a violation of it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

IO = frozenset({"kafka", "confluent_kafka", "redis", "fastapi", "starlette", "uvicorn"})


@dataclass(frozen=True)
class Rule:
    """Files matching ``files`` (a glob under the root) never import a module in ``forbidden`` (or a submodule)."""

    files: str
    forbidden: frozenset[str]


RULES = {
    "models": Rule("models/**/*.py", IO | {"pipeline_stages", "services", "infra"}),
    "models core": Rule("models/*.py", frozenset({"models.training", "models.quality"})),
    "pipeline_stages": Rule("pipeline_stages/**/*.py", IO | {"services", "infra"}),
    "infra": Rule("infra/**/*.py", frozenset({"services"})),
    # models.inputs is torch-free and allowed in the session API
    "session_api": Rule("services/session_api/**/*.py", frozenset({"torch", "pipeline_stages"})),
    "stream_packager": Rule("services/stream_packager/**/*.py", frozenset({"torch"})),
}

def module_name(path: Path, root: Path = ROOT) -> str:
    """``models/quality/report.py`` -> ``models.quality.report``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str = "", is_package: bool = False) -> set[str]:
    """Dotted names imported anywhere in ``source``, as written by the module ``module``.

    ``from a.b import c`` counts as ``a.b`` and ``a.b.c`` (``c`` may be a submodule); relative imports
    are resolved against ``module`` (unresolvable ones are skipped).
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package) or not module:
                    continue
                base = package[:len(package) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target:
                continue
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def forbidden_in(names: set[str], forbidden: frozenset[str]) -> set[str]:
    """The forbidden modules that ``names`` import (a forbidden name covers its submodules)."""
    return {f for f in forbidden for n in names if n == f or n.startswith(f + ".")}


def violations(rule: Rule, root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted(root.glob(rule.files)):
        names = imported_modules(path.read_text(), module_name(path, root), path.name == "__init__.py")
        out.extend(f"{path.relative_to(root)} imports {name}" for name in sorted(forbidden_in(names, rule.forbidden)))
    return out


@pytest.mark.parametrize("rule", sorted(RULES))
def test_no_forbidden_imports(rule):
    assert violations(RULES[rule]) == []


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_has_files_to_check(rule):
    # An empty scan would pass vacuously.
    assert any(ROOT.glob(RULES[rule].files)), f"rule {rule!r} matches no file"


# ---- negative controls: the checker sees each kind of violation ----------------------------------


def test_the_checker_sees_nested_and_from_imports():
    src = "import os\nfrom redis.asyncio import Redis\ndef f():\n    import kafka.admin\n    from . import sibling\n"
    names = imported_modules(src, "models.dit")
    assert forbidden_in(names, RULES["models"].forbidden) == {"redis", "kafka"}
    assert "models.sibling" in names and "os" in names


@pytest.mark.parametrize("src", [
    "from models.training.synthetic import face_params\n",
    "def f():\n    import models.quality.report\n",
    "from models import quality\n",
    "from .training import synthetic\n",
    "from . import training\n",
])
def test_the_checker_sees_the_core_importing_training_or_quality(tmp_path, src):
    (tmp_path / "models" / "training").mkdir(parents=True)
    (tmp_path / "models" / "dit.py").write_text(src)
    # the same import is fine outside the core (quality may use training's renderer)
    (tmp_path / "models" / "training" / "data.py").write_text(src.replace("from .", "from .."))
    found = violations(RULES["models core"], tmp_path)
    assert len(found) == 1 and found[0].startswith("models/dit.py imports models.")


def test_the_checker_sees_infra_importing_a_service(tmp_path):
    (tmp_path / "infra" / "local").mkdir(parents=True)
    (tmp_path / "infra" / "local" / "stack.py").write_text("def f():\n    from services.common.kafka import ensure_topics\n")
    (tmp_path / "infra" / "topics.py").write_text("import os\n")
    assert violations(RULES["infra"], tmp_path) == ["infra/local/stack.py imports services"]


@pytest.mark.parametrize("rule, path", [("session_api", "services/session_api/routes/sessions.py"),
                                        ("stream_packager", "services/stream_packager/worker.py")])
def test_the_checker_sees_torch_in_a_light_service(tmp_path, rule, path):
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text("def f():\n    from torch.nn import functional\n")
    assert violations(RULES[rule], tmp_path) == [f"{path} imports torch"]


# ---- the torch rule, for real ------------------------------------------------------------------


def torch_free_modules(package: str) -> list[str]:
    """Every module of ``package`` but ``__main__``, its entry module (``app`` / ``worker``) first."""
    mods = [module_name(p) for p in sorted((ROOT / package).rglob("*.py")) if p.name != "__main__.py"]
    return sorted(mods, key=lambda m: not m.endswith((".app", ".worker")))


def loads_torch(mods: list[str]) -> bool:
    """Import ``mods`` in a fresh interpreter; whether torch got imported."""
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + "print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip() == "True"


def test_input_decoding_loads_without_torch():
    assert not loads_torch(["models.inputs"])


@pytest.mark.parametrize("package, entry", [("services/session_api", "services.session_api.app"),
                                            ("services/stream_packager", "services.stream_packager.worker")])
def test_the_light_services_load_without_torch(package, entry):
    """Static checks miss transitive imports: import every module of the service in a fresh interpreter
    (one per service, as each runs in its own process) and look for torch."""
    mods = torch_free_modules(package)
    assert mods[0] == entry
    assert not loads_torch(mods), f"importing {mods} pulled in torch"


def test_the_fresh_interpreter_check_sees_torch():
    assert loads_torch(["models.inputs", "models.dit"])
