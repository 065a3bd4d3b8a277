"""The local container stack's plan comes from the chart: environment, names, lane ranks (no podman needed).

``infra/containers/stack.py`` turns the rendered tiny CPU profile into podman containers; these tests check
the translation against the rendered objects themselves, independently of the driver's code paths.
"""

from __future__ import annotations

import base64

import pytest

from tests.unit.chart import chartlib as cl

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def planned():
    cl.helm()
    from infra.containers import stack

    docs = cl.render_scenario("tiny-cpu")
    specs = stack.plan(stack.Manifests(docs), api_port=18000, redis_port=18001)
    return docs, {s.name: s for s in specs}


def test_expand_follows_kubernetes_rules():
    from infra.containers.stack import expand

    env = {"A": "x", "B": "$(A)"}
    assert expand("$(A)-$(B)", env) == "x-$(A)"          # no recursive expansion
    assert expand("$(NOPE)", env) == "$(NOPE)"           # unknown references stay as written
    assert expand("$$(A)", env) == "$(A)"                # $$ escapes
    assert expand("a$b$(A)", env) == "a$bx"


def test_every_workload_but_the_controller_runs_and_the_order_puts_infrastructure_first(planned):
    docs, specs = planned
    deployments = {d["metadata"]["name"] for d in cl.of_kind(docs, "Deployment")}
    assert deployments - set(specs) == {"liveavatar-lane-controller"}
    (lws,) = cl.of_kind(docs, "LeaderWorkerSet")
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    lanes = [n for n, s in specs.items() if s.role == "lane"]
    assert sorted(lanes) == sorted([f"{lws['metadata']['name']}-0"]
                                   + [f"{lws['metadata']['name']}-0-{w}" for w in range(1, size)])
    roles = [s.role for s in specs.values()]
    assert roles.index("topics") > max(roles.index("redis"), roles.index("kafka"))
    assert roles.index("topics") < min(i for i, r in enumerate(roles) if r in ("service", "lane"))


def test_environment_is_the_pods_with_references_resolved(planned):
    docs, specs = planned
    (secret,) = [d for d in cl.of_kind(docs, "Secret") if d["metadata"]["name"] == "liveavatar-credentials"]
    (cm,) = [d for d in cl.of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "liveavatar-config"]
    redis_url = base64.b64decode(secret["data"]["redis-url"]).decode()
    for d in cl.of_kind(docs, "Deployment"):
        name = d["metadata"]["name"]
        if name not in specs or specs[name].role != "service":
            continue
        (c,) = d["spec"]["template"]["spec"]["containers"]
        env = specs[name].env
        for k, v in cm["data"].items():
            assert env[k] == str(v), (name, k)
        for e in c.get("env", []):
            if "value" in e:
                assert env[e["name"]] == e["value"], (name, e["name"])
        assert env["LIVEAVATAR_REDIS_URL"] == redis_url == "redis://liveavatar-redis:6379/0"
    assert specs["liveavatar-session-api"].publish == ["127.0.0.1:18000:8000"]
    assert specs["liveavatar-redis"].publish == ["127.0.0.1:18001:6379"]
    assert "liveavatar-kafka" in specs["liveavatar-kafka"].aliases
    assert specs["liveavatar-kafka"].args[specs["liveavatar-kafka"].args.index("--advertised-listener-url") + 1] \
        == "tcp://" + cm["data"]["LIVEAVATAR_KAFKA_BOOTSTRAP"]


def test_lane_ranks_get_leaderworkerset_variables(planned):
    docs, specs = planned
    (lws,) = cl.of_kind(docs, "LeaderWorkerSet")
    name, size = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]["size"]
    for w in range(size):
        s = specs[name + "-0" if w == 0 else f"{name}-0-{w}"]
        assert s.group == f"{name}-0"
        assert s.env["LIVEAVATAR_DIST_RANK"] == str(w)
        assert s.env["LIVEAVATAR_DIST_WORLD_SIZE"] == str(size)
        assert s.env["LIVEAVATAR_DIST_MASTER_ADDR"] == f"{name}-0"
        assert s.env["LIVEAVATAR_LANE_GROUP_INDEX"] == "0"
        assert not [v for v in s.env.values() if "$(" in v]
        assert s.shm_size == str(256 * 1024**2)                  # the chart's lanes.shmSizeLimit
        assert s.read_only and s.user == "10001:10001" and s.cap_drop == ["ALL"]
