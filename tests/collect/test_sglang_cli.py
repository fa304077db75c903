"""`moecap-collect serve|run --engine sglang` where SGLang is not installed (the main venv): one clear line,
before anything starts; the options parse as for vLLM."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HAS_SGLANG = importlib.util.find_spec("sglang") is not None
CLI = "import sys; sys.argv = ['moecap-collect', *sys.argv[1:]]; from moecap.collect.cli import main; main()"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True)


@pytest.mark.skipif(HAS_SGLANG, reason="checks the message a host without SGLang gets")
@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--engine", "sglang", "--out", "{out}", "some/model", "--tp-size", "2"),
        ("run", "--engine", "sglang", "--model", "m", "--dataset", "synthetic:8x2", "--num-prompts", "1",
         "--batch-size", "1", "--out", "{out}"),
    ],
)  # fmt: skip
def test_without_sglang_serve_and_run_say_so_in_one_line(tmp_path, args):
    out = _cli(*[a.format(out=tmp_path / "t") for a in args])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "moecap-collect: error: SGLang is not installed (pip install 'moecap[sglang]')"
    ]


def test_the_engine_choice_lists_sglang():
    flat = lambda text: " ".join(text.replace("│", " ").split())  # noqa: E731 - rich wraps the message
    out = _cli("serve", "--engine", "nope", "--out", "x", "m")
    assert out.returncode == 2 and "'vllm', 'sglang'" in flat(out.stderr)
    out = _cli("run", "--engine", "nope", "--model", "m", "--dataset", "d", "--num-prompts", "1",
               "--batch-size", "1", "--out", "x")  # fmt: skip
    assert out.returncode == 2 and "'hf', 'vllm', 'sglang'" in flat(out.stderr)


@pytest.mark.parametrize(
    ("engine", "extra", "line"),
    [
        ("hf", ["--engine-args", "--tp-size 2", "--strict-engine"],
         "--engine-args, --strict-engine do not apply to --engine hf"),
        ("sglang", ["--mode", "generate"], "--mode does not apply to --engine sglang"),
        ("vllm", ["--num-blocks", "8", "--device", "cpu"], "--device, --num-blocks do not apply to --engine vllm"),
    ],
)  # fmt: skip
def test_options_of_other_engines_are_refused_in_one_line(tmp_path, engine, extra, line):
    out = _cli("run", "--engine", engine, "--model", "m", "--dataset", "synthetic:8x2", "--num-prompts", "1",
               "--batch-size", "1", "--out", str(tmp_path / "t"), *extra)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"moecap-collect: error: {line}"]
    assert not (tmp_path / "t").exists(), "refused before anything is created"


def test_the_old_flag_name_still_works_and_must_agree(tmp_path):
    out = _cli("run", "--engine", "vllm", "--model", "m", "--dataset", "synthetic:8x2", "--num-prompts", "1",
               "--batch-size", "1", "--out", str(tmp_path / "t"), "--max-tokens", "4", "--max-new-tokens", "5")  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "moecap-collect: error: --max-tokens and --max-new-tokens (its old name) disagree: pass one"
    ]


@pytest.mark.skipif(HAS_SGLANG, reason="a refused preflight needs a host without SGLang")
def test_a_refused_serve_leaves_no_scratch_folder_behind(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    args = ["serve", "--engine", "sglang", "--out", str(tmp_path / "t"), "some/model"]
    out = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "SGLang is not installed" in out.stderr
    assert sorted(p.name for p in scratch.iterdir()) == []
