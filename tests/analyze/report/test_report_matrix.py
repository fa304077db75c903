"""The sweep matrix table (`leaderboard --layout moecap`): one row per run in MoE-CAP's layout, each figure
the run's own (no aggregation across runs), sorted model × task × batch size × repeat."""

from __future__ import annotations

import json
from types import SimpleNamespace

import polars as pl
import pytest

from moecap.analyze.report.matrix import COLUMNS, matrix_frame, to_markdown, write_matrix


class _Analysis:
    """The `Analysis` façade's frames for a few runs (the matrix reads nothing else): `run_info()`,
    `run_metrics()`, `slow_step_totals()`, `request_summary`, `costs`, `accuracy`, `warnings`, and each run's metadata
    workload through `contexts`."""

    def __init__(self, runs: list[dict]) -> None:
        self.run_ids = [r["run_id"] for r in runs]
        self.contexts = [
            SimpleNamespace(
                run=SimpleNamespace(run_id=r["run_id"], metadata=SimpleNamespace(workload=r["workload"]))
            )
            for r in runs
        ]
        self._info = pl.DataFrame(
            [
                {
                    "run_id": r["run_id"],
                    "model": "Qwen/Qwen1.5-MoE-A2.7B",
                    "engine": "vllm",
                    "engine_version": "0.26.0",
                    "gpu": "H100-SXM-80GB",
                    "num_gpus": 1,
                    "batch_size": r["workload"]["batch_size"],
                    "dataset": r["workload"]["dataset"],
                    "created_at": None,
                }
                for r in runs
            ],
            schema={
                "run_id": pl.String, "model": pl.String, "engine": pl.String, "engine_version": pl.String,
                "gpu": pl.String, "num_gpus": pl.Int64, "batch_size": pl.Int64, "dataset": pl.String,
                "created_at": pl.String,
            },
        )  # fmt: skip
        self._metrics = pl.DataFrame(
            [
                row
                for r in runs
                for row in (
                    {
                        "run_id": r["run_id"],
                        "phase": "all",
                        "window_output_throughput": r["tps"],
                        "s_mbu": None,
                        "s_mfu": None,
                    },
                    {
                        "run_id": r["run_id"],
                        "phase": "prefill",
                        "window_output_throughput": 1.0,
                        "s_mbu": 0.1,
                        "s_mfu": 0.3,
                    },
                    {
                        "run_id": r["run_id"],
                        "phase": "decode",
                        "window_output_throughput": 1.0,
                        "s_mbu": 0.5,
                        "s_mfu": 0.02,
                    },
                )
            ],
            schema={
                "run_id": pl.String, "phase": pl.String, "window_output_throughput": pl.Float64,
                "s_mbu": pl.Float64, "s_mfu": pl.Float64,
            },
        )  # fmt: skip
        self.request_summary = pl.DataFrame(
            [{"run_id": r["run_id"], "ttft_s_mean": r["ttft_s"], "tpot_s_mean": r["tpot_s"]} for r in runs],
            schema={"run_id": pl.String, "ttft_s_mean": pl.Float64, "tpot_s_mean": pl.Float64},
        ).with_columns(
            itl_s_p50=pl.lit(None, pl.Float64),
            output_throughput=pl.lit(None, pl.Float64),
            request_throughput=pl.lit(None, pl.Float64),
        )
        self.costs = pl.DataFrame(
            {"run_id": self.run_ids, "usd_per_1m_output_tokens": [1.25] * len(runs)},
            schema={"run_id": pl.String, "usd_per_1m_output_tokens": pl.Float64},
        ).with_columns(band_low=pl.lit(None, pl.Float64), band_high=pl.lit(None, pl.Float64))
        self.accuracy = pl.DataFrame(
            schema={
                "run_id": pl.String,
                "exact_match": pl.Float64,
                "correct": pl.Float64,
                "total": pl.Float64,
            }
        )
        self.warnings: dict[str, list[str]] = {}

    def run_info(self) -> pl.DataFrame:
        return self._info

    def run_metrics(self) -> pl.DataFrame:
        return self._metrics

    def slow_step_totals(self) -> pl.DataFrame:  # no step of these runs is slow
        return pl.DataFrame(
            {
                "run_id": self.run_ids,
                "compile_steps": [0] * len(self.run_ids),
                "compile_s": [0.0] * len(self.run_ids),
            },
            schema={"run_id": pl.String, "compile_steps": pl.Int64, "compile_s": pl.Float64},
        )


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
    return {"run_id": run_id, "workload": workload, "ttft_s": ttft_s, "tpot_s": tpot_s, "tps": tps}


DOC = _Analysis(
    [
        _run("20261206T100003Z-vllm-c32-r0-cccc", bs=32, task="gsm8k:4000x1000", repeat=0, tps=4000.0),
        _run("20261206T100001Z-vllm-c1-r1-bbbb", bs=1, task="gsm8k:4000x1000", repeat=1, ttft_s=0.031),
        _run("20261206T100000Z-vllm-c1-r0-aaaa", bs=1, task="gsm8k:4000x1000", repeat=0, ttft_s=0.03),
        _run("20261206T090000Z-vllm-plain-dddd", bs=64, dataset="synthetic:512x64"),  # not from a sweep
    ]
)


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
    assert rows[2]["window_output_throughput"] == 4000.0
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
    assert to_markdown(matrix_frame(_Analysis([]))).count("\n") == 2  # header only
