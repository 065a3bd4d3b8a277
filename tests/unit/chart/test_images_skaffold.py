"""skaffold.yaml, the Dockerfiles and .dockerignore agree with each other and with the chart.

No Docker engine or skaffold binary here: the files are parsed and cross-checked, the profiles' JSON
patches applied, and the chart rendered with skaffold's image values substituted.
"""

from __future__ import annotations

import copy
import fnmatch
import re

import pytest
import yaml

from tests.unit.chart import chartlib as cl

pytestmark = pytest.mark.unit

SKAFFOLD = yaml.safe_load((cl.REPO / "skaffold.yaml").read_text())
#: image -> (service folder, python module, values key) of every deployable service.
SERVICES = {
    "liveavatar/session-api": ("session_api", "services.session_api", "sessionApi"),
    "liveavatar/audio-encoder": ("audio_encoder", "services.audio_encoder", "audioEncoder"),
    "liveavatar/stream-packager": ("stream_packager", "services.stream_packager", "streamPackager"),
    "liveavatar/lane-controller": ("lane_controller", "services.lane_controller", "laneController"),
    "liveavatar/webhooks": ("webhooks", "services.webhooks", "webhooks"),
    "liveavatar/lane": ("lane", "services.lane", "lanes"),
}


def _apply_patches(doc: dict, patches: list[dict]) -> dict:
    """The subset of RFC 6902 JSON patch that skaffold profiles use here: add, replace, remove."""
    doc = copy.deepcopy(doc)
    for patch in patches:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in patch["path"].lstrip("/").split("/")]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) and last != "-" else last
        if patch["op"] == "remove":
            del node[key]
        elif patch["op"] == "replace":
            node[key]  # must exist
            node[key] = patch["value"]
        elif patch["op"] == "add":
            if isinstance(node, list):
                node.append(patch["value"]) if key == "-" else node.insert(key, patch["value"])
            else:
                node[key] = patch["value"]
        else:
            raise AssertionError(f"unsupported patch op {patch['op']}")
    return doc


def _profile(name: str | None) -> dict:
    if name is None:
        return SKAFFOLD
    (profile,) = [p for p in SKAFFOLD["profiles"] if p["name"] == name]
    return _apply_patches(SKAFFOLD, profile.get("patches", []))


def _dockerfile(path: str) -> str:
    return (cl.REPO / path).read_text()


@pytest.mark.parametrize("profile", [None, "gpu", "cpu-tiny"])
def test_every_artifact_builds_from_the_repo_root_with_an_existing_dockerfile(profile):
    cfg = _profile(profile)
    assert re.fullmatch(r"skaffold/v4beta\d+", cfg["apiVersion"])
    artifacts = {a["image"]: a for a in cfg["build"]["artifacts"]}
    assert set(SERVICES) <= set(artifacts)
    for image, art in artifacts.items():
        assert art["context"] == "."
        text = _dockerfile(art["docker"]["dockerfile"])
        for req in art.get("requires", []):
            assert req["image"] in artifacts, f"{image} requires {req['image']}, which is not built"
            assert re.search(rf"^ARG {req['alias']}=", text, re.M), f"{image}: no ARG {req['alias']}"
            assert re.search(rf"^FROM \${{{req['alias']}}}", text, re.M), image
    for image, (folder, module, _) in SERVICES.items():
        assert artifacts[image]["docker"]["dockerfile"] == f"services/{folder}/Dockerfile"
        text = _dockerfile(f"services/{folder}/Dockerfile")
        assert f'ENTRYPOINT ["python", "-m", "{module}"]' in text


def test_cpu_tiny_builds_the_lane_on_the_cpu_base_and_skips_cuda():
    gpu = {a["image"]: a for a in _profile("gpu")["build"]["artifacts"]}
    tiny = {a["image"]: a for a in _profile("cpu-tiny")["build"]["artifacts"]}
    assert gpu["liveavatar/lane"]["requires"][0]["image"] == "liveavatar/cuda-base"
    assert tiny["liveavatar/lane"]["requires"][0]["image"] == "liveavatar/python-torch-base"
    assert "liveavatar/cuda-base" not in tiny
    assert set(tiny) == set(gpu) - {"liveavatar/cuda-base"}


@pytest.mark.parametrize("profile, scenario", [("gpu", "default"), ("cpu-tiny", "tiny-cpu")])
def test_deploy_renders_the_chart_with_skaffold_images(profile, scenario):
    cl.helm()
    (release,) = _profile(profile)["deploy"]["helm"]["releases"]
    assert (cl.REPO / release["chartPath"]) == cl.CHART
    values = {}
    for f in release["valuesFiles"]:
        values = cl.deep_merge(values, yaml.safe_load((cl.REPO / f).read_text()))
    assert values == cl.merged_values(scenario)
    # Substitute the templates the way skaffold does (artifact name with '/' and '-' as '_').
    built = {}
    for key, template in release["setValueTemplates"].items():
        m = re.fullmatch(r"\{\{\.IMAGE_(REPO|TAG)_(\w+)\}\}", template)
        if m is None:
            value = template
        else:
            value = f"kind.local/{m.group(2)}" if m.group(1) == "REPO" else "t123"
            built.setdefault(m.group(2), set()).add(m.group(1))
        node = values
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    artifacts = {a["image"] for a in _profile(profile)["build"]["artifacts"]}
    assert {re.sub(r"[/-]", "_", i) for i in SERVICES} == set(built)
    assert all(parts == {"REPO", "TAG"} for parts in built.values())
    assert set(SERVICES) <= artifacts
    images = {c["name"]: c["image"] for _, _, s in cl.pod_specs(cl.render(values)) for c in s["containers"]}
    for image, (_, _, _) in SERVICES.items():
        component = image.split("/")[1]
        assert images[component] == f"kind.local/{re.sub(r'[/-]', '_', image)}:t123"


def test_dockerfiles_pin_bases_run_as_non_root_and_never_copy_weights():
    files = [f"services/{folder}/Dockerfile" for folder, _, _ in SERVICES.values()]
    files += ["infra/docker/python-base.Dockerfile", "infra/docker/cuda-base.Dockerfile"]
    for path in files:
        text = _dockerfile(path)
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"{path}: last USER must be numeric non-root"
        for m in re.finditer(r"^ARG (\w+_IMAGE)=(\S+)", text, re.M):
            name, ref = m.groups()
            if ref.startswith("liveavatar/"):
                continue  # our own base, passed in by skaffold
            assert ":" in ref and not ref.endswith((":latest", ":3.11", ":slim")), f"{path}: {name} not pinned"
        for m in re.finditer(r"^COPY (?!--from)(.+)$", text, re.M):
            # /models is the weights mount point: nothing may be copied there.
            assert m.group(1).split()[-1].rstrip("/") != "/models", f"{path} copies into /models"
            assert not re.search(r"\.(safetensors|pth|pt|bin|ckpt)\b", m.group(1)), f"{path} copies weights"
    base = _dockerfile("infra/docker/python-base.Dockerfile")
    assert 'torch==${TORCH_VERSION}' in base and "ARG TORCH_VERSION=2.13.0" in base
    assert "pyproject.toml" in base


def _ignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics for the patterns used here (last matching rule wins)."""
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        pattern = pattern.rstrip("/")
        hit = fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or (
            pattern.startswith("**/") and (fnmatch.fnmatch(path, pattern[3:]) or fnmatch.fnmatch(path, pattern[3:] + "/*")))
        if pattern == "**":
            hit = True
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_sources_and_drops_weights_and_local_state():
    rules = [ln.strip() for ln in (cl.REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    for kept in ("pyproject.toml", "README.md", "models/dit.py", "services/common/settings.py",
                 "pipeline_stages/tpp/lane.py", "infra/docker/python-base.Dockerfile"):
        assert not _ignored(kept, rules), kept
    for dropped in (".venv/bin/python", ".git/HEAD", "tests/unit/test_x.py", "charts/liveavatar/values.yaml",
                    "models/weights/Wan2.1_VAE.pth", "models/__pycache__/dit.cpython-311.pyc", ".run/redis.log"):
        assert _ignored(dropped, rules), dropped


#: Images that must carry no torch: they build on the python-base target without the model extra.
TORCH_FREE = ("liveavatar/session-api", "liveavatar/stream-packager", "liveavatar/lane-controller",
              "liveavatar/webhooks")


@pytest.mark.parametrize("profile", [None, "cpu-tiny"])
def test_torch_free_images_build_on_the_serve_target_and_the_lane_on_torch(profile):
    import tomllib

    from infra.docker.requirements import requirements

    artifacts = {a["image"]: a for a in _profile(profile)["build"]["artifacts"]}
    base = _dockerfile("infra/docker/python-base.Dockerfile")
    targets = {alias: src for src, alias in re.findall(r"^FROM (\S+) AS (\S+)$", base, re.M)}
    assert artifacts["liveavatar/python-base"]["docker"]["target"] == "serve"
    assert artifacts["liveavatar/python-torch-base"]["docker"]["target"] == "model"
    for image in TORCH_FREE:
        if image in artifacts:
            assert [r["image"] for r in artifacts[image]["requires"]] == ["liveavatar/python-base"], image
    assert artifacts["liveavatar/audio-encoder"]["requires"][0]["image"] == "liveavatar/python-torch-base"
    # serve <- build-serve <- deps-serve, whose extras hold no torch; model <- build-model <- deps-model (torch).
    serve = base.split("AS serve")[1].split("FROM ")[0]
    assert re.findall(r"^COPY --from=(\S+)", serve, re.M) == ["deps-serve", "build-serve"]
    assert targets["build-serve"] == "deps-serve" and targets["build-model"] == "deps-model"
    serve_extras = re.search(r"requirements\.py (\S+) > ", base.split("AS deps-serve")[1]).group(1).split(",")
    pyproject = tomllib.loads((cl.REPO / "pyproject.toml").read_text())
    assert not [r for r in requirements(pyproject, serve_extras) if re.match(r"torch\b", r)]
    assert [r for r in requirements(pyproject, ["model"]) if re.match(r"torch\b", r)] == ["torch==2.13.0"]


def test_dockerignore_lets_in_the_examples_the_session_api_serves():
    rules = [ln.strip() for ln in (cl.REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    for kept in ("examples/cyclops_baker.wav", "examples/faces/face_812.png", "infra/docker/requirements.py"):
        assert not _ignored(kept, rules), kept
    assert "COPY examples " in _dockerfile("services/session_api/Dockerfile")


def test_the_session_api_image_installs_espeak_ng_for_speak_as_root_then_drops_to_the_user():
    """``POST /v1/sessions/{id}/speak`` runs ``espeak-ng`` (the settings' default backend): the image installs it
    with apt as root, leaves no apt lists in the layer, checks it speaks, and runs the service as the user."""
    from services.session_api.settings import ApiSettings
    from services.session_api.tts import BACKENDS, EspeakNG

    assert ApiSettings().tts_backend == "espeak-ng" and BACKENDS["espeak-ng"] is EspeakNG
    text = _dockerfile("services/session_api/Dockerfile")
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    (install,) = [i for i, ln in enumerate(lines) if ln.startswith("RUN ") and "apt-get install" in ln]
    run = lines[install]
    assert re.search(r"apt-get update .*&& .*apt-get install -y -q --no-install-recommends espeak-ng\b", run), run
    assert "rm -rf /var/lib/apt/lists/*" in run and "espeak-ng --stdout" in run, run
    users = [(i, ln.split()[1]) for i, ln in enumerate(lines) if ln.startswith("USER ")]
    assert [u for i, u in users if i < install][-1] == "root"
    assert [u for i, u in users if i > install] == ["10001:10001"]
    assert lines[-1] == 'ENTRYPOINT ["python", "-m", "services.session_api"]'
    assert EspeakNG().binary == "espeak-ng"               # the program the image installs is the one tts.py runs
