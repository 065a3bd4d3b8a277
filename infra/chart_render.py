"""Render charts/liveavatar offline: the chart tests and the local container stack share this code.

The chart is rendered with helm-python-sdk (the Helm v4 SDK as a shared library: no helm binary, no
cluster), for a scenario (a values file under the chart's ``ci/``) plus extra values on top. The objects
come back as dicts, NOTES.txt and empty documents left out.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "liveavatar"
RELEASE = "liveavatar"
NAMESPACE = "liveavatar"

#: Scenario name -> values file relative to the chart (None: values.yaml alone).
SCENARIOS: dict[str, str | None] = {
    "default": None,
    "tiny-cpu": "ci/tiny-cpu-values.yaml",
    "two-tenants": "ci/two-tenants-values.yaml",
    "external-tls": "ci/external-tls-values.yaml",
}


class HelmUnavailable(RuntimeError):
    """helm-python-sdk is not installed, or its native Helm library cannot load on this machine."""


def helm_module():
    """The helm_python module; :class:`HelmUnavailable` when it cannot run here."""
    try:
        import helm_python
    except ImportError as exc:
        raise HelmUnavailable("helm-python-sdk is not installed: `pip install helm-python-sdk` to render the chart"
                              ) from exc
    try:
        helm_python.helm_sdk_version()
    except Exception as exc:  # pragma: no cover - depends on the platform
        raise HelmUnavailable(f"helm-python-sdk cannot load its native Helm library here: {exc}") from exc
    return helm_python


def scenario_values(scenario: str) -> dict[str, Any]:
    """The user values of a scenario (empty for the default: values.yaml alone)."""
    rel = SCENARIOS[scenario]
    if rel is None:
        return {}
    return yaml.safe_load((CHART / rel).read_text()) or {}


def deep_merge(base: dict, override: dict) -> dict:
    """Helm-style merge of values: maps merge recursively, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merged_values(scenario: str) -> dict[str, Any]:
    """values.yaml with the scenario's values on top (what the templates see)."""
    return deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), scenario_values(scenario))


@functools.lru_cache(maxsize=1)
def _chart():
    return helm_module().Chart.load(str(CHART))


@functools.lru_cache(maxsize=64)
def _render_cached(values_json: str) -> tuple[tuple[str, str], ...]:
    out = _chart().render(values=json.loads(values_json), name=RELEASE, namespace=NAMESPACE)
    return tuple(sorted(out.items()))


def render_files(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, for ``values`` over the chart defaults."""
    return dict(_render_cached(json.dumps(values or {}, sort_keys=True)))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects (NOTES.txt and empty documents left out)."""
    docs = []
    for path, text in render_files(values).items():
        if not path.endswith((".yaml", ".yml")):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def render_scenario(scenario: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The objects rendered for a scenario, optionally with extra values on top."""
    return render(deep_merge(scenario_values(scenario), extra or {}))
