"""The chart lints, renders and validates strictly for every scenario under charts/liveavatar/ci/.

Built-in kinds go through kubernetes-validate --strict for the newest Kubernetes version it ships (and
for the chart's floor, 1.29); LeaderWorkerSet, ServiceMonitor and KafkaTopic objects through the CRD
schemas in crds/. The last tests are positive controls: they show the validators do reject bad objects.
"""

from __future__ import annotations

import copy

import jsonschema
import pytest

from tests.unit.chart import chartlib as cl

pytestmark = pytest.mark.unit

SCENARIOS = list(cl.SCENARIOS)
CR_KINDS = {"LeaderWorkerSet", "ServiceMonitor", "KafkaTopic"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_lints_without_warnings(scenario):
    helm = cl.helm()
    report = helm.lint(
        str(cl.CHART), values=cl.scenario_values(scenario), strict=True, kube_version=cl.LINT_KUBE_VERSION
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert report["total_charts_linted"] == 1
    assert problems == [], problems
    assert report["errors"] == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_validates_strictly(scenario):
    cl.helm()
    docs = cl.render_scenario(scenario)
    assert len(docs) > 10
    versions = [cl.newest_kube_version(), "1.29.0"]
    for version in versions:
        for obj in docs:
            try:
                cl.validate_object(obj, version)
            except Exception as exc:  # name the object in the failure
                pytest.fail(f"{scenario}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_objects_are_namespaced_to_the_release_and_labelled(scenario):
    cl.helm()
    docs = cl.render_scenario(scenario)
    names = set()
    for obj in docs:
        meta = obj["metadata"]
        key = (obj["kind"], meta["name"])
        assert key not in names, f"duplicate object {key}"
        names.add(key)
        assert meta["namespace"] == cl.NAMESPACE, key
        labels = meta["labels"]
        assert labels["app.kubernetes.io/instance"] == cl.RELEASE, key
        assert labels["app.kubernetes.io/managed-by"] == "Helm", key
        assert labels["app.kubernetes.io/name"] == "liveavatar", key
        assert labels["app.kubernetes.io/component"], key
        assert len(meta["name"]) <= 63, key


def test_scenarios_cover_every_custom_resource_kind():
    """The CRD-schema checks above are not vacuous: some scenario renders each custom kind."""
    cl.helm()
    kinds = {obj["kind"] for s in SCENARIOS for obj in cl.render_scenario(s)}
    assert CR_KINDS <= kinds
    assert {"Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job", "Role", "RoleBinding"} <= kinds


def test_vendored_crds_are_valid_custom_resource_definitions():
    kv = cl.kv()
    docs = cl.crd_documents()
    assert {d["spec"]["names"]["kind"] for _, d in docs} == CR_KINDS
    for path, crd in docs:
        kv.validate(crd, cl.newest_kube_version(), strict=True)
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}", path


# ------------------------------------------------------------------------------------- positive controls


def _first(docs, kind):
    return copy.deepcopy(next(d for d in docs if d["kind"] == kind))


@pytest.mark.parametrize(
    "kind, mutate",
    [
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always")),
        ("Deployment", lambda d: d["spec"]["template"]["spec"].update(enableServiceLinks="no")),
        ("Service", lambda d: d["spec"]["ports"][0].update(port="http")),
        ("LeaderWorkerSet", lambda d: d["spec"]["leaderWorkerTemplate"].update(sizee=5)),
        ("LeaderWorkerSet", lambda d: d["spec"]["leaderWorkerTemplate"].update(size=0)),
        ("LeaderWorkerSet", lambda d: d["spec"]["leaderWorkerTemplate"].update(restartPolicy="Always")),
        ("LeaderWorkerSet", lambda d: d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"].update(gpus=1)),
        ("LeaderWorkerSet", lambda d: d["metadata"].update(labelz={})),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="30 seconds")),
        ("KafkaTopic", lambda d: d["spec"].update(partitions=0)),
        ("KafkaTopic", lambda d: d["spec"].update(partition=16)),
    ],
)
def test_validators_reject_bad_objects(kind, mutate):
    cl.helm()
    docs = cl.render_scenario("two-tenants")
    good = _first(docs, kind)
    cl.validate_object(good, cl.newest_kube_version())  # the unmodified object passes
    bad = copy.deepcopy(good)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError):
        cl.validate_object(bad, cl.newest_kube_version())
