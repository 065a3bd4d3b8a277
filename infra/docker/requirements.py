"""Print the requirements of the project's core plus some extras, one a line, read from pyproject.toml.

The image builds install dependencies in a layer that only changes with pyproject.toml (the sources come
later). torch is left out with ``--no-torch``: the bases install it first, from the CPU index or a local
wheel, so nothing pulls a multi-GB CUDA build. Extras that name the project itself
(``liveavatar[serve,media]``) are expanded.

    python requirements.py serve,media            # core + serve + media
    python requirements.py serve,media,model --no-torch
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def requirements(pyproject: dict, extras: list[str], torch: bool = True) -> list[str]:
    project = pyproject["project"]
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add_extra(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            add(req)

    def add(req: str) -> None:
        m = re.fullmatch(rf"{re.escape(name)}\[([\w,\s-]+)\]", req.strip())
        if m:
            for extra in m.group(1).split(","):
                add_extra(extra.strip())
            return
        if not torch and re.match(r"torch\b(?![\w-])", req):
            return
        if req not in out:
            out.append(req)

    for req in project["dependencies"]:
        add(req)
    for extra in extras:
        add_extra(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("extras", nargs="?", default="", help="comma-separated extras, e.g. serve,media")
    p.add_argument("--no-torch", action="store_true", help="leave torch out (installed before)")
    p.add_argument("--pyproject", default="pyproject.toml")
    args = p.parse_args(argv)
    data = tomllib.loads(Path(args.pyproject).read_text())
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    print("\n".join(requirements(data, extras, torch=not args.no_torch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
