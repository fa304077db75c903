"""`moecap-collect sweep --engine sglang` where SGLang is not installed (the main venv): the matrix and
the command line refuse bad input in one line, a sweep whose engine cannot start records every point
`failed` with the reason in a real sweep.json, and a point's options are exactly those `run --engine
sglang` parses from the point's command line. The engine itself (a stand-in for `sglang.Engine` over
SGLang's real classes) is exercised in tests/engines_sglang/test_sweep_sglang.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moecap.collect.sweep import build_spec, expand
from moecap.collect.sweep.sglang_session import point_run_args, point_run_argv

ROOT = Path(__file__).resolve().parents[3]
QWEN = "analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json"
CLI = [sys.executable, "-c", "from moecap.collect.cli import main; main()"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
NO_SGLANG = importlib.util.find_spec("sglang") is None


def _sweep(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [*CLI, "sweep", "--engine", "sglang", "--model", QWEN, "--random-weights", "--dtype", "bf16",
            "--task", "synthetic:1024x128", "--waves", "2", "--out", str(out), "--no-table", *extra]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)


@pytest.mark.skipif(not NO_SGLANG, reason="SGLang is installed here: the engine would start")
def test_without_sglang_every_point_fails_once_with_the_reason_and_a_rerun_tries_again(tmp_path):
    out = tmp_path / "sweep"
    proc = _sweep(out, "--batch-sizes", "1,2,4", "--engine-args", "--mem-fraction-static 0.8")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"moecap-collect: error: 3 point(s) failed; reasons in {out / 'sweep.json'}"
    )
    state = json.loads((out / "sweep.json").read_text())
    assert state["schema"] == "moecap.sweep/1"
    points = state["points"].values()
    assert sorted(p["point"]["batch_size"] for p in points) == [1, 2, 4]
    for p in points:
        assert p["status"] == "failed" and len(p["attempts"]) == 1
        assert p["reason"] == "engine start failed: SGLang is not installed (pip install 'moecap[sglang]')"
        assert p["point"]["config"]["engine"] == "sglang"
        assert p["point"]["num_prompts"] == 2 * p["point"]["batch_size"]
    assert not list(out.glob("*.arrow"))
    # A re-run records them again (a failed point is never "recorded"): a second attempt each.
    again = _sweep(out, "--batch-sizes", "1,2,4", "--engine-args", "--mem-fraction-static 0.8")
    assert again.returncode == 2
    state = json.loads((out / "sweep.json").read_text())
    assert [len(p["attempts"]) for p in state["points"].values()] == [2, 2, 2]
    ids = [a["run_id"] for p in state["points"].values() for a in p["attempts"]]
    assert len(set(ids)) == 6  # a new run id per attempt


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-sizes", "1,128", "--engine-args", "--max-running-requests 128"],
         "the command line: engine_args '--max-running-requests 128': SGLang's --max-running-requests is each "
         "point's batch size (the sweep sets it, as `run --batch-size` does); leave it out"),
        (["--batch-sizes", "1,x"], "the command line: batch_sizes: expected an integer, got 'x'"),
        (["--batch-sizes", "1", "--engine-args", "--cuda-graph-max-bs {bs}"],
         "only {batch_size} may appear in braces"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_records_nothing(tmp_path, extra, message):
    out = tmp_path / "sweep"
    proc = _sweep(out, *extra)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moecap-collect: error: ") and message in lines[0], lines
    assert not out.exists()


def _points(**spec):
    base = {"engines": ["sglang"], "models": [QWEN], "random_weights": True, "dtype": "bf16",
            "tasks": ["synthetic:1024x128"], "batch_sizes": [1, 8], "waves": 2}  # fmt: skip
    return expand(build_spec({**base, **spec}))


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"max_new_tokens": 16, "seed": 7, "counts": False, "cuda_graphs": "off", "max_batch_tokens": 512,
         "tokenizer": "tok/", "dataset_path": "/data/gsm8k", "tasks": ["gsm8k:64x16"], "ignore_eos": False},
    ],
)  # fmt: skip
def test_a_points_options_are_what_run_parses_from_its_command_line(tmp_path, monkeypatch, spec):
    """The sweep builds a point's options from `point_run_args`; `run` builds them from the command line
    `point_run_argv` prints (kept in sweep.json). Both go to the same `SglangEngine.run_options`: the
    options must be equal field by field, and say what the point says."""
    from typer.testing import CliRunner

    from moecap.collect import cli
    from moecap.collect.engines.sglang import runner as sglang_run
    from moecap.collect.errors import CollectError

    cli._register()
    seen: list[sglang_run.SglangRunOptions] = []

    def capture(self, options, **_):
        seen.append(options)
        raise CollectError("captured")

    monkeypatch.setattr(sglang_run.SglangEngine, "run", capture)
    for p in _points(**spec):
        run_id = f"20261206T000000Z-sglang-{p.slug}-abcd"
        argv = point_run_argv(p.config, p, run_id, tmp_path)
        assert argv[:2] == ["moecap-collect", "run"]
        res = CliRunner().invoke(cli.app, argv[1:])
        assert isinstance(res.exception, CollectError) and str(res.exception) == "captured", res.output
        ours = sglang_run.SglangEngine().run_options(point_run_args(p.config, p, run_id, tmp_path))
        assert dataclasses.asdict(seen[-1]) == dataclasses.asdict(ours)
        assert (ours.batch_size, ours.num_prompts, ours.dataset, ours.run_id) == (
            p.batch_size, 2 * p.batch_size, p.task, run_id,
        )  # fmt: skip
        assert (ours.max_new_tokens, ours.ignore_eos, ours.counts) == (
            p.max_new_tokens, p.ignore_eos, p.config.counts,
        )  # fmt: skip
        c = p.config
        assert (ours.model, ours.random_weights, ours.dtype, ours.seed, ours.tokenizer, ours.cuda_graphs) == (
            c.model, c.random_weights, c.dtype, c.seed, c.tokenizer, c.cuda_graphs,
        )  # fmt: skip
        assert (ours.max_batch_tokens, ours.dataset_path) == (p.max_batch_tokens, p.dataset_path)
        assert ours.warmup is None and ours.trace  # run's default warm-up (one batch), tracing on
    assert len(seen) == 2


def test_the_printed_command_quotes_engine_args_as_one_argument(tmp_path):
    (p,) = _points(batch_sizes=[4], engine_args=["--mem-fraction-static 0.8 --context-length 2048"])
    line = shlex.join(point_run_argv(p.config, p, "r", tmp_path))
    assert "--engine-args '--mem-fraction-static 0.8 --context-length 2048'" in line
    assert shlex.split(line)[-4:] == ["--run-id", "r", "--out", str(tmp_path)]


def _script_sweep_args(script: str) -> list[str]:
    """The `moecap-collect sweep …` arguments of a GPU script's `sweep()` function (python3 stubbed)."""
    body = Path(ROOT, script).read_text()
    func = body[body.index("sweep() {") : body.index("\n}\n", body.index("sweep() {")) + 3]
    shell = "python3() { printf '%s\\n' \"$@\"; }\n" + func.replace("exec python3", "python3")
    shell += "PREFIX=h100 WORK=/work-dir\nsweep\n"
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True).stdout
    args = out.splitlines()
    return args[args.index("sweep") + 1 :]


@pytest.mark.skipif(not NO_SGLANG, reason="SGLang is installed here: the engine would start")
def test_the_gpu_script_sweeps_the_vllm_twins_matrix_on_sglang(tmp_path):
    """benchmarks/gpu/sweep_sglang.sh records the points sweep_vllm.sh records (same model, weights, dtype,
    task, concurrencies, waves), with SGLang's flags; its arguments pass the real `sweep` command."""
    ours, vllm = (
        _script_sweep_args("benchmarks/gpu/sweep_sglang.sh"),
        _script_sweep_args("benchmarks/gpu/sweep_vllm.sh"),
    )

    def opt(args: list[str], name: str) -> str:
        return args[args.index(name) + 1]

    for name in ("--model", "--dtype", "--task", "--batch-sizes", "--waves"):
        assert opt(ours, name) == opt(vllm, name), name
    assert "--random-weights" in ours and opt(ours, "--engine") == "sglang"
    assert opt(ours, "--engine-args") == "--mem-fraction-static 0.8 --context-length 2048"
    assert opt(ours, "--name") == "h100-sglang-sweep" and opt(ours, "--out") == "/work-dir/sweep"
    args = list(ours)
    args[args.index("--out") + 1] = str(tmp_path / "sweep")
    proc = subprocess.run([*CLI, "sweep", *args, "--no-table"], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # no SGLang here: every point failed
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"].values()
    got = sorted((p["point"]["batch_size"], p["point"]["num_prompts"]) for p in points)
    assert got == [(c, 2 * c) for c in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert {p["point"]["config"]["engine_args"] for p in points} == {
        "--mem-fraction-static 0.8 --context-length 2048"
    }
