"""`moecap-collect serve` binds the engine's server to loopback unless the user names a host.

The command line is built by the real CLI and the real `serve_argv` of each engine; only the step that
would start the engine (and check that it is installed) is replaced, so no engine is launched."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moecap.collect import cli
from moecap.collect.engines.sglang import runner as sglang_run
from moecap.collect.engines.vllm import runner as vllm_run


@pytest.fixture
def built(monkeypatch):
    """Run `moecap-collect serve …` in-process; returns the server command line it would start."""
    seen: dict[str, list[str]] = {}

    def vllm_serve(model, args, **kwargs):
        seen["argv"] = vllm_run.serve_argv(model, args)

    def sglang_serve(model, args, **kwargs):
        seen["argv"] = sglang_run.serve_argv(model, args)
        return 0

    monkeypatch.setattr(vllm_run, "serve_command", vllm_serve)
    monkeypatch.setattr(sglang_run, "serve_command", sglang_serve)
    cli._register()

    def run(*args: str) -> list[str]:
        seen.clear()
        result = CliRunner().invoke(cli.app, ["serve", *args])
        assert result.exit_code == 0, result.output
        return seen["argv"]

    return run


def _host(argv: list[str]) -> list[str]:
    """Every host the command line names (`--host X` or `--host=X`)."""
    hosts = [argv[i + 1] for i, a in enumerate(argv) if a == "--host"]
    return hosts + [a.split("=", 1)[1] for a in argv if a.startswith("--host=")]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_serve_binds_loopback_by_default(built, engine, tmp_path):
    argv = built("--engine", engine, "--out", str(tmp_path), "org/model", "--max-num-seqs", "8")
    assert _host(argv) == ["127.0.0.1"]
    assert "--max-num-seqs" in argv and "org/model" in argv  # the user's own flags still reach the engine


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("flag", [["--host", "0.0.0.0"], ["--host=0.0.0.0"]])
def test_a_host_given_by_the_user_wins(built, engine, flag, tmp_path):
    argv = built("--engine", engine, "--out", str(tmp_path), "org/model", *flag)
    assert _host(argv) == ["0.0.0.0"]


def test_serve_help_says_how_to_expose_the_server():
    cli._register()
    result = CliRunner().invoke(cli.app, ["serve", "--help"])
    assert "127.0.0.1" in result.output and "--host 0.0.0.0" in result.output
