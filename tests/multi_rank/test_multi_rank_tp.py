"""Several ranks on CPUs: two processes (torch.distributed, gloo) run one tensor-parallel workload with the
hf collector, and the analyzer reads their files as one run.

Checked: one steps + experts file per rank named `<run>.dp0-pp0-tp{r}`, both with parallelism.tp = 2,
their own rank.tp and both GPUs' UUIDs; one run id (rank 0's, broadcast); the requests/outputs files
written once (by tp0); the analyzer keeps tp0's rows only, counts 2 GPUs, finds the TP ranks' expert
counts equal on every step, and reports a rank whose counts differ.

With accelerate installed the checkpoint is sharded by transformers (`tp_plan="auto"`: experts and
attention split over the two ranks); without it each rank holds the whole model, which routes the same
tokens the same way, so everything the collector and analyzer do is still exercised.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from moecap.schemas import read_trace_header

WORKER = Path(__file__).with_name("tp_worker.py")
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight OLMoE (its TP plan shards attention and experts) saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, OlmoeConfig

    cfg = OlmoeConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=160,
        max_position_embeddings=256,
        num_experts=8,
        num_experts_per_tok=2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def run_two_ranks(checkpoint: Path, out: Path, how: str) -> list[dict]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(checkpoint), str(out), how],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    for proc in procs:
        try:
            text, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, text[-4000:]
        line = next(x for x in text.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
    return sorted(results, key=lambda r: r["rank"])


HOWS = [
    "replicated",
    pytest.param("tp_plan", marks=pytest.mark.skipif(not HAS_ACCELERATE, reason="needs accelerate")),
]


@pytest.fixture(scope="module", params=HOWS)
def two_rank_run(request, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"trace-{request.param}")
    results = run_two_ranks(checkpoint, out, request.param)
    return request.param, out, results


def test_each_rank_writes_its_files_under_one_run_id(two_rank_run):
    how, out, results = two_rank_run
    assert results[0]["run_id"] == results[1]["run_id"]
    run_id = results[0]["run_id"]
    assert results[0]["steps"] == results[1]["steps"] > 0
    assert results[1]["sharded"] is (how == "tp_plan")
    names = sorted(p.name for p in out.glob("*.arrow"))
    assert names == sorted(
        [
            f"{run_id}.client.outputs.arrow",
            f"{run_id}.client.requests.arrow",
            *(f"{run_id}.dp0-pp0-tp{r}.{t}.arrow" for r in (0, 1) for t in ("experts", "steps")),
        ]
    )
    uuids = ["GPU-cpu-test-rank0", "GPU-cpu-test-rank1"]
    for name in names:
        md = read_trace_header(out / name).run
        assert md.run_id == run_id
        assert md.parallelism.tp == 2
        assert md.rank.gpu_uuids == uuids
        assert [g.uuid for g in md.gpus] == uuids
        assert md.rank.tp == (1 if "-tp1." in name else 0)
        if how == "tp_plan":
            assert md.engine.args["tp_plan"] == "auto"
        per_rank = md.engine.args["kv_bytes_per_token_per_layer_per_rank"]
        assert md.model.kv_bytes_per_token_per_layer == [a + b for a, b in zip(*per_rank, strict=True)]
    with pa.ipc.open_stream(out / f"{run_id}.client.requests.arrow") as reader:
        assert reader.read_all().num_rows == 6


def test_analyzer_reads_one_run_on_two_gpus(two_rank_run, tmp_path):
    from moecap.analyze.analysis import Options, resolve_context
    from moecap.analyze.checks import check_run, tp_count_agreement
    from moecap.analyze.load import load_traces
    from moecap.analyze.pipeline import analyze_paths

    _, out, results = two_rank_run
    run_id = results[0]["run_id"]
    db = load_traces([out], cache_dir=tmp_path / "cache")
    assert list(db.runs) == [run_id] and not db.errors
    run = db.runs[run_id]
    assert [f.run.rank.tp for f in run.recording_files] == [0]
    assert db.sql("SELECT num_gpus, tp FROM runs").fetchall() == [(2, 2)]
    # De-duplication: the views hold tp0's rows only.
    assert db.sql("SELECT DISTINCT tp FROM steps").fetchall() == [(0,)]
    assert db.sql("SELECT count(*) FROM steps").fetchall()[0][0] == results[0]["steps"]
    assert db.sql("SELECT DISTINCT tp FROM experts").fetchall() == [(0,)]
    assert tp_count_agreement(db, run) == []
    assert check_run(db, run) == []
    assert resolve_context(run, Options()).num_gpus == 2
    db.close()

    analysis = analyze_paths([out], Options(window="all"), cache_dir=tmp_path / "cache2")
    doc = analysis.document["runs"][0]
    assert doc["gpu"]["count"] == 2
    assert analysis.db.sql("SELECT DISTINCT gpus FROM step_metrics").fetchall() == [(2,)]
    allm = doc["metrics"]["steps"]["all"]
    # Ratio of sums over 2 GPUs: gpu_seconds = 2 x the summed step time.
    assert allm["gpu_seconds"] == pytest.approx(2 * allm["gpu_busy_s"])


def test_rank_frame_and_chart(two_rank_run, tmp_path):
    from moecap.analyze.load import load_traces
    from moecap.analyze.report.ranks import rank_agreement_chart, rank_frame, rank_table

    _, out, results = two_rank_run
    db = load_traces([out], cache_dir=tmp_path / "cache")
    frame = rank_frame(db, results[0]["run_id"])
    assert frame["tp"].to_list() == [0, 1]
    assert frame["recording"].to_list() == [True, False]
    assert frame["steps"].to_list() == [results[0]["steps"]] * 2
    assert frame["steps_agreeing"].to_list() == [results[0]["steps"]] * 2
    assert frame["gpus"].to_list() == [2, 2]
    table = rank_table(frame)
    assert table.height == 2
    spec = rank_agreement_chart(frame).to_dict()
    assert "layer" in json.dumps(spec) or spec
    db.close()


def test_a_rank_whose_counts_differ_is_reported(two_rank_run, tmp_path):
    from moecap.analyze.checks import check_run
    from moecap.analyze.load import load_traces

    _, out, results = two_rank_run
    run_id = results[0]["run_id"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.glob("*.arrow"):
        if f.name.endswith(".dp0-pp0-tp1.experts.arrow"):
            with pa.ipc.open_stream(f) as reader:
                table = reader.read_all()
            counts = table.column("counts").to_pylist()
            counts[2] = list(reversed(counts[2]))  # step 2 routed differently on tp1
            table = table.set_column(
                table.schema.get_field_index("counts"),
                table.schema.field("counts"),
                pa.array(counts, table.schema.field("counts").type),
            )
            # a plain pyarrow writer adds no checksums: write it as a format-1.0 file (unchecked)
            meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"moecap.checksum"}
            meta[b"moecap.schema_version"] = b"1.0.0"  # as a file written before checksums
            table = table.replace_schema_metadata(meta)
            with pa.ipc.new_stream(bad / f.name, table.schema) as writer:
                writer.write_table(table)
        else:
            (bad / f.name).write_bytes(f.read_bytes())
    db = load_traces([bad], cache_dir=tmp_path / "cache")
    findings = check_run(db, db.runs[run_id])
    assert any(
        "tp1's expert counts differ from tp0's on 1 of" in x and "(first: step 2)" in x for x in findings
    )
    db.close()
