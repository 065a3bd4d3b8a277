"""Schema-driven fuzzing of the live session API with schemathesis: no input may cause a 5xx.

The API's own ``/openapi.json`` (served by the running stack) drives the generation. For every
operation schemathesis generates a bounded number of requests, in both of its modes: *positive*
(requests that match the schema: right types, random values) and *negative* (requests that break it:
wrong types, missing fields, bad JSON). They are sent with a valid Bearer key:

  1. against random session ids (the path parameters schemathesis generates; mostly 404s);
  2. against one real, active session (so audio uploads, interrupt, keep-alive and delete reach the
     code behind the 404 check: decoders, the bus, state changes), DELETE last;
  3. a few of each with a wrong key (401).

Every response must be < 500, and every 4xx must have the API's one error shape
``{"error": {"status", "code", "message"}}``. Hypothesis runs derandomized (same requests every run);
the whole run takes about a minute on two CPU cores.
"""

from __future__ import annotations

import collections
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES = {GenerationMode.POSITIVE: 80, GenerationMode.NEGATIVE: 80}   # per operation and pass
BAD_KEY_EXAMPLES = 5
STREAMING = ("/v1/sessions/{sid}/media.mp4",)     # never ends for a live session: only fuzzed with random ids
TIMEOUT_S = 20


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


class Recorder:
    """Responses by operation and status, and every violation (5xx, wrong error shape, transport error)."""

    def __init__(self):
        self.statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.by_pass: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.violations: list[str] = []

    def send(self, case, label: str, headers: dict) -> None:
        op = f"{case.method.upper()} {case.path}"
        try:
            r = case.call(headers=headers, timeout=TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a transport failure is a finding, reported below
            self.violations.append(f"[{label}] {op}: {type(exc).__name__}: {exc}\n  {case.as_curl_command()}")
            return
        self.statuses[op][r.status_code] += 1
        self.by_pass[label][r.status_code] += 1
        if r.status_code >= 500:
            self.violations.append(f"[{label}] {op} -> {r.status_code} {r.text[:200]}\n  {case.as_curl_command()}")
        elif r.status_code >= 400:
            try:
                err = json.loads(r.text)["error"]
                ok = err["status"] == r.status_code and err["code"] and err["message"]
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                self.violations.append(f"[{label}] {op} -> {r.status_code} without the error shape: {r.text[:200]}")


def _fuzz(operation, recorder: Recorder, label: str, headers: dict, mode: GenerationMode, n: int, **fixed):
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @_settings(n)
    def run(case):
        recorder.send(case, label, headers)

    try:
        run()
    except Unsatisfiable:          # negative mode on an operation with no inputs: nothing to break
        assert mode == GenerationMode.NEGATIVE, f"{operation.method} {operation.path}: no {mode.value} case"


def test_no_input_gets_a_server_error(api_stack, make_tenant, client, examples):
    key = make_tenant("fuzz", max_sessions=8)
    auth = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_url(f"{api_stack['base']}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9, [f"{o.method} {o.path}" for o in operations]
    rec = Recorder()

    # 1. Random path parameters (sessions that do not exist), both generation modes.
    for op in operations:
        for mode, n in EXAMPLES.items():
            _fuzz(op, rec, f"random-id/{mode.value}", auth, mode, n)

    # 2. One real, active session: the handlers behind the 404 check. DELETE last.
    jpg = (examples / "cyclops_baker.jpg").read_bytes()
    r = client.post("/v1/sessions", headers=auth, files={"image": ("a.jpg", jpg, "image/jpeg")},
                    data={"options": json.dumps({"idle": "pause"})})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    real = sorted((o for o in operations if "{sid}" in o.path and o.path not in STREAMING),
                  key=lambda o: o.method.lower() == "delete")
    for op in real:
        for mode, n in EXAMPLES.items():
            _fuzz(op, rec, f"real-id/{mode.value}", auth, mode, n, path_parameters={"sid": sid})

    # 3. A wrong key: 401 everywhere, in the error shape.
    bad = {"Authorization": "Bearer la_" + "0" * 43}
    for op in operations:
        _fuzz(op, rec, "bad-key", bad, GenerationMode.POSITIVE, BAD_KEY_EXAMPLES)

    client.delete(f"/v1/sessions/{sid}", headers=auth)
    summary = {op: dict(sorted(c.items())) for op, c in sorted(rec.statuses.items())}
    print(json.dumps({"by_operation": summary, "by_pass": {k: dict(v) for k, v in rec.by_pass.items()}}, indent=1))
    assert not rec.violations, f"{len(rec.violations)} violations:\n" + "\n".join(rec.violations[:20])

    # The run reached the handlers: authorised reads succeeded and the real session's audio endpoint
    # rejected fuzzed uploads with a 4xx (not just 401/404 everywhere).
    assert summary["GET /v1/usage"].get(200, 0) > 0 and summary["GET /v1/sessions"].get(200, 0) > 0, summary
    audio = summary["POST /v1/sessions/{sid}/audio"]
    assert sum(v for s, v in audio.items() if s in (400, 413, 415, 422)) > 0, audio
    assert set(rec.by_pass["bad-key"]) == {401}, rec.by_pass["bad-key"]
    total = sum(sum(c.values()) for c in rec.statuses.values())
    assert total >= len(operations) * 2 * min(EXAMPLES.values()) // 2, total
