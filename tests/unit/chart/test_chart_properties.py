"""Properties of the rendered chart: GPUs per lane pod, group sizes, pools, secrets, pod hardening, wiring.

Expected values are computed from the scenario values (values.yaml + the scenario file), never copied
from a render.
"""

from __future__ import annotations

import base64

import pytest
import yaml

from tests.unit.chart import chartlib as cl

pytestmark = pytest.mark.unit

ALL = list(cl.SCENARIOS)
SERVICES = ("session-api", "audio-encoder", "stream-packager", "webhooks", "lane-controller")
CONTRACT_CONFIG = {
    "LIVEAVATAR_KAFKA_BOOTSTRAP", "LIVEAVATAR_KAFKA_SECURITY_PROTOCOL", "LIVEAVATAR_JSON_LOGS", "LIVEAVATAR_LOG_LEVEL",
}


@pytest.fixture(autouse=True)
def _needs_helm():
    cl.helm()


def _lws(docs):
    return cl.of_kind(docs, "LeaderWorkerSet")


def _gpu_count(resources: dict, section: str, name: str) -> int:
    return int(resources.get(section, {}).get(name, 0))


# ----------------------------------------------------------------------------------------------- lanes


@pytest.mark.parametrize("scenario", cl.GPU_SCENARIOS)
def test_every_lane_pod_requests_and_limits_exactly_one_gpu(scenario):
    values = cl.merged_values(scenario)
    assert values["gpu"]["enabled"]
    gpu = values["gpu"]["resourceName"]
    docs = cl.render_scenario(scenario)
    lane_pods = [p for p in cl.pod_specs(docs) if p[0].startswith("LeaderWorkerSet/")]
    assert len(lane_pods) == 2 * len(values["lanePools"])  # leader + worker template per pool
    for name, _, spec in lane_pods:
        requests = sum(_gpu_count(c.get("resources", {}), "requests", gpu) for c in cl.containers(spec))
        limits = sum(_gpu_count(c.get("resources", {}), "limits", gpu) for c in cl.containers(spec))
        assert (requests, limits) == (1, 1), name
        assert spec["nodeSelector"][values["gpu"]["productLabel"]], name
        assert any(t.get("key") == gpu for t in spec.get("tolerations", [])), name
        lane = spec["containers"][0]
        assert cl.env_of(lane)["LIVEAVATAR_DEVICE"]["value"] == "cuda"


def test_tiny_cpu_profile_requests_no_gpu_and_runs_on_cpu():
    values = cl.merged_values("tiny-cpu")
    docs = cl.render_scenario("tiny-cpu")
    text = yaml.safe_dump_all(docs)
    assert values["gpu"]["resourceName"] not in text
    assert values["gpu"]["productLabel"] not in text
    lws = _lws(docs)
    assert len(lws) == 1 and lws[0]["spec"]["replicas"] == 1
    for name, _, spec in cl.pod_specs(lws):
        assert cl.env_of(spec["containers"][0])["LIVEAVATAR_DEVICE"]["value"] == "cpu", name
    model_users = [c for _, _, spec in cl.pod_specs(docs) for c in spec["containers"]
                   if c["name"] in ("lane", "audio-encoder")]
    assert len(model_users) == 3   # lane leader, lane worker, audio-encoder
    for c in model_users:
        assert cl.env_of(c)["LIVEAVATAR_MODEL_CONFIG"]["value"] == "tiny-trained", c["name"]


@pytest.mark.parametrize("scenario", ALL)
def test_lws_group_size_is_the_lane_shapes_rank_count(scenario):
    from services.lane.worker import LaneSettings

    shape = str(cl.merged_values(scenario)["lanes"]["shape"])
    for lws in _lws(cl.render_scenario(scenario)):
        lwt = lws["spec"]["leaderWorkerTemplate"]
        assert lwt["size"] == {"4+1": 5, "4": 4, "2+1": 3, "2": 2, "1+1": 2, "1": 1}[shape]
        assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
        for role in ("leaderTemplate", "workerTemplate"):
            env = cl.env_of(lwt[role]["spec"]["containers"][0])
            assert env["LIVEAVATAR_LANE_SHAPE"]["value"] == shape
            # the lane service accepts the group size LWS will inject for that shape
            LaneSettings(lane_shape=shape, dist_world_size=lwt["size"], dist_rank=lwt["size"] - 1)


@pytest.mark.parametrize("shape,size", [("4+1", 5), ("4", 4), ("2+1", 3), ("2", 2), ("1+1", 2), ("1", 1)])
def test_lws_group_size_follows_the_shape_value_with_one_gpu_per_pod(shape, size):
    value = int(shape) if shape.isdigit() else shape          # `shape: 2` unquoted in YAML is an integer
    (lws,) = _lws(cl.render_scenario("tiny-cpu", {"lanes": {"shape": value}, "gpu": {"enabled": True}}))
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == size
    for role in ("leaderTemplate", "workerTemplate"):
        (container,) = lwt[role]["spec"]["containers"]
        assert cl.env_of(container)["LIVEAVATAR_LANE_SHAPE"]["value"] == shape
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_two_tenants_render_two_lane_pools_of_three_lanes():
    values = cl.merged_values("two-tenants")
    pools = {p["name"]: p for p in values["lanePools"]}
    assert len(pools) == 2 and all(p["min"] == 3 for p in pools.values())
    lws = _lws(cl.render_scenario("two-tenants"))
    assert len(lws) == 2
    seen = {}
    for obj in lws:
        pool = pools[obj["metadata"]["labels"]["liveavatar.io/lane-pool"]]
        seen[pool["name"]] = obj
        assert obj["spec"]["replicas"] == pool["min"] == 3
        assert obj["metadata"]["labels"]["liveavatar.io/tenant"] == pool["tenant"]
        ann = obj["metadata"]["annotations"]
        assert (int(ann["liveavatar.io/lane-pool-min"]), int(ann["liveavatar.io/lane-pool-max"])) == (
            pool["min"], pool["max"])
        for role in ("leaderTemplate", "workerTemplate"):
            spec = obj["spec"]["leaderWorkerTemplate"][role]["spec"]
            product = pool.get("gpuProduct") or values["gpu"]["product"]
            assert spec["nodeSelector"][values["gpu"]["productLabel"]] == product
            assert cl.env_of(spec["containers"][0])["LIVEAVATAR_LANE_POOL"]["value"] == pool["name"]
            if pool.get("priorityClassName"):
                assert spec["priorityClassName"] == pool["priorityClassName"]
    assert set(seen) == set(pools)
    assert seen["acme"]["metadata"]["name"] != seen["globex"]["metadata"]["name"]


def test_lane_rendezvous_comes_from_leaderworkerset_env():
    values = cl.merged_values("default")
    (lws,) = _lws(cl.render_scenario("default"))
    for role in ("leaderTemplate", "workerTemplate"):
        lane = lws["spec"]["leaderWorkerTemplate"][role]["spec"]["containers"][0]
        env = cl.env_of(lane)
        assert env["LIVEAVATAR_DIST_MASTER_ADDR"]["value"] == "$(LWS_LEADER_ADDRESS)"
        assert env["LIVEAVATAR_DIST_MASTER_PORT"]["value"] == str(values["lanes"]["distPort"])
        assert env["LIVEAVATAR_DIST_RANK"]["value"] == "$(LWS_WORKER_INDEX)"
        assert env["LIVEAVATAR_DIST_WORLD_SIZE"]["value"] == "$(LWS_GROUP_SIZE)"
        ports = {p["name"]: p["containerPort"] for p in lane["ports"]}
        assert ports == {"http": 8080, "dist": values["lanes"]["distPort"]}
        mounts = {m["mountPath"]: m for m in lane["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True and "/dev/shm" in mounts


# --------------------------------------------------------------------------------------------- secrets


def _secret_data(docs) -> dict[str, str]:
    out = {}
    for s in cl.of_kind(docs, "Secret"):
        for k, v in (s.get("data") or {}).items():
            out[f"{s['metadata']['name']}/{k}"] = base64.b64decode(v).decode()
        for k, v in (s.get("stringData") or {}).items():
            out[f"{s['metadata']['name']}/{k}"] = v
    return out


def test_inline_secrets_only_land_in_secrets():
    values = cl.scenario_values("two-tenants")
    password = values["kafka"]["sasl"]["password"]
    redis_url = values["redis"]["url"]
    redis_password = redis_url.split(":")[2].split("@")[0]
    assert password.startswith("dummy-") and redis_password.startswith("dummy-")
    docs = cl.render_scenario("two-tenants")
    secrets = _secret_data(docs)
    # Positive control: the values were rendered, into a Secret.
    assert password in secrets.values() and redis_url in secrets.values()
    for obj in docs:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        for secret in (password, redis_password):
            assert secret not in text, f"{obj['kind']}/{obj['metadata']['name']} holds a secret in plain text"
            encoded = base64.b64encode(secret.encode()).decode()
            assert encoded not in text, f"{obj['kind']}/{obj['metadata']['name']} holds a base64 secret"


@pytest.mark.parametrize("scenario", ALL)
def test_secret_settings_come_from_secret_refs_only(scenario):
    values = cl.merged_values(scenario)
    docs = cl.render_scenario(scenario)
    sasl = values["kafka"]["securityProtocol"].startswith("SASL_")
    for cm in cl.of_kind(docs, "ConfigMap"):
        assert not {"LIVEAVATAR_REDIS_URL", "LIVEAVATAR_KAFKA_SASL_PASSWORD"} & set(cm.get("data", {}))
    for name, _, spec in cl.pod_specs(docs):
        for c in cl.containers(spec):
            for e in c.get("env", []):
                if any(w in e["name"] for w in ("PASSWORD", "REDIS_URL", "TOKEN")):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (name, e["name"])
            env = cl.env_of(c)
            if "LIVEAVATAR_REDIS_URL" not in env:
                continue
            ref = env["LIVEAVATAR_REDIS_URL"]["valueFrom"]["secretKeyRef"]
            if values["redis"]["existingSecret"]:
                assert (ref["name"], ref["key"]) == (values["redis"]["existingSecret"],
                                                      values["redis"]["existingSecretUrlKey"])
            assert ("LIVEAVATAR_KAFKA_SASL_PASSWORD" in env) == sasl, name
            if sasl and values["kafka"]["sasl"]["existingSecret"]:
                ref = env["LIVEAVATAR_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
                assert (ref["name"], ref["key"]) == (values["kafka"]["sasl"]["existingSecret"],
                                                      values["kafka"]["sasl"]["existingSecretPasswordKey"])


def test_external_tls_mounts_ca_bundles_and_creates_no_secret():
    values = cl.merged_values("external-tls")
    docs = cl.render_scenario("external-tls")
    assert cl.of_kind(docs, "Secret") == []  # every credential comes from an existing Secret
    cm = cl.of_kind(docs, "ConfigMap")[0]["data"]
    assert cm["LIVEAVATAR_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert cm["LIVEAVATAR_KAFKA_SASL_MECHANISM"] == values["kafka"]["sasl"]["mechanism"]
    cafile = cm["LIVEAVATAR_KAFKA_SSL_CAFILE"]
    for name, _, spec in cl.pod_specs(docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            if "envFrom" not in c:
                continue
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert cafile.startswith(mounts["kafka-ca"] + "/"), name
            assert volumes["kafka-ca"]["secret"]["secretName"] == values["kafka"]["tls"]["existingSecret"]
            assert volumes["redis-ca"]["secret"]["secretName"] == values["redis"]["tls"]["existingSecret"]
    for d in cl.of_kind(docs, "Deployment") + _lws(docs):
        for _, _, spec in cl.pod_specs([d]):
            assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
            for c in spec["containers"]:
                assert c["image"].startswith(values["global"]["imageRegistry"] + "/"), c["image"]


# ------------------------------------------------------------------------------------- pod hardening


@pytest.mark.parametrize("scenario", ALL)
def test_service_links_disabled_on_every_pod(scenario):
    pods = cl.pod_specs(cl.render_scenario(scenario))
    assert pods
    for name, _, spec in pods:
        assert spec.get("enableServiceLinks") is False, name


@pytest.mark.parametrize("scenario", ALL)
def test_every_pod_runs_as_non_root(scenario):
    for name, _, spec in cl.pod_specs(cl.render_scenario(scenario)):
        pod_sc = spec.get("securityContext", {})
        for c in cl.containers(spec):
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, (name, c["name"])
            assert sc.get("runAsUser", 1) != 0, (name, c["name"])
            assert sc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), (name, c["name"])
            assert sc.get("privileged") in (None, False), (name, c["name"])


@pytest.mark.parametrize("scenario", ALL)
def test_liveavatar_containers_have_read_only_root_and_writable_tmp(scenario):
    seen = set()
    for name, _, spec in cl.pod_specs(cl.render_scenario(scenario)):
        for c in spec["containers"]:
            if c["name"] not in {*SERVICES, "lane"}:
                continue
            seen.add(c["name"])
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, name
    assert seen == {*SERVICES, "lane"}


@pytest.mark.parametrize("scenario", ALL)
def test_every_long_running_container_has_probes_and_resources(scenario):
    docs = cl.render_scenario(scenario)
    pods = [p for p in cl.pod_specs(docs) if not p[0].startswith("Job/")]
    for name, _, spec in pods:
        for c in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert probe in c, (name, probe)
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], name


@pytest.mark.parametrize("scenario", ALL)
def test_liveavatar_containers_get_the_settings_contract(scenario):
    docs = cl.render_scenario(scenario)
    cm = cl.of_kind(docs, "ConfigMap")
    assert len(cm) == 1
    assert CONTRACT_CONFIG <= set(cm[0]["data"])
    seen = set()
    for name, _, spec in cl.pod_specs(docs):
        for c in spec["containers"]:
            component = c["name"]
            if component not in {*SERVICES, "lane"}:
                continue
            seen.add(component)
            assert c["envFrom"] == [{"configMapRef": {"name": cm[0]["metadata"]["name"]}}], name
            assert "LIVEAVATAR_REDIS_URL" in cl.env_of(c), name
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["http"] == (8000 if component == "session-api" else 8080), name
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                assert c[probe]["httpGet"] == {"path": path, "port": "http"}, name
    assert seen == {*SERVICES, "lane"}


# ---------------------------------------------------------------------------------------------- wiring


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("scenario", ALL)
def test_services_pdbs_and_hpas_select_existing_workloads(scenario):
    docs = cl.render_scenario(scenario)
    pods = cl.pod_specs(docs)
    for svc in cl.of_kind(docs, "Service"):
        selected = [p for p in pods if _matches(svc["spec"]["selector"], p[1].get("labels", {}))]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for name, _, spec in selected:
                names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names, (svc["metadata"]["name"], name)
    for pdb in cl.of_kind(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(_matches(sel, p[1].get("labels", {})) for p in pods), pdb["metadata"]["name"]
    deployments = {d["metadata"]["name"]: d for d in cl.of_kind(docs, "Deployment")}
    for hpa in cl.of_kind(docs, "HorizontalPodAutoscaler"):
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "an HPA-managed Deployment must not pin replicas"
    for sm in cl.of_kind(docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        svcs = [s for s in cl.of_kind(docs, "Service") if _matches(sel, s["metadata"]["labels"])]
        assert svcs, sm["metadata"]["name"]
        for ep in sm["spec"]["endpoints"]:
            assert all(ep["port"] in {p["name"] for p in s["spec"]["ports"]} for s in svcs)


def test_hpas_exist_for_the_cpu_services_when_enabled():
    values = cl.merged_values("default")
    hpas = {h["metadata"]["name"]: h for h in cl.of_kind(cl.render_scenario("default"), "HorizontalPodAutoscaler")}
    for key, component in (("sessionApi", "session-api"), ("audioEncoder", "audio-encoder"),
                           ("streamPackager", "stream-packager")):
        hpa = hpas[f"{cl.RELEASE}-{component}"]
        assert hpa["spec"]["minReplicas"] == values[key]["autoscaling"]["minReplicas"]
        assert hpa["spec"]["maxReplicas"] == values[key]["autoscaling"]["maxReplicas"]
    assert len(hpas) == 3  # lanes are scaled by the lane controller, never by an HPA


def test_lane_controller_may_scale_leaderworkersets_and_record_events():
    docs = cl.render_scenario("default")
    (role,) = cl.of_kind(docs, "Role")
    (binding,) = cl.of_kind(docs, "RoleBinding")
    (sa,) = cl.of_kind(docs, "ServiceAccount")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"]
             for r in rule["resources"]}
    assert {"get", "list", "watch", "patch", "update"} <= rules[("leaderworkerset.x-k8s.io", "leaderworkersets")]
    assert "create" in rules[("", "events")]
    assert not any("*" in verbs for verbs in rules.values())
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": cl.NAMESPACE}]
    controller = next(d for d in cl.of_kind(docs, "Deployment")
                      if d["metadata"]["labels"]["app.kubernetes.io/component"] == "lane-controller")
    pod = controller["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    # Only the controller talks to the Kubernetes API.
    for name, _, spec in cl.pod_specs(docs):
        if spec is not pod:
            assert spec.get("automountServiceAccountToken") is False, name


def test_strimzi_topics_follow_the_topic_values():
    values = cl.merged_values("two-tenants")
    topics = values["kafka"]["topics"]
    docs = cl.render_scenario("two-tenants")
    kts = {k["spec"]["topicName"]: k for k in cl.of_kind(docs, "KafkaTopic")}
    assert set(kts) == {t["name"] for t in topics["items"].values()}
    assert {t["name"]: t["partitions"] for t in topics["items"].values()} == {
        "audio": 16, "audio-features": 16, "frames": 16, "media": 16, "events": 16}
    for t in topics["items"].values():
        kt = kts[t["name"]]
        assert kt["spec"]["partitions"] == t["partitions"]
        assert kt["spec"]["replicas"] == topics["replicationFactor"]
        assert int(kt["spec"]["config"]["retention.ms"]) == t["retentionMs"]
        assert int(kt["spec"]["config"]["max.message.bytes"]) == t["maxMessageBytes"]
        assert kt["metadata"]["labels"]["strimzi.io/cluster"] == topics["strimzi"]["clusterName"]
    assert cl.of_kind(docs, "Job") == []  # the Strimzi operator creates them, not the hook Job


@pytest.mark.parametrize("scenario", ["default", "tiny-cpu", "external-tls"])
def test_topic_job_creates_every_topic(scenario):
    values = cl.merged_values(scenario)
    docs = cl.render_scenario(scenario)
    (job,) = cl.of_kind(docs, "Job")
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    script = c["args"][0]
    for t in values["kafka"]["topics"]["items"].values():
        assert f'create "{t["name"]}" {t["partitions"]} {t["retentionMs"]} {t["maxMessageBytes"]}\n' in script
    rf = cl.env_of(c)["REPLICATION_FACTOR"]["value"]
    expected_rf = 1 if values["kafka"]["embedded"]["enabled"] else values["kafka"]["topics"]["replicationFactor"]
    assert rf == str(expected_rf)
    bootstrap = cl.env_of(c)["BOOTSTRAP"]["value"]
    cm = cl.of_kind(docs, "ConfigMap")[0]["data"]
    assert bootstrap == cm["LIVEAVATAR_KAFKA_BOOTSTRAP"]


def test_tiny_cpu_wires_the_embedded_kafka_and_redis():
    docs = cl.render_scenario("tiny-cpu")
    services = {s["metadata"]["name"]: s for s in cl.of_kind(docs, "Service")}
    cm = cl.of_kind(docs, "ConfigMap")[0]["data"]
    host, port = cm["LIVEAVATAR_KAFKA_BOOTSTRAP"].split(":")
    assert host in services and int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    url = _secret_data(docs)[f"{cl.RELEASE}-credentials/redis-url"]
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    assert host in services and int(port) in {p["port"] for p in services[host]["spec"]["ports"]}


def test_service_images_follow_values_and_skaffold_overrides():
    docs = cl.render_scenario("default", {
        "global": {"imageRegistry": "reg.example"},
        "sessionApi": {"image": {"repository": "la/api", "tag": "abc123"}},
        "lanes": {"image": {"repository": "la/lane", "digest": "sha256:" + "a" * 64}},
    })
    images = {c["name"]: c["image"] for _, _, s in cl.pod_specs(docs) for c in s["containers"]}
    assert images["session-api"] == "reg.example/la/api:abc123"
    assert images["lane"] == "reg.example/la/lane@sha256:" + "a" * 64
    chart_version = yaml.safe_load((cl.CHART / "Chart.yaml").read_text())["appVersion"]
    assert images["stream-packager"] == f"reg.example/liveavatar/stream-packager:{chart_version}"


def test_model_volume_sources():
    def models_volume(extra):
        (lws,) = _lws(cl.render_scenario("default", extra))
        vols = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["volumes"]
        return next(v for v in vols if v["name"] == "models")

    pvc = models_volume({"models": {"existingClaim": "weights"}})
    assert pvc["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    host = models_volume({"models": {"existingClaim": "", "hostPath": "/srv/weights"}})
    assert host["hostPath"]["path"] == "/srv/weights"
    empty = models_volume({"models": {"existingClaim": "", "hostPath": ""}})
    assert "emptyDir" in empty
