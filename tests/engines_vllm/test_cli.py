"""`moecap-collect serve --engine vllm` and the vLLM branch of `run`: arguments to vLLM, environment to
its processes, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moecap.collect.engines.vllm import adapter
from moecap.collect.engines.vllm import runner as vllm_run

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="checks the message a host without vLLM gets")
def test_serve_without_vllm_is_one_clear_line(tmp_path):
    code = "import sys; sys.argv = ['moecap-collect', *sys.argv[1:]]; from moecap.collect.cli import main; main()"
    out = subprocess.run(
        [sys.executable, "-c", code, "serve", "--engine", "vllm", "--out", str(tmp_path), "some/model"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "moecap-collect: error: vLLM is not installed (pip install 'moecap[vllm]')"
    ]


def test_tracing_env_turns_the_plugin_on_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    env = vllm_run.tracing_env(
        tmp_path, "run-1", counts=False, model_id="m/x", workload={"dataset": "gsm8k"}, strict=True
    )
    assert env[adapter.ENV_TRACE_DIR] == str(tmp_path.resolve())
    assert env[adapter.ENV_RUN_ID] == "run-1" and env[adapter.ENV_COUNTS] == "0"
    assert json.loads(env[adapter.ENV_WORKLOAD]) == {"dataset": "gsm8k"}
    assert env[adapter.ENV_STRICT] == "1"
    assert env["VLLM_PLUGINS"] == "other,moecap"  # an allow-list would otherwise skip the tracer
    monkeypatch.delenv("VLLM_PLUGINS")
    assert "VLLM_PLUGINS" not in vllm_run.tracing_env(
        tmp_path, "r", counts=True, model_id="m", workload={}, strict=False
    )


def test_model_ids_and_directories(tmp_path):
    from moecap.collect.engines import offline

    cfg = tmp_path / "Qwen__Qwen1.5-MoE-A2.7B.json"
    cfg.write_text(json.dumps({"model_type": "qwen2_moe"}))
    assert offline.model_id_of(str(cfg)) == "Qwen/Qwen1.5-MoE-A2.7B"
    assert offline.model_id_of("org/name") == "org/name"
    folder = offline.model_dir(str(cfg), True, tmp_path / "scratch")
    assert json.loads((tmp_path / "scratch" / "config.json").read_text()) == {"model_type": "qwen2_moe"}
    assert folder == str(tmp_path / "scratch")
    from moecap.collect.errors import CollectError

    with pytest.raises(CollectError, match="--random-weights"):
        offline.model_dir(str(cfg), False, tmp_path / "s2")
    with pytest.raises(CollectError, match=r"without config\.json"):
        offline.model_dir(str(tmp_path / "scratch" / ".."), True, tmp_path / "s3")


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM")
def test_serve_execs_vllms_openai_server_with_tracing_on(tmp_path):
    from typer.testing import CliRunner

    from moecap.collect import cli

    seen = {}

    def fake_exec(file, argv, env):
        seen.update(file=file, argv=argv, env=env)

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 8}))
    original = vllm_run.serve_command

    def serve_command(*args, **kwargs):
        return original(*args, exec_fn=fake_exec, **kwargs)

    vllm_run.serve_command = serve_command
    try:
        cli._register()
        result = CliRunner().invoke(
            cli.app,
            ["serve", "--engine", "vllm", "--out", str(tmp_path / "t"), "--run-id", "r1", "--random-weights", str(cfg),
             "--max-num-seqs", "8", "--skip-tokenizer-init"],
        )  # fmt: skip
    finally:
        vllm_run.serve_command = original
    assert result.exit_code == 0, result.output
    argv = seen["argv"]
    assert argv[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    assert argv[5:] == ["--max-num-seqs", "8", "--skip-tokenizer-init", "--host", "127.0.0.1",
                        "--load-format", "dummy", "--served-model-name", "tiny"]  # fmt: skip
    assert json.loads(Path(argv[4], "config.json").read_text())["num_experts"] == 8
    env = seen["env"]
    assert env[adapter.ENV_TRACE_DIR] == str((tmp_path / "t").resolve()) and env[adapter.ENV_RUN_ID] == "r1"
    assert importlib.util.find_spec("vllm.entrypoints.cli.main") is not None


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM's argument parser")
def test_vllm_engine_flags_parse_with_vllms_own_parser():
    got = vllm_run.vllm_argv(
        ["--tensor-parallel-size", "2", "--enable-expert-parallel", "--max-num-seqs", "32"]
    )
    assert got == {"tensor_parallel_size": 2, "enable_expert_parallel": True, "max_num_seqs": 32}
    from moecap.collect.errors import CollectError

    with pytest.raises(CollectError, match="cannot parse"):
        vllm_run.vllm_argv(["--no-such-flag"])


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM")
def test_run_checks_before_starting_anything(tmp_path, monkeypatch):
    from moecap.collect.engines.vllm import compat as vllm_compat
    from moecap.collect.errors import CollectError

    monkeypatch.setattr(vllm_compat, "installed_version", lambda: "0.40.0")
    options = vllm_run.VllmRunOptions(
        model="m", dataset="synthetic:8x2", num_prompts=1, batch_size=1, out=str(tmp_path), strict_engine=True
    )
    with pytest.raises(CollectError, match="outside"):
        vllm_run.run(options)
    assert vllm_run.plugin_installed()
