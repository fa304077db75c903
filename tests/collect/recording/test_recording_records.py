"""MoE-CAP per-pass records (vLLM and SGLang shapes) -> steps rows, with the reference values kept."""

from __future__ import annotations

import json

import pytest

from moecap.collect.errors import CollectError
from moecap.collect.recording import gpus_from_records, records_to_steps, write_reference_steps
from moecap.schemas import EngineInfo, ModelInfo, RunMetadata, read_trace_file

VLLM = [
    {  # a chunked prompt: first chunk of r1 (prefix unknown on vLLM), last chunk of r2
        "batch_size": 2,
        "latency": 0.050,
        "seq_lens_sum": 3000,
        "forward_mode": "prefill",
        "expert_activation": 40.5,
        "gpu_num": 1,
        "gpu_raw_type": "NVIDIA-A100-SXM4-80GB",
        "scheduled_tokens": 3000,
        "per_req_info": [
            {
                "req_id": "r1",
                "extend_len": 2048,
                "total_len": 4096,
                "prompt_len": 4096,
                "is_last_chunk": False,
            },
            {"req_id": "r2", "extend_len": 952, "total_len": 1000, "prompt_len": 1000, "is_last_chunk": True},
        ],
    },
    {
        "batch_size": 2,
        "latency": 0.012,
        "seq_lens_sum": 2,
        "forward_mode": "decode",
        "req_ids": ["r2", "r3"],
        "expert_activation": 20.0,
        "gpu_num": 1,
        "gpu_raw_type": "NVIDIA-A100-SXM4-80GB",
        "scheduled_tokens": 2,
    },
    {
        "batch_size": 0,
        "latency": 0.001,
        "seq_lens_sum": 0,
        "forward_mode": "unknown",
        "expert_activation": 0,
        "gpu_num": 1,
    },
]

SGLANG = [
    {
        "forward_pass_id": 11,
        "batch_size": 1,
        "latency": 0.03,
        "seq_lens_sum": 600,
        "forward_mode": "prefill",
        "expert_activation": 50.0,
        "gpu_num": 2,
        "gpu_raw_type": "NVIDIA-H100-HBM3-80GB",
        "per_req_info": [
            {
                "req_pool_idx": 3,
                "req_id": "3_0",
                "extend_len": 100,
                "total_len": 600,
                "is_last_chunk": True,
                "orig_len": 600,
            }
        ],
    },
    {
        "forward_pass_id": 12,
        "batch_size": 3,
        "latency": 0.01,
        "seq_lens_sum": 1800,
        "forward_mode": "decode",
        "expert_activation": 30.0,
        "gpu_num": 2,
        "gpu_raw_type": "NVIDIA-H100-HBM3-80GB",
    },
    # the detailed-results form carries the pass time as ttft / tpot
    {
        "forward_mode": "decoding",
        "batch_size": 3,
        "tpot": 0.02,
        "seq_lens_sum": 1803,
        "expert_activation": -1,
    },
]


def test_vllm_records():
    rows, ref = records_to_steps(VLLM, anchor_ns=1_000)
    p, d, idle = rows
    assert [r["step"] for r in rows] == [0, 1, 2]
    # laid end to end from the anchor; gpu span = the synchronised latency
    assert (p["t_start_ns"], p["t_end_ns"], d["t_start_ns"], d["t_end_ns"]) == (
        1_000,
        50_001_000,
        50_001_000,
        62_001_000,
    )
    assert (p["gpu_start_ns"], p["gpu_end_ns"]) == (p["t_start_ns"], p["t_end_ns"])
    assert (p["phase"], p["num_reqs"], p["num_tokens"]) == ("prefill", 2, 3000)
    assert p["req_ids"] == ["r1", "r2"] and p["req_new_tokens"] == [2048, 952]
    assert p["req_prefix_lens"] == [None, 48]  # vLLM's total_len is the prompt: exact only for a last chunk
    assert p["req_num_logits"] == [0, 1]
    assert (d["phase"], d["req_ids"], d["req_new_tokens"], d["req_num_logits"]) == (
        "decode",
        ["r2", "r3"],
        [1, 1],
        [1, 1],
    )
    assert d["req_prefix_lens"] == [None, None]
    assert (idle["phase"], idle["num_reqs"], idle["req_ids"]) == ("idle", 0, [])
    cols = ref["columns"]
    assert cols["latency"] == [0.05, 0.012, 0.001]
    assert cols["expert_activation"] == [40.5, 20.0, 0.0]
    assert cols["seq_lens_sum"] == [3000.0, 2.0, 0.0]
    assert cols["forward_mode"] == ["prefill", "decode", "unknown"]
    assert "forward_pass_id" not in cols  # none of the records had one
    assert (ref["gpu_num"], ref["gpu_raw_type"]) == (1, "NVIDIA-A100-SXM4-80GB")


def test_sglang_records():
    rows, ref = records_to_steps(SGLANG, anchor_ns=0)
    p, d, dd = rows
    assert p["req_ids"] == ["3_0"] and p["req_prefix_lens"] == [500] and p["req_new_tokens"] == [100]
    assert p["num_tokens"] == 100  # extend lengths, not the context sum (seq_lens_sum = 600)
    assert (d["phase"], d["num_tokens"], d["req_ids"]) == (
        "decode",
        3,
        [],
    )  # no per-request info: empty lists
    assert dd["phase"] == "decode" and dd["t_end_ns"] - dd["t_start_ns"] == 20_000_000
    assert ref["columns"]["forward_pass_id"] == [11.0, 12.0, None]
    assert ref["columns"]["latency"] == [0.03, 0.01, 0.02]
    assert (
        ref["columns"]["expert_activation"][2] == -1.0
    )  # kept as is: the analyzer's reference mode drops it
    assert [g.name for g in gpus_from_records(SGLANG)] == ["NVIDIA-H100-HBM3-80GB"] * 2
    with pytest.raises(CollectError, match="record 1 is a list"):
        records_to_steps([{}, []], anchor_ns=0)


def test_written_steps_file_and_records_sidecar(tmp_path):
    run = RunMetadata(run_id="ref-run", engine=EngineInfo(name="http"), model=ModelInfo(id="m"))
    paths = write_reference_steps(VLLM, run, tmp_path, source="unit test")
    assert paths == [
        str(tmp_path / "ref-run.dp0-pp0-tp0.steps.arrow"),
        str(tmp_path / "ref-run.batch_data.json"),
    ]
    tf = read_trace_file(paths[0])
    assert tf.table.num_rows == 3
    assert tf.table.column("req_prefix_lens").to_pylist()[0] == [None, 48]
    block = tf.run.extra["moecap_reference"]
    assert (
        block["records_file"] == "ref-run.batch_data.json"
        and block["records"] == 3
        and block["source"] == "unit test"
    )
    assert (
        json.loads((tmp_path / "ref-run.batch_data.json").read_text()) == VLLM
    )  # verbatim, for --formula reference
    assert [g.name for g in tf.run.gpus] == ["NVIDIA-A100-SXM4-80GB"]
