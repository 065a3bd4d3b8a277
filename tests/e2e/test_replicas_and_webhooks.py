"""Two session-API replicas on the local stack, and the tenant's signed webhooks.

Replica A is a second API process (``python -m services.session_api`` on its own port, the same Redis
and broker); replica B is the stack's own. Sessions are created on A, then A is SIGKILLed: B takes over
their timer leases, keeps the avatar moving (idle motion) and serving its media, and ends them on their
idle timeout and maximum duration. A receiver on 127.0.0.1 gets the sessions' events from the stack's
webhooks dispatcher, each signed with the secret ``liveavatar tenants webhook`` printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from liveavatar_client import LiveAvatar

from infra.local.stack import free_port
from services.common import events
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture()
def replica_a(api_stack):
    port = free_port()
    info = api_stack["info"]
    env = {**os.environ, "LIVEAVATAR_KAFKA_BOOTSTRAP": info.kafka_bootstrap, "LIVEAVATAR_REDIS_URL": info.redis_url,
           "LIVEAVATAR_API_PORT": str(port), "LIVEAVATAR_JSON_LOGS": "true"}
    log = open(api_stack["run_dir"] / "replica-a.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "services.session_api"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    _wait(ready, 120, "replica A")
    yield {"base": base, "proc": proc}
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()


def test_a_killed_replica_s_sessions_live_on_and_end_on_time_with_signed_events(api_stack, make_tenant, replica_a,
                                                                                   examples):
    key = make_tenant("replicas")
    me = httpx.get(f"{api_stack['base']}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    tenant = me["tenant"]
    receiver = Receiver()
    r = subprocess.run([sys.executable, "-m", "services.cli", "tenants", "webhook", tenant, "--url", receiver.url,
                        "--run-dir", str(api_stack["run_dir"])], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(events.SECRET_PREFIX), "the secret must be alone on stdout"
    receiver.secret = lines[0]
    assert receiver.secret not in r.stderr

    img = (examples / "cyclops_baker.jpg").read_bytes()
    on_a = LiveAvatar(replica_a["base"], key, timeout=60)
    idle = on_a.create_session(img, {"idle": "silence", "idle_timeout_s": 6, "max_duration_s": 900})
    capped = on_a.create_session(img, {"idle": "pause", "idle_timeout_s": 900, "max_duration_s": 20})
    idle.send_audio_file(examples / "cyclops_baker.wav")
    on_b = LiveAvatar(api_stack["base"], key, timeout=60).session(idle.id)
    _, before = on_b.read_media(until_block=2, timeout_s=240)               # B serves what A's session makes
    replica_a["proc"].send_signal(signal.SIGKILL)
    replica_a["proc"].wait()
    killed = time.monotonic()

    # B keeps the session going: idle motion after the speech needs the timers A held.
    last = max(p.block for p in before if p.type == "fragment")
    _, after = on_b.read_media(until_block=last + 25, timeout_s=300, from_block=last + 1)
    blocks = [p.block for p in after if p.type == "fragment"]
    assert blocks == list(range(last + 1, last + 26)), blocks               # in order, nothing lost
    assert on_b.refresh().state == "active"                                 # a media client: not idle

    # ... and ends it once nobody watches (idle timeout), and the other at its maximum duration.
    _wait(lambda: on_b.refresh().state in ("ending", "ended"), 6 + 15, "the idle timeout on B")
    cap_b = LiveAvatar(api_stack["base"], key, timeout=60).session(capped.id)
    _wait(lambda: cap_b.refresh().state in ("ending", "ended"), 20 + 30, "the maximum duration on B")
    assert time.monotonic() - killed < 120

    ended = {sid: _wait(lambda sid=sid: receiver.of(sid, "session.ended"), 120, f"session.ended of {sid}")
             for sid in (idle.id, capped.id)}
    assert ended[idle.id][0]["data"]["reason"] == "idle_timeout"
    assert ended[capped.id][0]["data"]["reason"] == "max_duration"
    e = ended[idle.id][0]["data"]
    assert e["blocks"] >= last + 26 and e["generated_s"] == pytest.approx(e["blocks"] * 0.48)
    assert ended[capped.id][0]["data"]["duration_s"] >= 20
    for sid in (idle.id, capped.id):
        assert len({x["id"] for x in receiver.of(sid, "session.ready")}) == 1
    utt = _wait(lambda: receiver.of(idle.id, "utterance.ended"), 60, "utterance.ended")
    assert len({x["id"] for x in utt}) == 1 and 0 <= utt[0]["data"]["last_block"] < e["blocks"]
    with receiver.lock:
        assert all(d["verified"] for d in receiver.deliveries), "every delivery carries a valid signature"
    usage = httpx.get(f"{api_stack['base']}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["blocks_generated_today"] >= e["blocks"]
    assert usage["seconds_generated_today"] == pytest.approx(usage["blocks_generated_today"] * 0.48)
    receiver.httpd.shutdown()
