"""One flag name per concept across both programs' commands, and `run --engine X --help` lists only the
options X takes (the options an engine refuses are not shown to its users).

The commands are the real typer apps, walked as click commands; the help is rendered by the real CLI."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from moecap.analyze import cli as analyze_cli
from moecap.collect import cli as collect_cli

# The one visible name of each concept that has (had) several, and its older spellings, still accepted
# but hidden.
ONE_NAME = {
    "--max-tokens": ["--max-new-tokens"],
    "--slo-ttft-ms": ["--ttft-slo-ms"],
    "--slo-tpot-ms": ["--tpot-slo-ms"],
    "--warmup": ["--no-warmup"],
}


def _commands() -> dict[str, object]:
    collect_cli._register()
    analyze_cli._register_commands()
    out = {}
    for prog, app in (("moecap-collect", collect_cli.app), ("moecap-analyze", analyze_cli.app)):
        group = typer.main.get_command(app)
        for name, cmd in group.commands.items():
            out[f"{prog} {name}"] = cmd
    return out


def _options(cmd) -> tuple[set[str], set[str]]:
    """(visible, hidden) option spellings of a click command."""
    visible, hidden = set(), set()
    for p in cmd.params:
        names = [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
        (hidden if getattr(p, "hidden", False) else visible).update(n for n in names if n.startswith("--"))
    return visible, hidden


def test_old_spellings_are_hidden_wherever_they_are_accepted():
    commands = _commands()
    for where, cmd in commands.items():
        visible, _ = _options(cmd)
        for name, old in ONE_NAME.items():
            shown = visible & set(old)
            assert not shown, f"{where} shows {sorted(shown)}; the one name is {name}"
    # the output budget has one name in every command that sets it
    for where in ("moecap-collect run", "moecap-collect drive", "moecap-collect sweep"):
        assert "--max-tokens" in _options(commands[where])[0], where
    assert "--slo-ttft-ms" in _options(commands["moecap-collect drive"])[0]


@pytest.mark.parametrize(
    ("argv", "old", "new"),
    [
        (["sweep", "--max-new-tokens", "4", "--max-tokens", "5"], "--max-new-tokens", "--max-tokens"),
        (["drive", "--ttft-slo-ms", "4", "--slo-ttft-ms", "5"], "--ttft-slo-ms", "--slo-ttft-ms"),
    ],
)
def test_an_old_spelling_that_disagrees_with_the_new_one_is_one_line(tmp_path, argv, old, new):
    collect_cli._register()
    base = {"sweep": ["--out", str(tmp_path / "s"), "--engine", "hf"],
            "drive": ["--api-url", "http://127.0.0.1:9", "--dataset", "synthetic:4x2"]}[argv[0]]  # fmt: skip
    result = CliRunner().invoke(collect_cli.app, [argv[0], *base, *argv[1:]])
    assert result.exit_code != 0
    assert (
        isinstance(result.exception, Exception)
        and old in str(result.exception)
        and new in str(result.exception)
    )


def _help_flags(*args: str) -> set[str]:
    collect_cli._register()
    result = CliRunner().invoke(collect_cli.app, ["run", *args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.output.split("Options", 1)[1]))


# What only some engines take (hand-listed from the engines' docs; the rest every engine takes).
HF_ONLY = {"--mode", "--device", "--num-blocks", "--attn-implementation"}
SERVED_ONLY = {"--trace", "--no-trace", "--engine-args", "--strict-engine"}
NOT_SGLANG = {"--block-size"}


@pytest.mark.parametrize(
    ("engine", "absent", "present"),
    [
        ("vllm", HF_ONLY, SERVED_ONLY | NOT_SGLANG),
        ("sglang", HF_ONLY | NOT_SGLANG, SERVED_ONLY),
        ("hf", SERVED_ONLY, HF_ONLY | NOT_SGLANG),
    ],
)
def test_run_help_for_one_engine_shows_only_its_options(engine, absent, present):
    shown = _help_flags("--engine", engine)
    assert not shown & absent, sorted(shown & absent)
    assert present <= shown, sorted(present - shown)
    assert {"--model", "--dataset", "--max-tokens", "--warmup", "--batch-size"} <= shown
    assert _help_flags(f"--engine={engine}") == shown


def test_run_help_without_an_engine_shows_every_option_by_group():
    shown = _help_flags()
    assert shown >= HF_ONLY | SERVED_ONLY | NOT_SGLANG
    assert not shown & {"--max-new-tokens", "--no-warmup"}
