"""The sweep matrix table (`leaderboard --layout moecap`): one row per run in MoE-CAP's layout, each figure
the run's own (no aggregation across runs), sorted model × task × batch size × repeat."""

from __future__ import annotations

import json

import pytest

from moecap.analyze.report.matrix import COLUMNS, matrix_frame, to_markdown, write_matrix


def _run(
    run_id, *, bs, task=None, repeat=None, dataset="synthetic:8x2", ttft_s=0.02, tpot_s=0.004, tps=500.0
):
    workload = {"dataset": dataset, "batch_size": bs, "concurrency": bs}
    if task is not None:
        workload["sweep"] = {
            "name": "s",
            "point": run_id[-4:],
            "task": task,
            "batch_size": bs,
            "repeat": repeat,
        }
    return {
        "run_id": run_id,
        "model": "Qwen/Qwen1.5-MoE-A2.7B",
        "engine": {"name": "vllm", "version": "0.26.0"},
        "gpu": {"name": "H100-SXM-80GB", "count": 1},
        "workload": workload,
        "metrics": {
            "requests": {"ttft_s": {"mean": ttft_s}, "tpot_s": {"mean": tpot_s}},
            "steps": {
                "all": {"throughput_output_tokens_per_s": tps},
                "prefill": {"s_mbu": 0.1, "s_mfu": 0.3},
                "decode": {"s_mbu": 0.5, "s_mfu": 0.02},
            },
            "cost": {"usd_per_1m_output_tokens": 1.25},
        },
    }


DOC = {
    "formula": "moecap",
    "runs": [
        _run("20261206T100003Z-vllm-c32-r0-cccc", bs=32, task="gsm8k:4000x1000", repeat=0, tps=4000.0),
        _run("20261206T100001Z-vllm-c1-r1-bbbb", bs=1, task="gsm8k:4000x1000", repeat=1, ttft_s=0.031),
        _run("20261206T100000Z-vllm-c1-r0-aaaa", bs=1, task="gsm8k:4000x1000", repeat=0, ttft_s=0.03),
        _run("20261206T090000Z-vllm-plain-dddd", bs=64, dataset="synthetic:512x64"),  # not from a sweep
    ],
}


def test_one_row_per_run_sorted_by_task_batch_size_and_repeat():
    frame = matrix_frame(DOC)
    assert frame.columns[: len(COLUMNS)] == [c for c, _, _ in COLUMNS]
    rows = frame.to_dicts()
    assert [(r["task"], r["batch_size"], r["repeat"]) for r in rows] == [
        ("gsm8k:4000x1000", 1, 0),
        ("gsm8k:4000x1000", 1, 1),
        ("gsm8k:4000x1000", 32, 0),
        ("synthetic:512x64", 64, 0),  # a run without sweep metadata: its dataset, repeat 0
    ]
    first = rows[0]
    assert first["hardware"] == "1xH100-SXM-80GB" and first["engine"] == "vllm"
    assert first["ttft_ms"] == pytest.approx(30.0) and first["tpot_ms"] == pytest.approx(4.0)
    assert rows[1]["ttft_ms"] == pytest.approx(31.0)  # repeats are not averaged away
    assert rows[2]["output_tokens_per_s"] == 4000.0
    assert (first["prefill_smbu"], first["prefill_smfu"], first["decode_smbu"], first["decode_smfu"]) == (
        0.1, 0.3, 0.5, 0.02,
    )  # fmt: skip
    assert first["cost_usd_per_m_output_tokens"] == 1.25


def test_files_markdown_csv_json(tmp_path):
    written = write_matrix(DOC, tmp_path / "table")
    md = written["md"].read_text().splitlines()
    assert md[0].startswith("| model | hardware | engine | task | batch size | repeat | TTFT ms | TPOT ms")
    assert len(md) == 2 + 4 and "| 30.00 | 4.00 |" in md[2] and "50.00 %" in md[2]
    assert written["csv"].read_text().splitlines()[0].split(",")[:6] == [
        "model", "hardware", "engine", "task", "batch_size", "repeat",
    ]  # fmt: skip
    doc = json.loads(written["json"].read_text())
    assert doc["schema"] == "moecap.matrix/1" and len(doc["rows"]) == 4
    assert to_markdown(matrix_frame({"runs": []})).count("\n") == 2  # header only
