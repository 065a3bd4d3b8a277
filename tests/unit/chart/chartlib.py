"""Offline rendering and validation of charts/liveavatar for the chart tests.

The chart is rendered with helm-python-sdk (the Helm v4 SDK as a shared library: no helm binary, no
cluster). Built-in kinds are checked with kubernetes-validate in strict mode; the custom resources
(LeaderWorkerSet, ServiceMonitor, KafkaTopic) against the CRD schemas kept in ``crds/`` next to this
file, made strict the same way (unknown fields rejected).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra import chart_render
from infra.chart_render import CHART, NAMESPACE, RELEASE, REPO, SCENARIOS, deep_merge, merged_values, scenario_values

__all__ = ["CHART", "NAMESPACE", "RELEASE", "REPO", "SCENARIOS", "deep_merge", "merged_values", "scenario_values"]

CRD_DIR = Path(__file__).resolve().parent / "crds"
GPU_SCENARIOS = ("default", "two-tenants", "external-tls")

#: The Kubernetes version rendered objects are validated against (the chart's floor is 1.29).
LINT_KUBE_VERSION = "v1.34.0"


def helm():
    """The helm_python module, or a skip when the SDK (or its native library) cannot run here."""
    try:
        return chart_render.helm_module()
    except chart_render.HelmUnavailable as exc:
        pytest.skip(str(exc))


def kv():
    """The kubernetes_validate module, or a skip when it is not installed."""
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed: `pip install kubernetes-validate`"
    )


def newest_kube_version() -> str:
    """The newest Kubernetes version whose schemas kubernetes-validate ships."""
    return kv().utils.latest_version()


def render_files(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, for ``values`` over the chart defaults (infra/chart_render.py)."""
    helm()
    return chart_render.render_files(values)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects (NOTES.txt and empty documents left out)."""
    helm()
    return chart_render.render(values)


def render_scenario(scenario: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The objects rendered for a scenario, optionally with extra values on top."""
    return render(deep_merge(scenario_values(scenario), extra or {}))


# ---------------------------------------------------------------------------------------------- objects


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """Every pod template in the objects: (description, template metadata, pod spec)."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            tpl = d["spec"]["template"]
            out.append((name, tpl.get("metadata", {}), tpl["spec"]))
        elif d["kind"] == "LeaderWorkerSet":
            lwt = d["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                if role in lwt:
                    out.append((f"{name}/{role}", lwt[role].get("metadata", {}), lwt[role]["spec"]))
    return out


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def env_of(container: dict) -> dict[str, dict]:
    """Env var name -> its EnvVar entry."""
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------------------------ CRD schemas


def _strict(node: Any) -> Any:
    """An OpenAPI v3 (structural) schema as a JSON schema that rejects unknown fields.

    Objects that list ``properties`` and do not preserve unknown fields get ``additionalProperties:
    false`` (what the API server's strict field validation does); Kubernetes extensions are dropped.
    """
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "format"}
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.lru_cache(maxsize=1)
def crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a jsonschema validator for every CRD under crds/."""
    import jsonschema

    validators = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            jsonschema.Draft202012Validator.check_schema(schema)
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft202012Validator(schema)
    return validators


def crd_documents() -> list[tuple[Path, dict]]:
    return [(p, yaml.safe_load(p.read_text())) for p in sorted(CRD_DIR.glob("*.yaml"))]


def validate_object(obj: dict, kube_version: str) -> None:
    """Validate one rendered object strictly; raises on the first problem.

    Custom resources: their CRD schema, plus their metadata as strict ObjectMeta, plus (LeaderWorkerSet)
    each pod template as a strict core PodTemplate. Built-in kinds: kubernetes-validate --strict.
    """
    k = kv()
    key = (obj["apiVersion"], obj["kind"])
    validators = crd_validators()
    if key in validators:
        validators[key].validate(obj)
        # metadata is declared as a bare object in CRDs: check it as a strict ObjectMeta.
        k.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, kube_version, strict=True)
        if obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                if role in lwt:
                    k.validate(
                        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "lws-" + role.lower()},
                         "template": lwt[role]},
                        kube_version,
                        strict=True,
                    )
        return
    k.validate(obj, kube_version, strict=True)
