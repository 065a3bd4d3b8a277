"""values.yaml, values.schema.json and the `## @param` docs stay in step; bad values are rejected.

The schema is checked with jsonschema (independently of Helm) and through Helm itself (render).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from tests.unit.chart import chartlib as cl

pytestmark = pytest.mark.unit

VALUES = yaml.safe_load((cl.CHART / "values.yaml").read_text())
SCHEMA = json.loads((cl.CHART / "values.schema.json").read_text())
PARAM = re.compile(r"^\s*## @param (\S+) (\S.*)$")


def _resolve(node: dict) -> tuple[dict, bool]:
    """Follow a local $ref; returns (schema, came_from_ref)."""
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        return SCHEMA["$defs"][name], True
    return node, False


def _leaves(values: dict, schema: dict, path: str = "") -> dict[str, tuple[bool, ...]]:
    """Leaf path -> whether each ancestor (and the leaf) schema came from a shared $defs type.

    A node is a leaf when its schema lists no `properties` (scalars, lists, free-form maps).
    Fails when values.yaml holds a key the schema does not declare.
    """
    out = {}
    props = schema.get("properties")
    if props is None:
        return {path: ()}
    assert isinstance(values, dict), f"{path}: schema describes an object, values.yaml has {values!r}"
    for key, value in values.items():
        sub = f"{path}.{key}" if path else key
        assert key in props, f"values.yaml key {sub} is not in values.schema.json"
        node, from_ref = _resolve(props[key])
        for leaf, refs in _leaves(value, node, sub).items():
            out[leaf] = (from_ref, *refs)
    return out


def _schema_paths(schema: dict, path: str = "") -> set[str]:
    """Every property path the schema declares through nested objects."""
    out = set()
    for key, node in (schema.get("properties") or {}).items():
        sub = f"{path}.{key}" if path else key
        out.add(sub)
        out |= _schema_paths(_resolve(node)[0], sub)
    return out


def _value_paths(values, path: str = "") -> set[str]:
    out = set()
    if isinstance(values, dict):
        for key, value in values.items():
            sub = f"{path}.{key}" if path else key
            out.add(sub)
            out |= _value_paths(value, sub)
    return out


def _params() -> dict[str, str]:
    params = {}
    for line in (cl.CHART / "values.yaml").read_text().splitlines():
        m = PARAM.match(line)
        if m:
            assert m.group(1) not in params, f"@param {m.group(1)} documented twice"
            params[m.group(1)] = m.group(2)
    return params


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["additionalProperties"] is False


@pytest.mark.parametrize("scenario", list(cl.SCENARIOS))
def test_values_and_scenarios_validate_against_the_schema(scenario):
    jsonschema.Draft202012Validator(SCHEMA).validate(cl.merged_values(scenario))


def test_every_values_leaf_is_in_the_schema_and_every_schema_key_has_a_default():
    leaves = _leaves(VALUES, SCHEMA)
    assert len(leaves) > 100
    values_paths = _value_paths(VALUES)
    schema_paths = _schema_paths(SCHEMA)
    # Every object key the schema declares (outside free-form maps) has a default in values.yaml.
    missing = sorted(p for p in schema_paths if p not in values_paths)
    assert missing == [], f"declared in values.schema.json but absent from values.yaml: {missing}"


def test_every_leaf_is_documented_with_a_param_line():
    params = _params()
    leaves = _leaves(VALUES, SCHEMA)
    values_paths = _value_paths(VALUES)
    assert sorted(p for p in params if p not in values_paths) == [], "@param for a value that does not exist"
    for leaf, refs in leaves.items():
        parts = leaf.split(".")
        documented = [i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in params]
        assert len(documented) == 1, f"{leaf}: documented {len(documented)} times (itself or an ancestor)"
        depth = documented[0]
        # Documenting a whole subtree at once is allowed only for a shared type (resources, image, ...).
        assert depth == len(parts) or refs[depth - 1], f"{leaf} is not documented by its own @param line"
    assert [p for p, desc in params.items() if len(desc) < 8] == []


@pytest.mark.parametrize(
    "values, key",
    [
        ({"sessionApi": {"replicaCount": "two"}}, "replicaCount"),
        ({"sessionApi": {"replicas": 3}}, "replicas"),
        ({"lanes": {"stages": 4}}, "stages"),
        ({"lanes": {"shape": "3+1"}}, "shape"),
        ({"lanes": {"shape": 3}}, "shape"),
        ({"gpu": {"enabled": "yes"}}, "enabled"),
        ({"kafka": {"securityProtocol": "TLS"}}, "securityProtocol"),
        ({"lanePools": [{"name": "a", "min": 1, "max": 2}]}, "tenant"),
        ({"lanePools": [{"name": "Bad_Name", "tenant": "t", "min": 1, "max": 2}]}, "name"),
        ({"lanePools": [{"name": "a", "tenant": "t", "min": 1, "max": 2, "gpus": 1}]}, "gpus"),
        ({"config": {"modelConfig": "/weights/x"}}, "modelConfig"),
        ({"sessionApi": {"image": {"digest": "latest"}}}, "digest"),
        ({"sessionApi": {"resources": {"requests": {"memory": "lots"}}}}, "memory"),
        ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "interval"),
        ({"unknownTopLevel": True}, "unknownTopLevel"),
    ],
)
def test_invalid_values_are_rejected_by_helm(values, key):
    helm = cl.helm()
    with pytest.raises(helm.HelmValuesError) as err:
        cl.render(values)
    assert key in str(err.value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(cl.deep_merge(VALUES, values))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lanePools": [{"name": "a", "tenant": "t", "min": 3, "max": 2}]}, "max (2) must be >= min (3)"),
        ({"lanePools": [{"name": "a", "tenant": "t", "min": 1, "max": 2},
                        {"name": "a", "tenant": "u", "min": 1, "max": 2}]}, '"a" is used twice'),
        ({"kafka": {"securityProtocol": "SASL_SSL", "sasl": {"username": "u", "existingSecret": "s"}}},
         "kafka.sasl.mechanism is required"),
        ({"kafka": {"securityProtocol": "SASL_SSL", "sasl": {"mechanism": "PLAIN", "username": "u"}}},
         "kafka.sasl.existingSecret"),
        ({"kafka": {"topics": {"strimzi": {"enabled": True}}}}, "exclusive"),
        ({"kafka": {"embedded": {"enabled": True}, "securityProtocol": "SSL"}}, "PLAINTEXT"),
        ({"redis": {"url": ""}}, "redis.url or redis.existingSecret"),
        ({"sessionApi": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas (5)"),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(values, message):
    helm = cl.helm()
    with pytest.raises(helm.HelmError) as err:
        cl.render(values)
    assert message in str(err.value)
