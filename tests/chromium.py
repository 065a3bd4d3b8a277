"""Headless Chromium for the browser tests, driven over the DevTools protocol with the ``websockets`` package
(no driver, no Playwright, no download): the browser from Debian's ``chromium`` package (``infra/bootstrap.sh``
installs it), in its own process group, on an ephemeral DevTools port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--autoplay-policy=no-user-gesture-required",
    "--disable-dev-shm-usage", "--mute-audio", "--window-size=1280,900",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",    # a beeping fake microphone
]


class CdpError(RuntimeError):
    """A DevTools protocol command failed, or JavaScript evaluated in the page threw."""


class Cdp:
    """A minimal DevTools protocol client for one page target: commands in, results (and events) out."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.console: list[str] = []

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise CdpError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.console.append(f"EXCEPTION {d.get('exception', {}).get('description', d.get('text'))}")

    def js(self, expression: str, await_promise: bool = False):
        """Evaluate ``expression`` in the page; its value (JSON-serialisable) or CdpError if it threw."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise CdpError(f"{expression[:80]!r} threw: {d.get('exception', {}).get('description', d.get('text'))}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str, poll_s: float = 0.25):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(poll_s)
        status = self.js("document.getElementById('status') && document.getElementById('status').textContent")
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; page status: {status!r}; "
                             f"console tail: {self.console[-15:]}")


def group_alive(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


@contextmanager
def chromium(profile: Path, log_path: Path):
    """Headless Chromium in its own process group, DevTools on an ephemeral 127.0.0.1 port; yields the port.
    On exit the whole group is stopped and the test fails if any process of it is left."""
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "DevToolsActivePort").unlink(missing_ok=True)      # a reused profile's stale port
    argv = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0", "about:blank"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"chromium opened no DevTools port in 60 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not group_alive(proc.pid):
                break
        proc.wait(timeout=5)
        assert not group_alive(proc.pid), f"chromium left processes behind: {group_alive(proc.pid)}"


def page_target(port: int) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.2)
    raise AssertionError("chromium has no page target")
