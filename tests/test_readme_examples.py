"""Every README and `--help` example that can run on a CPU runs as written; the others are named here.

The examples run in a scratch folder whose `traces/` holds links to five of the shipped runs and the
sample batch_data.json (so what they write stays out of the checkout), through the installed console
scripts when they belong to this interpreter (CI's fresh venv), else through the same entry points in
this interpreter. Each must exit 0 without a traceback and write what it says it writes.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import readme_commands
import typer.main
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]

#: Examples that cannot run in the test suite, by prefix, and why.
NOT_ON_CPU = {
    "pip install": "an install step (the wheel-install CI jobs, .ci/wheel-jobs.sh, run it in fresh venvs)",
    "moecap-collect serve": "starts a vLLM / SGLang server on a GPU",
    "moecap-collect run --engine sglang": "SGLang needs a GPU",
    "moecap-collect run --engine vllm": "vLLM needs a GPU",
    "moecap-collect import-sglang-dump": "needs SGLang expert-distribution dumps (.pt) of a GPU run",
    "moecap-collect drive --api-url": "needs a running server (tests/collect/driver drives a real one)",
    "moecap-collect import-moecap outputs/": "needs a MoE-CAP output folder (tests/collect cover the importer)",
    "moecap-collect sweep --engine vllm": "vLLM needs a GPU",
    "moecap-collect sweep --config sweep.yaml": "names a user's matrix file",
    "moecap-analyze shell": "interactive",
    "moecap-analyze whatif traces/h100/": "names a user's folders of H100 / H200 sweeps",
    "moecap-analyze whatif run.arrow": "names a user's run, sweep and twin",
    "moecap-collect upload": "needs an object store (tests/collect/upload run it against moto on loopback)",
    "moecap-analyze s3://": "needs an object store (tests/analyze/fleet/test_fleet_ray.py: moto on loopback)",
    "moecap-analyze fleet s3://": "needs an object store and a Ray cluster (tests/analyze/fleet/test_fleet_ray.py)",
    'moecap-analyze sql "SELECT * FROM fleet_hourly" s3://': "reads a fleet dataset in an object store "
    "(tests/analyze/fleet/test_fleet_ray.py)",
}
#: Examples run here, by prefix.
ON_CPU = ("moecap-analyze ", "moecap-collect run --engine hf ", "moecap-collect sweep --engine hf ")


@functools.cache
def _help_examples() -> tuple[str, ...]:
    """The `Example` commands of every sub-command's --help, both programs (continuations joined)."""
    from moecap.analyze.cli import _register_commands
    from moecap.analyze.cli import app as analyze_app
    from moecap.collect.cli import _register
    from moecap.collect.cli import app as collect_app

    _register_commands()
    _register()
    found: list[str] = []
    for app in (analyze_app, collect_app):
        group = typer.main.get_command(app)
        names = list(getattr(group, "commands", {})) or [""]
        for name in names:
            args = [name, "--help"] if name else ["--help"]
            out = CliRunner().invoke(app, args, env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).output
            lines = [re.sub(r"^[\s│]+|[\s│]+$", "", line) for line in out.splitlines()]
            pending = ""
            for line in lines:
                line = re.sub(r"^Example[^:]*:\s*", "", line)
                if not (pending or line.startswith(("moecap-analyze ", "moecap-collect "))):
                    continue
                if line.endswith("\\"):
                    pending += line[:-1].strip() + " "
                    continue
                found.append(readme_commands._strip_comment(pending + line))
                pending = ""
    return tuple(found)


def _classify(command: str) -> str:
    if command.startswith(tuple(NOT_ON_CPU)):
        return "skip"
    return "run" if command.startswith(ON_CPU) else "unknown"


def test_every_readme_example_is_run_here_or_named_as_not_runnable():
    examples = readme_commands.examples()
    unknown = [c for c in examples if _classify(c) == "unknown"]
    assert not unknown, f"README examples neither run by this test nor named in NOT_ON_CPU: {unknown}"
    ran = [c for c in examples if _classify(c) == "run"]
    assert sum(c.startswith("moecap-analyze ") for c in ran) >= 5
    assert any("--formula reference" in c for c in ran)
    assert any(c.startswith("moecap-collect run --engine hf --model tiny-") for c in ran)


def test_every_help_example_is_run_here_or_named_as_not_runnable():
    examples = _help_examples()
    assert any(c.startswith("moecap-collect run --engine hf --model tiny-qwen2-moe") for c in examples)
    assert sum(c.startswith("moecap-analyze") for c in examples) >= 3
    unknown = [c for c in examples if _classify(c) == "unknown"]
    assert not unknown, f"--help examples neither run by this test nor named in NOT_ON_CPU: {unknown}"


def test_no_example_offers_a_model_too_big_for_a_cpu():
    """The CPU example of `run --help` and the README once named OLMoE-1B-7B (about 28 GB in fp32)."""
    for command in [*readme_commands.examples(), *_help_examples()]:
        if "--device cpu" in command:
            assert "--model tiny-" in command, command


def _program(name: str, module: str) -> str:
    """Shell text that runs console script `name` of this interpreter."""
    script = Path(sys.executable).parent / name
    if script.is_file() and script.read_text(errors="replace").startswith(f"#!{sys.executable}"):
        return f'"{script}"'
    code = f"import sys; from {module} import main; sys.argv[0] = {name!r}; main()"
    return f'"{sys.executable}" -c "{code}"'


#: The shipped runs the examples read here (all of traces/ takes 12-20 s per report on two cores; the
#: wheel-install CI job runs README command 1 on all of them): one engine-and-driver run per engine and
#: layout, and one workload on two GPUs (what-if has a measured twin).
RUNS = (
    "h100-OLMoE-1B-7B-0924-cb-bs16-syn160x128-n16.",
    "h100-Qwen1.5-MoE-A2.7B-cb-bs16-syn1024x128-n16.",
    "h200-Qwen1.5-MoE-A2.7B-cb-bs16-syn1024x128-n16.",
    "h200-vllm-0.26.0-qwen15moe-graphs.",
    "sglang-serve-1796393507.",
    "moecap-reference",
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder whose traces/ holds links to the shipped files of RUNS and the sample."""
    work = tmp_path_factory.mktemp("examples")
    (work / "traces").mkdir()
    linked = [p for p in (ROOT / "traces").iterdir() if p.name.startswith(RUNS)]
    assert len(linked) >= 4 * (len(RUNS) - 1) + 1, sorted(p.name for p in linked)
    for path in linked:
        (work / "traces" / path.name).symlink_to(path)
    (work / "collect").symlink_to(ROOT / "collect")  # examples may name collect/models/<tiny>/config.json
    return work


def _run(command: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    prelude = (
        f'moecap-analyze() {{ {_program("moecap-analyze", "moecap.analyze.cli")} "$@"; }}\n'
        f'moecap-collect() {{ {_program("moecap-collect", "moecap.collect.cli")} "$@"; }}\n'
    )
    env = {**os.environ, "MOECAP_CACHE_DIR": str(cache), "COLUMNS": "120"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", prelude + command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _runnable() -> list[str]:
    readme = [c for c in readme_commands.examples() if _classify(c) == "run"]
    # README command 1 after its install steps (the wheel-install CI job runs it whole).
    first = readme_commands.setup_commands()[0].split(" && ")[-1]
    assert first.startswith(".venv/bin/moecap-analyze ")
    return [first.removeprefix(".venv/bin/"), *readme]


@pytest.mark.slow
@pytest.mark.parametrize("command", _runnable())
def test_readme_example_runs_as_written(command: str, scratch: Path, tmp_path_factory) -> None:
    cache = tmp_path_factory.getbasetemp() / "examples-cache"
    cache.mkdir(exist_ok=True)
    before = set((scratch / "traces").iterdir())
    r = _run(command, scratch, cache)
    assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    out = re.search(r"--out (\S+)", command)
    if command.startswith("moecap-collect run"):
        new = set((scratch / "traces").iterdir()) - before
        assert len(new) == 4 and all(p.suffix == ".arrow" for p in new), sorted(p.name for p in new)
        for p in new:  # later examples read traces/ again: leave the shipped set as it was
            p.unlink()
    elif out:
        target = scratch / out.group(1)
        assert target.is_dir() and any(target.iterdir()), f"{command} wrote nothing to {target}"
        metrics = target / "metrics.json"
        if metrics.exists():
            assert json.loads(metrics.read_text())["runs"]
        shutil.rmtree(target)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [c for c in _help_examples() if _classify(c) == "run" and c not in _runnable()]
)
def test_help_example_runs_as_written(command: str, scratch: Path, tmp_path_factory) -> None:
    cache = tmp_path_factory.getbasetemp() / "examples-cache"
    cache.mkdir(exist_ok=True)
    before = set((scratch / "traces").iterdir())
    r = _run(command, scratch, cache)
    assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    for p in set((scratch / "traces").iterdir()) - before:
        p.unlink()
    out = re.search(r"--out (\S+)", command)
    if out and (scratch / out.group(1)).exists():
        target = scratch / out.group(1)
        shutil.rmtree(target) if target.is_dir() else target.unlink()
