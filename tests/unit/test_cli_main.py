"""The ``liveavatar`` parser (services/cli/main.py): --version, the shared stack flags, help and examples,
and the tenant-name rule. No servers: nothing here starts a broker or Redis."""

from __future__ import annotations

import argparse
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from services.cli import main as cli
from services.session_api.tenants import TENANT_NAME, check_tenant_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

#: The stack verbs: every one takes --run-dir and --json from the same parent parsers.
STACK_VERBS = [["up"], ["status"], ["down"], ["infra", "up"], ["infra", "status"], ["infra", "down"],
               ["tenants", "create", "acme"]]


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (command path, parser) below ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"liveavatar {metadata.version('liveavatar')}"


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert cli.package_version() == PYPROJECT_VERSION


@pytest.mark.parametrize("verb", STACK_VERBS, ids=" ".join)
def test_stack_verbs_share_run_dir_and_json(verb, tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args([*verb, "--run-dir", str(tmp_path), "--json"])
    assert args.run_dir == tmp_path and args.json is True
    defaults = parser.parse_args(verb)
    assert defaults.run_dir is None and defaults.json is False


@pytest.mark.parametrize("verb", STACK_VERBS, ids=" ".join)
def test_the_shared_flags_have_one_help_text(verb):
    """The flags come from the parent parsers, so their help is word for word the same everywhere."""
    parser = cli.build_parser()
    subs = dict(_subparsers(parser))
    # the tenant name is a positional of "tenants create", not part of the command path
    target = subs[tuple(verb[:2]) if verb[0] in ("infra", "tenants") else tuple(verb[:1])]
    helps = {a.dest: a.help for a in target._actions}
    reference = {a.dest: a.help for p in (cli._run_dir_parent(), cli._json_parent()) for a in p._actions}
    assert helps["run_dir"] == reference["run_dir"] and helps["json"] == reference["json"]


def test_every_option_has_help_and_every_command_an_example():
    parser = cli.build_parser()
    commands = list(_subparsers(parser))
    assert {p[0] for p, _ in commands} >= {"demo", "up", "status", "down", "infra", "tenants", "generate",
                                          "inspect", "train", "eval"}
    for path, sub in [((), parser), *commands]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"liveavatar {' '.join(path)}: {action.option_strings or action.dest} has no help"
        assert sub.epilog and sub.epilog.startswith("example:") and "liveavatar" in sub.epilog, path


def test_help_names_no_internal_issue_numbers(capsys):
    parser = cli.build_parser()
    for path, sub in [((), parser), *_subparsers(parser)]:
        text = sub.format_help().lower()
        assert "issue " not in text and "not built" not in text, path


def test_examples_in_help_point_at_files_that_exist():
    for path in (cli.EXAMPLE_IMAGE, cli.EXAMPLE_AUDIO):
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("name", ["demo", "acme", "a", "Team_1.prod-eu", "x" * 64])
def test_valid_tenant_names_are_kept_as_they_are(name):
    assert check_tenant_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "bad name", "-flag", ".hidden", "a:b", "a/b", "café", "ü", "name\n"])
def test_invalid_tenant_names_are_rejected(name):
    with pytest.raises(ValueError, match="invalid tenant name"):
        check_tenant_name(name)
    # independent statement of the rule
    ok = 1 <= len(name) <= 64 and name[0].isascii() and name[0].isalnum() and \
        all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
    assert not ok and TENANT_NAME.fullmatch(name) is None


def test_a_bad_tenant_name_is_one_error_line_before_any_connection(capsys, tmp_path):
    # no stack runs in tmp_path and the Redis URL is unroutable: the name check must come first
    rc = cli.main(["tenants", "create", "bad name", "--run-dir", str(tmp_path), "--redis-url", "redis://192.0.2.1:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: invalid tenant name 'bad name'"), err


def test_tenants_create_without_a_stack_says_how_to_start_one(capsys, tmp_path):
    rc = cli.main(["tenants", "create", "acme", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "liveavatar up" in err[0], err


@pytest.mark.parametrize("argv", [["up", "--lanes", "0"], ["tenants", "create", "acme", "--max-sessions", "0"]])
def test_counts_below_one_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_status_of_an_empty_run_dir_is_nothing_running_and_exit_1(capsys, tmp_path):
    assert cli.main(["status", "--run-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.strip() == f"nothing running in {tmp_path.resolve()}"
    assert cli.main(["infra", "status", "--run-dir", str(tmp_path), "--json"]) == 1
    import json

    assert json.loads(capsys.readouterr().out) == {"run_dir": str(tmp_path.resolve()), "ready": False, "parts": []}
