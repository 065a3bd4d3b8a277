"""The chart's settings contract is what the services read, in both directions.

For every ``ci/`` scenario and the defaults, every ``LIVEAVATAR_*`` variable a LiveAvatar container gets
(its ``env`` plus the ConfigMap it loads with ``envFrom``) must be a declared field of that service's
settings class: pydantic-settings ignores unknown variables silently, so a misspelt or unread variable
would render cleanly and then do nothing (a cluster configured for TLS would connect in plaintext).
The reverse: every setting the chart must set in a pod (listed per service below) is rendered.
"""

from __future__ import annotations

import importlib

import pytest

from tests.unit.chart import chartlib as cl

pytestmark = pytest.mark.unit

#: container name -> settings class (module, class name)
SETTINGS = {
    "session-api": ("services.session_api.settings", "ApiSettings"),
    "audio-encoder": ("services.audio_encoder.worker", "AudioEncoderSettings"),
    "lane": ("services.lane.worker", "LaneSettings"),
    "stream-packager": ("services.stream_packager.worker", "PackagerSettings"),
    "webhooks": ("services.webhooks.settings", "WebhookSettings"),
    "lane-controller": ("services.lane_controller.settings", "LaneControllerSettings"),
}

#: settings the chart must set for each service in a cluster (their local defaults are wrong there)
MUST_SET = {
    "*": {"LIVEAVATAR_KAFKA_BOOTSTRAP", "LIVEAVATAR_KAFKA_SECURITY_PROTOCOL", "LIVEAVATAR_REDIS_URL",
          "LIVEAVATAR_JSON_LOGS", "LIVEAVATAR_LOG_LEVEL"},
    "session-api": {"LIVEAVATAR_API_HOST"},
    "audio-encoder": {"LIVEAVATAR_HEALTH_HOST", "LIVEAVATAR_MODEL_CONFIG"},
    "lane": {"LIVEAVATAR_HEALTH_HOST", "LIVEAVATAR_MODEL_CONFIG", "LIVEAVATAR_DEVICE", "LIVEAVATAR_LANE_SHAPE",
             "LIVEAVATAR_LANE_POOL", "LIVEAVATAR_DIST_RANK", "LIVEAVATAR_DIST_WORLD_SIZE",
             "LIVEAVATAR_DIST_MASTER_ADDR", "LIVEAVATAR_DIST_MASTER_PORT", "LIVEAVATAR_LANE_GROUP_INDEX",
             "LIVEAVATAR_LANE_ID_PREFIX", "LIVEAVATAR_LANE_PARTITION_BASE", "LIVEAVATAR_HEALTH_PORT_BY_RANK"},
    "stream-packager": {"LIVEAVATAR_HEALTH_HOST"},
    "webhooks": {"LIVEAVATAR_HEALTH_HOST"},
    "lane-controller": {"LIVEAVATAR_HEALTH_HOST"},
}


def declared(settings_class) -> set[str]:
    """The environment variable names a pydantic-settings class reads."""
    prefix = settings_class.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def _settings_class(component: str):
    module, name = SETTINGS[component]
    return getattr(importlib.import_module(module), name)


def rendered_env(docs: list[dict]) -> dict[tuple[str, str], set[str]]:
    """(pod, container) -> every LIVEAVATAR_* variable it gets, from env and from ConfigMaps."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in cl.of_kind(docs, "ConfigMap")}
    out = {}
    for pod, _, spec in cl.pod_specs(docs):
        for c in cl.containers(spec):
            if c["name"] not in SETTINGS:
                continue
            names = set(cl.env_of(c))
            for source in c.get("envFrom", []):
                names |= set(configmaps[source["configMapRef"]["name"]])
            out[(pod, c["name"])] = {n for n in names if n.startswith("LIVEAVATAR_")}
    return out


@pytest.fixture(autouse=True)
def _needs_helm():
    cl.helm()


@pytest.mark.parametrize("scenario", list(cl.SCENARIOS))
def test_every_rendered_variable_is_read_by_its_service(scenario):
    env = rendered_env(cl.render_scenario(scenario))
    assert {c for _, c in env} == set(SETTINGS), "a LiveAvatar service is missing from the render"
    unread = {f"{pod}/{c}": sorted(names - declared(_settings_class(c))) for (pod, c), names in env.items()}
    assert {k: v for k, v in unread.items() if v} == {}


@pytest.mark.parametrize("scenario", list(cl.SCENARIOS))
def test_every_setting_the_chart_must_set_is_rendered(scenario):
    env = rendered_env(cl.render_scenario(scenario))
    missing = {f"{pod}/{c}": sorted((MUST_SET["*"] | MUST_SET[c]) - names) for (pod, c), names in env.items()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_tls_and_sasl_scenario_renders_the_security_settings():
    env = rendered_env(cl.render_scenario("external-tls"))
    values = cl.merged_values("external-tls")
    expected = {"LIVEAVATAR_KAFKA_SSL_CAFILE"}
    if values["kafka"]["securityProtocol"].startswith("SASL_"):
        expected |= {"LIVEAVATAR_KAFKA_SASL_MECHANISM", "LIVEAVATAR_KAFKA_SASL_USERNAME",
                     "LIVEAVATAR_KAFKA_SASL_PASSWORD"}
    if values["redis"]["tls"]["existingSecret"]:
        expected.add("LIVEAVATAR_REDIS_SSL_CAFILE")
    for key, names in env.items():
        assert expected <= names, (key, sorted(expected - names))


def test_the_checker_catches_an_unread_variable():
    """Negative control: a variable no settings class declares is reported."""
    class_ = _settings_class("stream-packager")
    assert "LIVEAVATAR_KAFKA_BOOTSTRAP" in declared(class_)
    assert "LIVEAVATAR_MODEL_DIR" not in declared(class_)
    assert "LIVEAVATAR_API_HOST" not in declared(class_)


def test_a_triton_audio_encoder_is_told_to_use_triton():
    """The Triton URL alone would leave the encoder on its default in-process backend."""
    docs = cl.render_scenario("default", {"audioEncoder": {"triton": {"enabled": True}}})
    (encoder,) = [c for _, _, spec in cl.pod_specs(docs) for c in spec["containers"] if c["name"] == "audio-encoder"]
    env = cl.env_of(encoder)
    assert env["LIVEAVATAR_BACKEND"]["value"] == "triton"
    assert env["LIVEAVATAR_TRITON_URL"]["value"].endswith(":8000")
