"""benchmarks/whatif_validate.py on a pair of SGLang sweep folders, as `sweep --engine sglang` leaves them:
one engine per point, so every run's recorded server arguments name its own scratch `model_path` and its
own `max_running_requests`, and SGLang's arguments carry no vLLM capture sizes.

Only the H100 half of the SGLang twins is recorded (`traces/h100-sglang-sweep/`, whose same-GPU table
docs/whatif.md checks), so for two folders these are the shipped H100 vLLM sweep's real steps and requests
(c1, c2, c4, c8) with the run metadata an SGLang sweep point writes (engine, its server arguments from the
shipped SGLang 0.5.16 run, driver, the `sweep` entry); the second folder says H200.
This checks the harness's mechanics on SGLang metadata (every held-out batch size, both directions, the
same-GPU mode), not the accuracy of the numbers, which needs the real twins (docs/sweep.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

ROOT = Path(__file__).resolve().parents[3]
SWEEP = ROOT / "traces" / "h100-vllm-sweep"
SGLANG_STEPS = ROOT / "traces" / "20261204T044925Z-sglang-Qwen1.5-MoE-A2.7B-10a9.dp0-pp0-tp0.steps.arrow"
sys.path.insert(0, str(ROOT / "benchmarks"))
import whatif_validate  # noqa: E402

SIZES = (1, 2, 4, 8)


def _sglang_args() -> dict:
    with pa.memory_map(str(SGLANG_STEPS)) as src:
        return json.loads(ipc.open_stream(src).schema.metadata[b"moecap.run"])["engine"]


def _relabel(src: Path, dst: Path, engine: dict, c: int, gpu: str) -> None:
    """Copy one trace file with the run metadata an SGLang sweep point at concurrency `c` writes."""
    with pa.memory_map(str(src)) as f:
        reader = ipc.open_stream(f)
        meta = dict(reader.schema.metadata)
        table = reader.read_all()
    run = json.loads(meta[b"moecap.run"])
    scratch = f"/tmp/moecap-sglang-point{c}/model"  # a fresh scratch folder per engine
    args = {**engine["args"], "model_path": scratch, "tokenizer_path": scratch, "served_model_name": scratch}
    run["engine"] = {**engine, "args": {**args, "max_running_requests": c}}
    run["run_id"] = run["run_id"].replace("-vllm-", "-sglang-")
    run["workload"]["driver"] = "sglang-offline-engine-admission"
    run["workload"]["sweep"] = {"name": "test", "point": f"p{c}", "task": "synthetic:1024x128",
                                "batch_size": c, "repeat": 0, "engine_args": "--mem-fraction-static 0.8"}  # fmt: skip
    for g in run.get("gpus") or []:
        g["name"] = gpu
    meta[b"moecap.run"] = json.dumps(run).encode()
    schema = table.schema.with_metadata(meta)
    with ipc.new_stream(str(dst), schema) as w:
        w.write_table(table.cast(schema))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    engine = _sglang_args()
    assert engine["name"] == "sglang" and "cudagraph_capture_sizes" not in engine["args"]
    out = []
    for name, gpu in (("h100-sglang-sweep", "NVIDIA H100 80GB HBM3"), ("h200-sglang-sweep", "NVIDIA H200")):
        folder = tmp_path_factory.mktemp(name)
        for c in SIZES:
            files = sorted(SWEEP.glob(f"*-c{c}-r0-*.arrow"))
            assert files
            for p in files:
                _relabel(p, folder / p.name.replace("-vllm-", "-sglang-"), engine, c, gpu)
        out.append(folder)
    return out[0], out[1]


def test_the_pair_is_validated_both_ways_at_every_held_out_batch_size(folders, tmp_path):
    a, b = folders
    rows = whatif_validate.validate(a, b, cache=tmp_path, names=("H100", "H200"))
    held = {(r["direction"], r["batch_size"]) for r in rows}
    assert held == {(d, c) for d in ("H100 → H200", "H200 → H100") for c in SIZES}
    for r in rows:
        assert set(r["predicted"]) == {"projection", "no_change", "bandwidth_ratio"}
        if r["metric"] in ("decode step time", "TPOT", "output tok/s"):
            assert r["measured"] is not None and r["predicted"]["projection"] is not None, r
    table = whatif_validate.markdown(rows)
    assert table.count("| H100 → H200 |") == table.count("| H200 → H100 |") == len(SIZES) * 5


def test_one_sglang_folder_validates_on_itself(folders, tmp_path):
    rows = whatif_validate.validate(folders[0], cache=tmp_path)
    decode = {r["batch_size"]: r for r in rows if r["metric"] == "decode step time"}
    assert set(decode) == set(SIZES)
    assert all(
        r["predicted"]["projection"] is not None and r["measured"] is not None for r in decode.values()
    )
