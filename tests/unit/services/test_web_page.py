"""The web page's integration section: every command it shows runs something that exists.

The page (``services/session_api/static/index.html``) fills its examples in at run time (the browser tests
check that they carry the API's address and the session); here the templates themselves are read: the
scripts and example files they name exist in the repository, the API paths they call are routes of the
API, and the page's own controls call the same routes (speak box, WebRTC player).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.session_api.routes import ROUTERS
from services.session_api.routes.site import STATIC, example_file

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
HTML = (STATIC / "index.html").read_text()


def _examples() -> dict[str, str]:
    """The page's EXAMPLES templates, by name."""
    body = HTML.split("const EXAMPLES = {", 1)[1].split("\n  };", 1)[0]
    return dict(re.findall(r"^    (\w+): \([^)]*\) => `(.*?)`,?$", body, re.S | re.M))


def _api_paths() -> set[str]:
    return {r.path for router in ROUTERS for r in router.routes}


def test_the_page_shows_each_integration_path_with_a_runnable_example():
    examples = _examples()
    assert set(examples) == {"python", "speak", "webrtc", "pipecat"}
    for name in examples:
        assert f'data-example="{name}"' in HTML, name                  # each has its place on the page
    assert "LiveKit" in HTML and "design only" in HTML
    scripts = {s for text in examples.values() for s in re.findall(r"clients/python/examples/[\w]+\.py", text)}
    assert scripts == {f"clients/python/examples/{n}.py" for n in ("stream_wav", "webrtc_receive", "pipecat_wav")}
    for script in scripts:
        assert (REPO / script).is_file(), script
    for text in examples.values():
        for path in re.findall(r"\bexamples/((?:faces/)?\w+\.(?:png|wav))", text):
            assert example_file(path) is not None, path
        for extra in re.findall(r'pip install "?\./clients/python(?:\[(\w+)\])?', text):
            if extra:
                assert f"{extra} = [" in (REPO / "clients/python/pyproject.toml").read_text(), extra


def test_the_pages_examples_and_controls_call_routes_the_api_has():
    paths = _api_paths()
    used = set(re.findall(r"/v1/sessions/(?:\$SID|\$\{(?:state\.)?sid\}|\" \+ SID \+ \")(/\w+)", HTML))
    assert {"/speak", "/webrtc", "/audio", "/media", "/interrupt"} <= used, used
    for tail in used:
        assert f"/v1/sessions/{{sid}}{tail}" in paths, tail
    # the speak box posts JSON {text, voice}; the player posts {type: "offer", sdp}
    assert re.search(r"const body = \{ text: \$\(\"speak-text\"\)\.value \};", HTML)
    assert 'JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp })' in HTML
    # its error hints cover the speak route's documented refusals
    for status in (503, 429, 413, 422):
        assert re.search(rf"^\s+{status}: \"", HTML, re.M), status
