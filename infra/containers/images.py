"""``make images``: build every LiveAvatar image with podman, from the repository's Dockerfiles, no registry.

1. The base: Debian bookworm with Python 3.11, bootstrapped here with ``mmdebstrap`` and imported with
   ``podman import`` as ``localhost/liveavatar-bookworm:<key>`` (once; the key changes with the package
   list). Nothing is pulled from a registry.
2. ``infra/docker/python-base.Dockerfile`` on it, twice: target ``serve`` (no torch) and ``model`` (CPU
   torch from a local wheel folder when one holds the pinned version, else the PyTorch CPU index).
3. Every service image on its base (``services/<svc>/Dockerfile``), and the broker and Redis images of the
   local container stack (``infra/containers/*.Dockerfile``).

Images are tagged ``localhost/liveavatar-<name>:<version>`` (version: pyproject.toml). Podman's layer cache
makes a second run fast. The host's CA bundle is mounted into each build (never copied into an image), so
pip works behind a TLS-intercepting proxy.

    python -m infra.containers.images [--only session-api,lane] [--no-cache]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "infra" / "containers" / "containers.conf"
REGISTRY = "localhost"
PREFIX = "liveavatar-"

#: Debian packages of the bootstrapped base (Python 3.11 is bookworm's python3).
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("LIVEAVATAR_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TORCH_VERSION = "2.13.0"


@dataclass(frozen=True)
class ImageDef:
    name: str                      # localhost/liveavatar-<name>
    dockerfile: str
    base: str | None = None        # name of the ImageDef passed as BASE_IMAGE
    target: str | None = None
    torch: bool = False            # the build needs the torch wheel folder


def image_defs() -> list[ImageDef]:
    """Every image, bases first. The webhooks dispatcher is built when its service exists."""
    defs = [
        ImageDef("python-base", "infra/docker/python-base.Dockerfile", target="serve"),
        ImageDef("python-torch-base", "infra/docker/python-base.Dockerfile", target="model", torch=True),
        ImageDef("session-api", "services/session_api/Dockerfile", base="python-base"),
        ImageDef("stream-packager", "services/stream_packager/Dockerfile", base="python-base"),
        ImageDef("lane-controller", "services/lane_controller/Dockerfile", base="python-base"),
        ImageDef("audio-encoder", "services/audio_encoder/Dockerfile", base="python-torch-base"),
        ImageDef("lane", "services/lane/Dockerfile", base="python-torch-base"),
        ImageDef("broker", "infra/containers/broker.Dockerfile"),
        ImageDef("redis", "infra/containers/redis.Dockerfile"),
    ]
    if (REPO / "services" / "webhooks" / "Dockerfile").exists():
        defs.insert(5, ImageDef("webhooks", "services/webhooks/Dockerfile", base="python-base"))
    return defs


def version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def ref(name: str, tag: str | None = None) -> str:
    return f"{REGISTRY}/{PREFIX}{name}:{tag or version()}"


def podman_env() -> dict[str, str]:
    """The environment for every podman call: the repository's containers.conf unless one is set."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, check: bool = True, capture: bool = False, timeout: float | None = None
           ) -> subprocess.CompletedProcess:
    """Run podman; its output goes to our stderr unless captured (stdout stays for reports)."""
    return subprocess.run(["podman", *args], env=podman_env(), check=check, text=True, timeout=timeout,
                          stdout=subprocess.PIPE if capture else sys.stderr,
                          stderr=subprocess.PIPE if capture else None)


def missing_tools() -> list[str]:
    need = ["podman", "buildah", "mmdebstrap", "runc"]
    return [t for t in need if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]


def image_exists(reference: str) -> bool:
    return podman("image", "exists", reference, check=False).returncode == 0


def image_size(reference: str) -> int:
    out = podman("image", "inspect", "--format", "{{.Size}}", reference, capture=True).stdout
    return int(out.strip())


# -------------------------------------------------------------------------------------------- the base


def base_ref() -> str:
    key = hashlib.sha1(json.dumps([DEBIAN_SUITE, sorted(BASE_PACKAGES)]).encode()).hexdigest()[:10]
    return f"{REGISTRY}/{PREFIX}{DEBIAN_SUITE}:{key}"


def ensure_base(log=print) -> tuple[str, float]:
    """The bootstrapped Debian base (built once); returns its reference and the seconds spent."""
    reference = base_ref()
    if image_exists(reference):
        return reference, 0.0
    t0 = time.monotonic()
    log(f"images: bootstrapping {reference} with mmdebstrap ({DEBIAN_SUITE}, {DEBIAN_MIRROR})")
    with tempfile.TemporaryDirectory(prefix="liveavatar-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        # mmdebstrap leaves no apt lists behind: a build that needs packages runs apt-get update first.
        subprocess.run(["mmdebstrap", "--quiet", "--variant=apt", f"--include={','.join(BASE_PACKAGES)}",
                        DEBIAN_SUITE, str(tar), DEBIAN_MIRROR], check=True)
        podman("import", "--change", 'CMD ["/bin/bash"]', str(tar), reference, capture=True)
    return reference, time.monotonic() - t0


# ------------------------------------------------------------------------------------------- the builds


def torch_wheel_dir() -> Path | None:
    """A folder holding the pinned CPU torch wheel (``$LIVEAVATAR_TORCH_WHEELS``, default /opt/wheels)."""
    folder = Path(os.environ.get("LIVEAVATAR_TORCH_WHEELS", "/opt/wheels"))
    if any(folder.glob(f"torch-{TORCH_VERSION}+cpu-cp311-*.whl")):
        return folder
    return None


def build_argv(d: ImageDef, base: str, no_cache: bool = False) -> list[str]:
    argv = ["build", "--layers", "-f", d.dockerfile, "-t", ref(d.name), "--build-arg", f"PYTHON_IMAGE={base}"]
    if d.base:
        argv += ["--build-arg", f"BASE_IMAGE={ref(d.base)}"]
    if d.target:
        argv += ["--target", d.target]
    if HOST_CA_BUNDLE.exists():   # pip and apt behind a TLS-intercepting proxy; never copied into a layer
        argv += ["-v", f"{HOST_CA_BUNDLE}:/etc/ssl/certs/ca-certificates.crt:ro"]
    wheels = torch_wheel_dir() if d.torch else None
    if wheels is not None:
        argv += ["-v", f"{wheels}:/wheels:ro", "--build-arg", "TORCH_FIND_LINKS=/wheels"]
    if no_cache:
        argv.append("--no-cache")
    argv.append(str(REPO))
    return argv


def build(names: list[str] | None = None, no_cache: bool = False, log=print) -> dict[str, dict]:
    """Build the images (all, or ``names`` and the bases they need); returns name -> {ref, seconds, bytes}."""
    defs = image_defs()
    by_name = {d.name: d for d in defs}
    wanted = set(names or by_name)
    unknown = wanted - set(by_name)
    if unknown:
        raise SystemExit(f"unknown image(s) {sorted(unknown)}; known: {sorted(by_name)}")
    for n in list(wanted):
        if by_name[n].base:
            wanted.add(by_name[n].base)
    base, base_s = ensure_base(log)
    report = {"base": {"ref": base, "seconds": round(base_s, 1), "bytes": image_size(base)}}
    for d in defs:
        if d.name not in wanted:
            continue
        log(f"images: building {ref(d.name)} ({d.dockerfile}{', target ' + d.target if d.target else ''})")
        t0 = time.monotonic()
        r = podman(*build_argv(d, base, no_cache), check=False)
        if r.returncode != 0:
            raise SystemExit(f"images: building {d.name} failed (podman build exited {r.returncode})")
        report[d.name] = {"ref": ref(d.name), "seconds": round(time.monotonic() - t0, 1),
                          "bytes": image_size(ref(d.name))}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.containers.images", description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated image names (their bases are built too)")
    p.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"images: missing {' '.join(missing)}; `make images` installs them when run as root "
              "(infra/containers/install.sh)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    report = build([n for n in args.only.split(",") if n] or None, args.no_cache,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    total = time.monotonic() - t0
    if args.json:
        print(json.dumps({"seconds": round(total, 1), "images": report}, indent=2))
        return 0
    print(f"{'image':<52} {'size':>9} {'build':>8}")
    for _, r in report.items():
        print(f"{r['ref']:<52} {r['bytes'] / 1e6:>7.0f}MB {r['seconds']:>7.1f}s")
    print(f"total {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
