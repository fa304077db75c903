"""The shipped tiny configs (`--model tiny-qwen2-moe` / `tiny-olmoe`) and the CPU run's psutil guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moecap.collect.models import shipped_config, shipped_names
from moecap.schemas import open_traces

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
SMALL_RUN = (
    "--random-weights", "--dataset", "synthetic:16x4", "--num-prompts", "3", "--batch-size", "2",
    "--ignore-eos", "--device", "cpu", "--no-progress",
)  # fmt: skip


def _cli(*args: str, prelude: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    code = f"{prelude}import sys; sys.argv[0] = 'moecap-collect'; from moecap.collect.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, "run", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )


def test_the_shipped_configs_are_found_by_name():
    assert {"tiny-olmoe", "tiny-qwen2-moe"} <= set(shipped_names())
    for name in shipped_names():
        path = shipped_config(name)
        assert path is not None and path.name == "config.json"
        assert json.loads(path.read_text()) == json.loads(
            (ROOT / "collect" / "models" / name / "config.json").read_text()
        )
    assert shipped_config("tiny-mixtral") is None
    assert shipped_config("config.json") is None


@pytest.mark.parametrize(
    ("name", "model_type", "experts", "top_k"),
    [("tiny-qwen2-moe", "qwen2_moe", 8, 2), ("tiny-olmoe", "olmoe", 16, 4)],
)
def test_the_shipped_configs_are_small_moe_models_of_their_family(name, model_type, experts, top_k):
    """Built on the meta device by transformers itself: the family's classes, a laptop-sized count."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = shipped_config(name)
    config = AutoConfig.from_pretrained(str(config_path.parent))
    assert config.model_type == model_type
    assert (config.num_experts, config.num_experts_per_tok) == (experts, top_k)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    assert 5e5 < params < 2.5e6, params  # 1.0 M and 2.1 M (collect/models/README.md)
    assert params * 4 < 10 * 2**20  # under 10 MiB in fp32: runs anywhere


@pytest.mark.slow
def test_run_by_shipped_name_on_a_cpu(tmp_path):
    out = tmp_path / "out"
    proc = _cli("--engine", "hf", "--model", "tiny-olmoe", *SMALL_RUN, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    traces = open_traces([out])
    assert not traces.errors, traces.errors
    (run,) = traces.runs.values()
    assert run.metadata.model.id == "tiny-olmoe"
    assert run.metadata.model.config["model_type"] == "olmoe"
    requests = run.tables("requests")[0].table.to_pylist()
    assert [(r["prompt_tokens"], r["output_tokens"]) for r in requests] == [(16, 4)] * 3


def test_a_local_path_of_the_same_name_wins(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from moecap.collect.engines.hf.runner import load_model

    mine = tmp_path / "tiny-qwen2-moe"
    mine.mkdir()
    config = json.loads(shipped_config("tiny-qwen2-moe").read_text())
    (mine / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    monkeypatch.chdir(tmp_path)
    loaded = load_model("tiny-qwen2-moe", random_weights=True, device="cpu")
    assert loaded.config["num_hidden_layers"] == 1
    monkeypatch.chdir(ROOT / "docs")  # no such folder here: the shipped config
    assert load_model("tiny-qwen2-moe", random_weights=True, device="cpu").config["num_hidden_layers"] == 2


def test_a_cpu_run_without_psutil_is_one_line_and_writes_nothing(tmp_path):
    """transformers 5.x sizes the CPU KV cache with psutil; without it the run died (or, without
    warm-up, recorded 0 steps and exited 0). `sys.modules['psutil'] = None` is how Python sees a
    package that is not installed: find_spec returns None and the import fails."""
    out = tmp_path / "out"
    for warmup in ("1", "0"):
        proc = _cli(
            "--engine", "hf", "--model", "tiny-qwen2-moe", *SMALL_RUN, "--warmup", warmup, "--out", str(out),
            prelude="import sys; sys.modules['psutil'] = None; ",
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "psutil" in lines[0] and "pip install psutil" in lines[0], proc.stderr
        assert not list(out.glob("*.arrow"))


def test_an_unknown_name_with_random_weights_names_the_shipped_models(tmp_path):
    proc = _cli(
        "--engine", "hf", "--model", "tiny-mixtral", *SMALL_RUN, "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiny-olmoe, tiny-qwen2-moe" in lines[0], proc.stderr
