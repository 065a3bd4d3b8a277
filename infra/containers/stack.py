"""``make containers-up`` / ``make containers-down``: the local stack as podman containers, from the chart.

The chart (charts/liveavatar) is rendered offline for the tiny CPU profile (``ci/tiny-cpu-values.yaml``,
:mod:`infra.chart_render`) and its workloads become containers on one podman network:

- every Deployment runs as one container named after it, reachable under the names of the Services that
  select it (``liveavatar-kafka``, ``liveavatar-redis``, ...), with the pod's environment resolved the way
  the kubelet does it: ``envFrom`` ConfigMaps and Secrets, then ``env`` with ``configMapKeyRef``,
  ``secretKeyRef``, ``fieldRef`` (labels, name, namespace) and ``$(VAR)`` references;
- each LeaderWorkerSet group runs one container per rank (``<lws>-<group>`` is the leader,
  ``<lws>-<group>-<worker>`` the workers) with the ``LWS_*`` variables LeaderWorkerSet injects;
- the pod and container security context (user, read-only root, dropped capabilities, no new
  privileges), command/args and emptyDir volumes (tmpfs; ``/dev/shm`` sizes the shared memory) apply;
- readiness is the chart's own readinessProbe (httpGet, tcpSocket or exec), checked from the host.

Three parts differ from a cluster, on purpose:

- the broker is Tansu (``localhost/liveavatar-broker``, the broker ``liveavatar up`` runs) in place of the
  embedded Apache Kafka, under the same Service name and port; the topic Job becomes a one-shot container
  that creates the topics of ``infra/topics.py``;
- the lane controller is not run (it scales LeaderWorkerSets through a Kubernetes API): each lane pool runs
  its ``min`` groups;
- the session API's and Redis' ports are published on 127.0.0.1 (the session API for clients, Redis so that
  ``liveavatar tenants create --redis-url`` works from the host).

A watcher process (``python -m infra.containers.stack watch``, started by ``up``, stopped by ``down``)
plays the kubelet and LeaderWorkerSet controller: a Deployment's container that exits is started again;
when any rank of a lane group exits, the whole group is removed and created again (LeaderWorkerSet's
``RecreateGroupOnPodRestart``), so the lane resumes its session at the next block as under ``liveavatar up``.

State lives in ``.run/containers/`` (``stack.json``, ``watch.log``). Every container carries the label
``io.liveavatar.stack=<name>``; ``down`` removes them all, the network and the watcher.

    python -m infra.containers.stack up [--api-port N] [--timeout 900]
    python -m infra.containers.stack status
    python -m infra.containers.stack down
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra import chart_render
from infra.containers import images
from infra.local.stack import LOOPBACK, free_port, pid_alive, stop_pid

STACK = "liveavatar"
LABEL = "io.liveavatar.stack"
NETWORK = "liveavatar"
SCENARIO = "tiny-cpu"
#: Deployments not run locally (they need a Kubernetes API).
SKIPPED = {"lane-controller"}
#: Chart component (container name) -> image name of `make images`.
IMAGE_OF = {"kafka": "broker"}
STATE_FILE = "stack.json"
#: Workload kinds, in start order: infrastructure, the topic job, then the services.
ORDER = ("redis", "kafka", "topics", "service", "lane")


class ContainersError(RuntimeError):
    """The container stack could not be started, or is not in the state asked for."""


def state_dir() -> Path:
    return Path(os.environ.get("LIVEAVATAR_CONTAINERS_DIR", images.REPO / ".run" / "containers")).resolve()


# ---------------------------------------------------------------------------------------- the plan


@dataclass
class Probe:
    kind: str                      # http | tcp | exec
    port: int = 0
    path: str = "/"
    command: list[str] = field(default_factory=list)


@dataclass
class ContainerSpec:
    name: str
    image: str
    role: str                      # redis | kafka | topics | service | lane
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] | None = None
    args: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    publish: list[str] = field(default_factory=list)      # "127.0.0.1:HOST:CONTAINER"
    tmpfs: list[str] = field(default_factory=list)
    shm_size: str = ""
    user: str = ""
    read_only: bool = False
    cap_drop: list[str] = field(default_factory=list)
    no_new_privileges: bool = False
    readiness: Probe | None = None
    group: str = ""                                      # lane group (LeaderWorkerSet group) name


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_QUANTITY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "K": 1000, "M": 1000**2, "G": 1000**3}


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]i?)?", str(quantity))
    if m is None:
        raise ContainersError(f"unsupported quantity {quantity!r}")
    return int(m.group(1)) * _QUANTITY.get(m.group(2) or "", 1)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, unknown ones kept, ``$$`` escapes."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        m = _VAR.match(value, i)
        if m:
            out.append(env.get(m.group(1), m.group(0)))
            i = m.end()
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


class Manifests:
    """The rendered objects of the chart, with lookups for what a pod references."""

    def __init__(self, docs: list[dict]):
        self.docs = docs
        self.config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        self.secrets = {}
        for d in docs:
            if d["kind"] == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
                data.update(d.get("stringData") or {})
                self.secrets[d["metadata"]["name"]] = data
        self.services = [d for d in docs if d["kind"] == "Service"]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def _ref(self, store: dict, kind: str, ref: dict) -> dict[str, str]:
        if ref["name"] not in store:
            if ref.get("optional"):
                return {}
            raise ContainersError(f"the chart references {kind} {ref['name']!r}, which it does not render")
        return store[ref["name"]]

    def resolve_env(self, container: dict, pod: dict, extra: dict[str, str]) -> dict[str, str]:
        """The container's environment as the kubelet builds it (``extra``: injected first, like LWS_*)."""
        env = dict(extra)
        for src in container.get("envFrom", []):
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                data = self._ref(self.config_maps, "ConfigMap", src["configMapRef"])
            else:
                data = self._ref(self.secrets, "Secret", src["secretRef"])
            env.update({prefix + k: str(v) for k, v in data.items()})
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                if "secretKeyRef" in vf:
                    ref = vf["secretKeyRef"]
                    data = self._ref(self.secrets, "Secret", ref)
                elif "configMapKeyRef" in vf:
                    ref = vf["configMapKeyRef"]
                    data = self._ref(self.config_maps, "ConfigMap", ref)
                elif "fieldRef" in vf:
                    env[e["name"]] = _field(vf["fieldRef"]["fieldPath"], pod)
                    continue
                else:
                    raise ContainersError(f"unsupported valueFrom in {e['name']}: {sorted(vf)}")
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise ContainersError(f"{e['name']}: key {ref['key']!r} missing from {ref['name']!r}")
                env[e["name"]] = str(data[ref["key"]])
            else:
                env[e["name"]] = ""
        return env

    def aliases(self, labels: dict[str, str]) -> list[str]:
        """The Services whose selector picks a pod with these labels (their names resolve to it)."""
        out = []
        for s in self.services:
            sel = s["spec"].get("selector") or {}
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                out.append(s["metadata"]["name"])
        return out


def _field(path: str, pod: dict) -> str:
    m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
    if m:
        return pod["labels"].get(m.group(1), "")
    m = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)
    if m:
        return pod.get("annotations", {}).get(m.group(1), "")
    fields = {"metadata.name": pod["name"], "metadata.namespace": chart_render.NAMESPACE,
              "spec.nodeName": socket.gethostname(), "spec.serviceAccountName": pod.get("serviceAccount", "")}
    if path in fields:
        return fields[path]
    raise ContainersError(f"unsupported fieldRef {path!r}")


def _probe(container: dict) -> Probe | None:
    p = container.get("readinessProbe") or container.get("startupProbe")
    if not p:
        return None
    ports = {cp.get("name"): cp["containerPort"] for cp in container.get("ports", [])}

    def port(v) -> int:
        return int(v) if str(v).isdigit() else ports[v]
    if "httpGet" in p:
        return Probe("http", port(p["httpGet"]["port"]), p["httpGet"].get("path", "/"))
    if "tcpSocket" in p:
        return Probe("tcp", port(p["tcpSocket"]["port"]))
    if "exec" in p:
        return Probe("exec", command=list(p["exec"]["command"]))
    return None


def _pod_runtime(spec: ContainerSpec, pod_spec: dict, container: dict) -> None:
    """Security context, volumes and shared memory of the pod, applied to ``spec``."""
    psc, csc = pod_spec.get("securityContext") or {}, container.get("securityContext") or {}
    uid, gid = csc.get("runAsUser", psc.get("runAsUser")), csc.get("runAsGroup", psc.get("runAsGroup"))
    if uid is not None:
        spec.user = f"{uid}:{gid if gid is not None else uid}"
    spec.read_only = bool(csc.get("readOnlyRootFilesystem"))
    spec.cap_drop = list((csc.get("capabilities") or {}).get("drop", []))
    spec.no_new_privileges = csc.get("allowPrivilegeEscalation") is False
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        vol = volumes.get(m["name"], {})
        if "emptyDir" not in vol:
            continue      # the tiny CPU profile mounts nothing else; weights come with the image's package
        size = (vol["emptyDir"] or {}).get("sizeLimit")
        if m["mountPath"] == "/dev/shm":
            spec.shm_size = str(_bytes(size)) if size else "64m"
            continue
        opts = ["ro" if m.get("readOnly") else "rw", "exec", "mode=1777"] + ([f"size={_bytes(size)}"] if size else [])
        spec.tmpfs.append(f"{m['mountPath']}:{','.join(opts)}")


def _image(component: str) -> str:
    return images.ref(IMAGE_OF.get(component, component))


def plan(manifests: Manifests, api_port: int, redis_port: int) -> list[ContainerSpec]:
    """Every container of the stack, in start order."""
    out: list[ContainerSpec] = []
    for d in manifests.of_kind("Deployment"):
        tpl = d["spec"]["template"]
        (container,) = [c for c in tpl["spec"]["containers"]]
        component = container["name"]
        if component in SKIPPED:
            continue
        name = d["metadata"]["name"]
        pod = {"name": name, "labels": tpl["metadata"].get("labels", {})}
        role = component if component in ("redis", "kafka") else "service"
        spec = ContainerSpec(name, _image(component), role, aliases=manifests.aliases(pod["labels"]),
                             readiness=_probe(container))
        _pod_runtime(spec, tpl["spec"], container)
        if component == "kafka":
            # Tansu in place of Apache Kafka: its own command line (the image's), none of Kafka's variables.
            spec.args = ["--listener-url", "tcp://0.0.0.0:9092", "--advertised-listener-url",
                         f"tcp://{name}:9092", "--storage-engine", "memory://tansu/"]
            spec.user = ""
        else:
            spec.env = manifests.resolve_env(container, pod, {})
            if container.get("command"):
                spec.entrypoint = list(container["command"])
            spec.args = [expand(a, spec.env) for a in container.get("args", [])]
        if component == "session-api":
            spec.publish.append(f"{LOOPBACK}:{api_port}:{container['ports'][0]['containerPort']}")
        if component == "redis":
            spec.publish.append(f"{LOOPBACK}:{redis_port}:{container['ports'][0]['containerPort']}")
        out.append(spec)
    for job in manifests.of_kind("Job"):
        if "topics" not in job["metadata"]["name"]:
            continue
        (container,) = job["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
        code = ("import sys; from infra import topics; from services.common.kafka import ensure_topics; "
                "print('created', ensure_topics(sys.argv[1], topics.all_topics()))")
        out.append(ContainerSpec(job["metadata"]["name"], images.ref("session-api"), "topics",
                                 entrypoint=["python", "-c", code], args=[env["BOOTSTRAP"]]))
    for lws in manifests.of_kind("LeaderWorkerSet"):
        out += lane_groups(manifests, lws)
    return sorted(out, key=lambda s: ORDER.index(s.role))


def lane_groups(manifests: Manifests, lws: dict) -> list[ContainerSpec]:
    """One container per rank of each group of a LeaderWorkerSet, with LeaderWorkerSet's variables."""
    name = lws["metadata"]["name"]
    lwt = lws["spec"]["leaderWorkerTemplate"]
    size = int(lwt["size"])
    out = []
    for g in range(int(lws["spec"].get("replicas", 1))):
        leader = f"{name}-{g}"
        for w in range(size):
            role_tpl = lwt["leaderTemplate"] if w == 0 and "leaderTemplate" in lwt else lwt["workerTemplate"]
            (container,) = role_tpl["spec"]["containers"]
            cname = leader if w == 0 else f"{leader}-{w}"
            labels = {**role_tpl["metadata"].get("labels", {}), "leaderworkerset.sigs.k8s.io/name": name,
                      "leaderworkerset.sigs.k8s.io/group-index": str(g),
                      "leaderworkerset.sigs.k8s.io/worker-index": str(w)}
            lws_env = {"LWS_LEADER_ADDRESS": leader, "LWS_GROUP_SIZE": str(size), "LWS_WORKER_INDEX": str(w),
                       "LWS_NAME": name}
            spec = ContainerSpec(cname, _image(container["name"]), "lane", readiness=_probe(container),
                                 group=leader)
            spec.env = manifests.resolve_env(container, {"name": cname, "labels": labels}, lws_env)
            if container.get("command"):
                spec.entrypoint = list(container["command"])
            spec.args = [expand(a, spec.env) for a in container.get("args", [])]
            _pod_runtime(spec, role_tpl["spec"], container)
            out.append(spec)
    return out


def render_manifests(values: dict | None = None) -> Manifests:
    """The chart rendered for the tiny CPU profile (plus ``values``)."""
    return Manifests(chart_render.render_scenario(SCENARIO, values))


# -------------------------------------------------------------------------------------------- podman


def podman(*args: str, check: bool = True, timeout: float | None = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], env=images.podman_env(), text=True, capture_output=True, timeout=timeout)
    if check and r.returncode != 0:
        raise ContainersError(f"podman {' '.join(args[:3])} ... failed: {r.stderr.strip()[-2000:]}")
    return r


def run_argv(spec: ContainerSpec, network: str) -> list[str]:
    argv = ["run", "-d", "--name", spec.name, "--hostname", spec.name, "--network", network,
            "--label", f"{LABEL}={STACK}", "--label", f"io.liveavatar.role={spec.role}",
            "--log-driver", "k8s-file"]
    if spec.group:
        argv += ["--label", f"io.liveavatar.group={spec.group}"]
    for alias in spec.aliases:
        if alias != spec.name:
            argv += ["--network-alias", alias]
    for p in spec.publish:
        argv += ["-p", p]
    for k, v in spec.env.items():
        argv += ["-e", f"{k}={v}"]
    for t in spec.tmpfs:
        argv += ["--tmpfs", t]
    if spec.shm_size:
        argv += ["--shm-size", spec.shm_size]
    if spec.user:
        argv += ["--user", spec.user]
    if spec.read_only:
        argv += ["--read-only"]
    for cap in spec.cap_drop:
        argv += ["--cap-drop", cap]
    if spec.no_new_privileges:
        argv += ["--security-opt", "no-new-privileges"]
    if spec.entrypoint is not None:
        argv += ["--entrypoint", json.dumps(spec.entrypoint)]
    argv.append(spec.image)
    argv += spec.args
    return argv


def start(spec: ContainerSpec, network: str) -> None:
    podman("rm", "-f", "-t", "0", spec.name, check=False)
    podman(*run_argv(spec, network))


def container_ip(name: str, network: str) -> str:
    r = podman("inspect", "--format", f"{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}", name,
               check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def ready(spec: ContainerSpec, network: str) -> bool:
    """The chart's readiness probe of the container, from the host."""
    probe = spec.readiness
    if probe is None:
        return running(spec.name)
    if probe.kind == "exec":
        return podman("exec", spec.name, *probe.command, check=False, timeout=10).returncode == 0
    ip = container_ip(spec.name, network)
    if not ip:
        return False
    if probe.kind == "tcp":
        try:
            with socket.create_connection((ip, probe.port), timeout=2):
                return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(f"http://{ip}:{probe.port}{probe.path}", timeout=3) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def states() -> dict[str, dict]:
    """Container name -> {state, role, group} of every container of the stack."""
    r = podman("ps", "-a", "--filter", f"label={LABEL}={STACK}", "--format", "json")   # raises if podman fails
    out = {}
    for c in json.loads(r.stdout or "[]"):
        labels = c.get("Labels") or {}
        out[c["Names"][0]] = {"state": c["State"], "role": labels.get("io.liveavatar.role", ""),
                              "group": labels.get("io.liveavatar.group", ""), "exit": c.get("ExitCode")}
    return out


def running(name: str) -> bool:
    return states().get(name, {}).get("state") == "running"


# --------------------------------------------------------------------------------------------- state


@dataclass
class StackState:
    network: str
    api_port: int
    redis_port: int
    containers: list[dict]
    watcher_pid: int = 0

    def specs(self) -> list[ContainerSpec]:
        out = []
        for c in self.containers:
            c = dict(c)
            probe = c.pop("readiness")
            out.append(ContainerSpec(**c, readiness=Probe(**probe) if probe else None))
        return out

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.redis_port}/0"


def load_state(folder: Path | None = None) -> StackState | None:
    f = (folder or state_dir()) / STATE_FILE
    return StackState(**json.loads(f.read_text())) if f.exists() else None


def save_state(st: StackState, folder: Path | None = None) -> None:
    folder = folder or state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(st), indent=2))
    tmp.replace(folder / STATE_FILE)


# -------------------------------------------------------------------------------------------- up/down


def _logs_tail(name: str, n: int = 30) -> str:
    r = podman("logs", "--tail", str(n), name, check=False)
    return (r.stdout + r.stderr).strip()


def _wait(specs: list[ContainerSpec], network: str, deadline: float, log, restarts: bool) -> None:
    """Until every container is ready (the topic job: exited 0). Without a watcher (``restarts`` False)
    a container that exits is an error at once; with one, it is restarted and waited for."""
    pending = list(specs)
    while pending:
        st = states()
        for s in list(pending):
            info = st.get(s.name, {})
            if s.role == "topics":
                if info.get("state") == "exited":
                    if info.get("exit") != 0:
                        raise ContainersError(f"{s.name} failed:\n{_logs_tail(s.name)}")
                    pending.remove(s)
                continue
            if info.get("state") == "exited" and not restarts:
                raise ContainersError(f"{s.name} exited ({info.get('exit')}):\n{_logs_tail(s.name)}")
            if ready(s, network):
                log(f"containers: {s.name} ready")
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {s.name}\n{_logs_tail(s.name, 10)}" for s in pending)
            raise ContainersError(f"not ready in time: {[s.name for s in pending]}\n{tails}")
        time.sleep(1)


def up(api_port: int = 0, timeout_s: float = 900.0, log=print) -> StackState:
    """Start the stack (idempotent: a running stack is returned as is)."""
    current = load_state()
    if current is not None and current.watcher_pid and pid_alive(current.watcher_pid):
        return current
    manifests = render_manifests()
    api_port = api_port or int(os.environ.get("LIVEAVATAR_API_PORT", "0")) or free_port()
    redis_port = free_port()
    specs = plan(manifests, api_port, redis_port)
    missing = sorted({s.image for s in specs if not images.image_exists(s.image)})
    if missing:
        raise ContainersError(f"images missing: {', '.join(missing)}; build them with `make images`")
    down(log=lambda _m: None)              # leftovers of a crashed run
    podman("network", "create", "--label", f"{LABEL}={STACK}", NETWORK)
    st = StackState(NETWORK, api_port, redis_port, [asdict(s) for s in specs])
    save_state(st)
    deadline = time.monotonic() + timeout_s
    try:
        for role in ORDER:
            group = [s for s in specs if s.role == role]
            for s in group:
                log(f"containers: starting {s.name} ({s.image})")
                start(s, NETWORK)
            if role in ("redis", "kafka", "topics"):       # what the services need before they start
                _wait(group, NETWORK, deadline, log, restarts=False)
        # From here on the watcher keeps the stack (a service that exits while it starts is restarted,
        # as the kubelet would), and up waits for every readiness probe.
        with open(state_dir() / "watch.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "infra.containers.stack", "watch"], cwd=images.REPO,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=images.podman_env())
        st.watcher_pid = proc.pid
        save_state(st)
        _wait([s for s in specs if s.role in ("service", "lane")], NETWORK, deadline, log, restarts=True)
    except BaseException:
        down(log=log)
        raise
    return st


def down(log=print) -> list[str]:
    """Stop the watcher, remove every container of the stack and its network. Leaves nothing behind."""
    st = load_state()
    if st is not None and st.watcher_pid and pid_alive(st.watcher_pid):
        os.kill(st.watcher_pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pid_alive(st.watcher_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(st.watcher_pid):
            stop_pid(st.watcher_pid, 2)
    names = sorted(states())
    if names:
        log(f"containers: removing {' '.join(names)}")
        podman("rm", "-f", "-v", "-t", "10", *names, check=False, timeout=300)
    if podman("network", "exists", NETWORK, check=False).returncode == 0:
        podman("network", "rm", "-f", NETWORK, check=False)
    (state_dir() / STATE_FILE).unlink(missing_ok=True)
    return names


def status() -> list[dict]:
    st = load_state()
    if st is None:
        return []
    cur = states()
    rows = []
    for s in st.specs():
        info = cur.get(s.name, {})
        rows.append({"name": s.name, "state": info.get("state", "missing"),
                     "ready": info.get("state") == "running" and ready(s, st.network)
                     if s.role != "topics" else info.get("exit") == 0})
    return rows


# --------------------------------------------------------------------------------------------- watch


def watch(poll_s: float = 1.0) -> int:
    """Keep the stack as the chart declares it until SIGTERM: restart what exits, recreate lane groups."""
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    st = load_state()
    if st is None:
        print("watch: no stack state", file=sys.stderr)
        return 1
    specs = {s.name: s for s in st.specs()}
    groups: dict[str, list[ContainerSpec]] = {}
    for s in specs.values():
        if s.group:
            groups.setdefault(s.group, []).append(s)
    generation = dict.fromkeys(groups, 1)
    while not stop["now"]:
        try:
            cur = states()
        except (ContainersError, subprocess.TimeoutExpired) as exc:   # never act on a listing that failed
            print(f"watch: listing the containers failed: {exc}", flush=True)
            time.sleep(poll_s)
            continue
        for name, s in specs.items():
            if s.role == "topics" or s.group:
                continue
            if cur.get(name, {}).get("state") in ("exited", "stopped", "created"):
                print(f"watch: {name} exited ({cur[name].get('exit')}): starting it again", flush=True)
                podman("start", name, check=False)
        for group, members in groups.items():
            down_ = [m.name for m in members if cur.get(m.name, {}).get("state") != "running"]
            if down_ and not stop["now"]:
                generation[group] += 1
                what = ", ".join(f"{n} ({cur.get(n, {}).get('state', 'missing')}, exit {cur.get(n, {}).get('exit')})"
                                 for n in down_)
                print(f"watch: lane group {group}: {what}: recreating the whole group "
                      f"(generation {generation[group]})", flush=True)
                for n in down_:
                    if n in cur:
                        print(f"watch: last lines of {n}:\n{_logs_tail(n, 5)}", flush=True)
                podman("rm", "-f", "-v", "-t", "5", *[m.name for m in members], check=False)
                for m in members:
                    try:
                        start(m, st.network)
                    except ContainersError as exc:
                        print(f"watch: {exc}", flush=True)
        time.sleep(poll_s)
    print("watch: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.containers.stack", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start the stack")
    u.add_argument("--api-port", type=int, default=0)
    u.add_argument("--timeout", type=float, default=900.0)
    sub.add_parser("down", help="remove every container of the stack")
    sub.add_parser("status", help="one line per container")
    sub.add_parser("watch", help="(started by up) restart what exits, recreate lane groups")
    args = p.parse_args(argv)
    if args.cmd in ("up", "down", "status") and images.missing_tools():
        print(f"containers: missing {' '.join(images.missing_tools())}; run `make images` as root to install them",
              file=sys.stderr)
        return 2

    def log(m):
        print(m, file=sys.stderr, flush=True)
    try:
        if args.cmd == "up":
            st = up(args.api_port, args.timeout, log=log)
            print(f"session API {st.api_url}")
            print(f"redis {st.redis_url}  (liveavatar tenants create NAME --redis-url {st.redis_url})")
            return 0
        if args.cmd == "down":
            names = down(log=log)
            print(f"removed {len(names)} containers" if names else "nothing running")
            return 0
        if args.cmd == "status":
            rows = status()
            for r in rows:
                print(f"{r['name']:<36} {r['state']:<10} {'ready' if r['ready'] else 'NOT READY'}")
            return 0 if rows and all(r["ready"] for r in rows) else 1
        return watch()
    except ContainersError as exc:
        print(f"containers: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
