"""`moecap-collect run --engine hf` end to end on a CPU, in subprocesses (exit codes and stderr as users see them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moecap.schemas import open_traces, read_trace_file

TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=200,
    max_position_embeddings=512,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    mlp_only_layers=[1],
)
CLI = [sys.executable, "-c", "from moecap.collect.cli import main; main()"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


DENSE = {k: v for k, v in TINY.items() if "expert" not in k and k != "mlp_only_layers"}


def _config_dir(tmp_path: Path, model_type: str = "qwen2_moe", **kw) -> Path:
    from transformers import AutoConfig

    path = tmp_path / f"tiny-{model_type}"
    base = TINY if model_type == "qwen2_moe" else DENSE
    AutoConfig.for_model(model_type, **{**base, **kw}).save_pretrained(path)
    return path


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def _one_run(out: Path):
    traces = open_traces([out])
    assert not traces.errors, traces.errors
    (run,) = traces.runs.values()
    return run


def test_random_weights_run_writes_a_valid_trace(tmp_path):
    model_dir = _config_dir(tmp_path)
    out = tmp_path / "out"
    proc = _cli(
        "--engine", "hf", "--model", str(model_dir), "--random-weights", "--dataset", "synthetic:24x6",
        "--num-prompts", "5", "--batch-size", "2", "--ignore-eos", "--seed", "3", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = _one_run(out)
    kinds = sorted(f.table_kind for f in run.files)
    assert kinds == ["experts", "outputs", "requests", "steps"]
    assert all(f.complete and f.rows_dropped == 0 for f in run.files)
    meta = run.metadata
    assert (meta.engine.name, meta.engine.args["mode"]) == ("hf", "continuous_batching")
    assert meta.model.random_weights is True
    assert meta.model.config["model_type"] == "qwen2_moe" and meta.model.config["num_experts"] == 8
    assert (meta.moe.layer_ids, meta.moe.num_experts, meta.moe.top_k) == ([0, 2], 8, 2)
    assert meta.moe.counts_available is True
    assert meta.model.kv_bytes_per_token_per_layer == [2 * 2 * 8 * 4] * 3  # K+V, 2 heads x 8, fp32
    assert meta.workload["dataset"] == "synthetic:24x6" and meta.workload["batch_size"] == 2
    assert meta.gpus == []  # a CPU run

    steps = run.tables("steps")[0].table.to_pylist()
    experts = {r["step"]: r["counts"] for r in run.tables("experts")[0].table.to_pylist()}
    requests = {r["req_id"]: r for r in run.tables("requests")[0].table.to_pylist()}
    outputs = run.tables("outputs")[0].table.to_pylist()
    assert len(requests) == len(outputs) == 5
    # The count invariant on every step: per MoE layer, Σ counts = scheduled tokens x top-k.
    assert set(experts) == {s["step"] for s in steps}
    for s in steps:
        per_layer = np.asarray(experts[s["step"]]).reshape(2, 8).sum(axis=1)
        assert (per_layer == s["num_tokens"] * 2).all()
        assert s["num_tokens"] == sum(s["req_new_tokens"]) and s["num_reqs"] <= 2
    # Every request: its tokens across steps = prompt + output - 1; times are ordered.
    for rid, r in requests.items():
        computed = sum(s["req_new_tokens"][s["req_ids"].index(rid)] for s in steps if rid in s["req_ids"])
        assert (r["prompt_tokens"], r["output_tokens"]) == (24, 6)
        assert computed == 24 + 6 - 1
        assert r["arrival_ns"] <= r["first_token_ns"] <= r["finish_ns"]
        assert len(r["chunk_times_ns"]) == 6 and r["finish_reason"] == "length"
    assert all(len(json.loads(o["output"])) == 6 and o["prompt"] == "<24 token ids>" for o in outputs)


def test_checkpoint_directory_loads_the_saved_weights(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from moecap.collect.datasets import load_samples

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2_moe", **TINY)).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "Qwen2MoeTopKRouter":
                m.weight.normal_()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    out = tmp_path / "out"
    proc = _cli(
        "--engine", "hf", "--model", str(ckpt), "--dtype", "fp32", "--dataset", "synthetic:10x5",
        "--num-prompts", "2", "--batch-size", "1", "--ignore-eos", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = _one_run(out)
    assert run.metadata.model.random_weights is False
    got = {o["sample_id"]: json.loads(o["output"]) for o in run.tables("outputs")[0].table.to_pylist()}

    # The same prompts through the saved model, one at a time, in-process.
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    gen = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(max_requests_per_batch=1, num_blocks=8, block_size=32, max_batch_tokens=256)
    for sample in load_samples("synthetic:10x5", 2, seed=0, vocab_size=200):
        (res,) = reloaded.generate_batch([sample.prompt_token_ids], generation_config=gen,
                                         continuous_batching_config=cb, warmup=False).values()  # fmt: skip
        assert got[sample.sample_id] == res.generated_tokens


def test_dense_model_writes_steps_and_no_experts_file(tmp_path):
    model_dir = _config_dir(tmp_path, "llama", num_hidden_layers=2)
    out = tmp_path / "out"
    proc = _cli(
        "--engine", "hf", "--model", str(model_dir / "config.json"), "--random-weights",
        "--dataset", "synthetic:8x3", "--num-prompts", "2", "--batch-size", "2", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = _one_run(out)
    assert sorted(f.table_kind for f in run.files) == ["outputs", "requests", "steps"]
    assert run.metadata.moe.counts_available is False
    assert "'llama' has no MoE layers" in run.metadata.moe.counts_unavailable_reason
    assert run.tables("steps")[0].num_rows > 0


def _assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unwritable_out_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = _cli(
        "--engine", "hf", "--model", "whatever.json", "--random-weights", "--dataset", "synthetic:8x2",
        "--num-prompts", "1", "--batch-size", "1", "--out", str(blocker / "sub"),
    )  # fmt: skip
    _assert_one_line_error(proc, 2, "--out", "not a writable directory")


def test_unknown_model_type_is_a_one_line_error_naming_it(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "foo_moe", "num_experts": 8}))
    proc = _cli(
        "--engine", "hf", "--model", str(config), "--random-weights", "--dataset", "synthetic:8x2",
        "--num-prompts", "1", "--batch-size", "1", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    _assert_one_line_error(proc, 2, "unknown model type 'foo_moe'")


def test_hub_name_with_random_weights_asks_for_a_config_path(tmp_path):
    proc = _cli(
        "--engine", "hf", "--model", "no-such-org/no-such-model", "--random-weights", "--dataset",
        "synthetic:8x2", "--num-prompts", "1", "--batch-size", "1", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    _assert_one_line_error(proc, 2, "cannot resolve it offline", "config.json")


def _start_long_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    model_dir = _config_dir(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*CLI, "run", "--engine", "hf", "--model", str(model_dir), "--random-weights",
         "--dataset", "synthetic:16x64", "--num-prompts", "400", "--batch-size", "4", "--ignore-eos",
         "--no-progress", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    # Wait until the steps file holds at least one flushed record batch (the writer flushes every 1 s).
    # Its size says nothing since the writer puts the schema and run metadata in at open: read it.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        files = list(out.glob("*.steps.arrow"))
        if files and _flushed_rows(files[0]) > 0:
            return proc, out
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the run produced no flushed steps batch: {proc.communicate()[1][-2000:]}")


def _flushed_rows(path: Path) -> int:
    try:
        return read_trace_file(path).num_rows  # a file still being written reads as truncated
    except Exception:
        return 0


@pytest.mark.slow
def test_ctrl_c_closes_the_files_and_exits_non_zero_with_one_line(tmp_path):
    proc, out = _start_long_run(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    _assert_one_line_error(subprocess.CompletedProcess([], proc.returncode, "", stderr), 130, "interrupted")
    run = _one_run(out)
    steps = run.tables("steps")[0]
    assert steps.complete and steps.num_rows > 0
    assert run.tables("experts")[0].num_rows == steps.num_rows


@pytest.mark.slow
def test_kill_9_leaves_every_flushed_batch_readable(tmp_path):
    proc, out = _start_long_run(tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    (steps_file,) = out.glob("*.steps.arrow")
    steps = read_trace_file(steps_file)
    assert steps.num_rows > 0 and not steps.complete
    assert steps.run.moe.layer_ids == [0, 2]
