"""docs/metrics.md's worked examples, recomputed by the code.

Every result in the page sits in a comment `<!-- check EXAMPLE: key=value ... -->`. This test rebuilds
each example's inputs, computes the same keys with the analyzer (a real trace through `analyze_paths`
for the per-step and aggregation examples; `cost_model` / `step_costs`, `request_metrics`,
`expert_stats` and `reference_metrics` for the others) and requires every printed number to be the
code's value rounded to the digits printed (half a unit in the last digit; at least 4 significant
digits unless an integer). The set of examples and of keys must match both ways, so a check cannot be
dropped from the page or added to it without this file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from moecap.analyze.analysis import Options
from moecap.analyze.metrics.experts import expert_stats
from moecap.analyze.metrics.requests import request_metrics, request_table
from moecap.analyze.metrics.step_costs import cost_model, step_costs, windowed_context_sum
from moecap.analyze.pipeline import Analysis, analyze_paths
from moecap.analyze.reference import reference_metrics
from moecap.analyze.specs import load_model_config, load_model_spec
from moecap.schemas import EngineInfo, GpuInfo, ModelInfo, MoEInfo, RunMetadata, TraceWriter, trace_file_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_CHECK = re.compile(r"^<!--\s*check\s+(\w+):(.*?)-->", re.S | re.M)  # comments opening a line
_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:e([+-]?\d+))?")
MS = 1_000_000  # ns
QWEN = "Qwen/Qwen1.5-MoE-A2.7B"


def doc_checks(text: str) -> dict[str, dict[str, str]]:
    """example -> {key: printed value} from every check comment of the page."""
    out: dict[str, dict[str, str]] = {}
    for m in _CHECK.finditer(text):
        checks = out.setdefault(m.group(1), {})
        for item in m.group(2).split():
            key, sep, value = item.partition("=")
            assert sep and value, f"check {m.group(1)}: malformed item {item!r}"
            assert key not in checks, f"check {m.group(1)}: {key} given twice"
            checks[key] = value
    return out


def disagreement(printed: str, value: Any) -> str | None:
    """Why `value` does not print as `printed` (None when it does)."""
    if printed == "null":
        return None if value is None else f"code gives {value!r}, the page null"
    m = _NUMBER.fullmatch(printed)
    if m is None:  # a word, e.g. a dtype
        return None if str(value) == printed else f"code gives {value!r}, the page {printed}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"code gives {value!r}, the page {printed}"
    whole, decimals, exponent = m.group(1), m.group(2) or "", int(m.group(3) or 0)
    if (decimals or m.group(3)) and float(printed) != 0 and len((whole + decimals).lstrip("0")) < 4:
        return f"{printed}: print at least 4 significant digits"
    tolerance = 0.5 * 10.0 ** (exponent - len(decimals))
    if abs(float(value) - float(printed)) > tolerance * (1 + 1e-9):
        return f"code gives {float(value)!r}, which does not round to {printed}"
    return None


# ---- 15.1, 15.2, 15.5: a three-step Qwen1.5-MoE trace on one H100, analysed end to end -------------
# (step, phase, host start, GPU start, GPU end, host end in ms; prefixes, new tokens, logit rows,
# activated experts per layer)
STEPS = [
    (0, "decode", 0.0, 1.0, 13.0, 13.5, [100, 250, 500, 1000], [1, 1, 1, 1], [1, 1, 1, 1], 14),
    (1, "prefill", 15.0, 16.0, 56.0, 56.5, [2048, 0], [1536, 512], [1, 0], 60),
    (2, "decode", 58.0, 59.0, 70.0, 70.5, [101, 251, 501, 1001], [1, 1, 1, 1], [1, 1, 1, 1], 13),
]


def write_trace(out: Path) -> None:
    """The run of 15.5 in moecap's trace format: steps, and expert counts with `active` experts
    per layer sharing the step's T·k routed tokens."""
    config = load_model_config(QWEN)
    layers, experts, top_k = config["num_hidden_layers"], config["num_experts"], config["num_experts_per_tok"]
    run = RunMetadata(
        run_id="docs-metrics-15-5",
        engine=EngineInfo(name="docs"),
        model=ModelInfo(id=QWEN, config=config, kv_bytes_per_token_per_layer=[8192] * layers),
        moe=MoEInfo(layer_ids=list(range(layers)), num_experts=experts, top_k=top_k),
        gpus=[GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-doc-0")],
    )
    base = 10**12
    with (
        TraceWriter(out / trace_file_name(run, "steps"), "steps", run) as steps,
        TraceWriter(out / trace_file_name(run, "experts"), "experts", run) as counts_w,
    ):
        for step, phase, t0, g0, g1, t1, prefix, new, logits, active in STEPS:
            steps.write(
                {
                    "step": step,
                    "t_start_ns": base + round(t0 * MS),
                    "t_end_ns": base + round(t1 * MS),
                    "gpu_start_ns": base + round(g0 * MS),
                    "gpu_end_ns": base + round(g1 * MS),
                    "phase": phase,
                    "is_draft": False,
                    "num_reqs": len(new),
                    "num_tokens": sum(new),
                    "req_ids": [f"r{i}" for i in range(len(new))],
                    "req_prefix_lens": prefix,
                    "req_new_tokens": new,
                    "req_num_logits": logits,
                }
            )
            routed = sum(new) * top_k
            counts = np.zeros((layers, experts), dtype=np.int32)
            counts[:, :active] = routed // active
            counts[:, 0] += routed - (routed // active) * active
            counts_w.write({"step": step, "counts": counts.ravel()})


@pytest.fixture(scope="module")
def analysis(tmp_path_factory: pytest.TempPathFactory) -> Analysis:
    root = tmp_path_factory.mktemp("docs_metrics")
    write_trace(root / "trace")
    return analyze_paths([root / "trace"], Options(window="all"), cache_dir=root / "cache")


def _step_rows(analysis: Analysis) -> dict[int, dict[str, Any]]:
    cur = analysis.db.con.execute("SELECT * FROM step_metrics ORDER BY step")
    names = [d[0] for d in cur.description]
    return {row["step"]: row for row in (dict(zip(names, r)) for r in cur.fetchall())}


_STEP_KEYS = (
    "bytes_weights",
    "bytes_kv_read",
    "bytes_kv_write",
    "bytes_total",
    "flops_linear",
    "flops_lm_head",
    "flops_attention",
    "flops_total",
)


def decode_values(analysis: Analysis) -> dict[str, Any]:
    row = _step_rows(analysis)[0]
    assert analysis.contexts[0].spec is not None
    model = cost_model(analysis.contexts[0].spec, kv_bytes_per_token_per_layer=[8192] * 24)
    return {
        "attention_bytes": model.attention_bytes,
        "router_bytes": model.router_bytes,
        "shared_bytes": model.shared_bytes,
        "norms_bytes": model.norms_bytes,
        "expert_bytes": model.expert_bytes,
        "lm_head_bytes": model.lm_head_bytes,
        "embedding_row_bytes": model.embedding_row_bytes,
        **{k: row[k] for k in _STEP_KEYS},
        "bytes_routed_experts": row["bytes_routed_experts"],
        "bandwidth": row["gpu_bandwidth"],
        "peak_flops": row["gpu_peak_flops"],
        "s_mbu": row["s_mbu"],
        "s_mfu": row["s_mfu"],
    }


def prefill_values(analysis: Analysis) -> dict[str, Any]:
    row = _step_rows(analysis)[1]
    return {
        **{k: row[k] for k in _STEP_KEYS if k != "bytes_routed_experts"},
        "s_mbu": row["s_mbu"],
        "s_mfu": row["s_mfu"],
    }


def ratio_values(analysis: Analysis) -> dict[str, Any]:
    rows = _step_rows(analysis)
    (run,) = analysis.document["runs"]
    steps = run["metrics"]["steps"]
    every = steps["all"]
    return {
        "smbu_step2": rows[2]["s_mbu"],
        "smfu_step2": rows[2]["s_mfu"],
        "all_smbu": every["s_mbu"],
        "all_smfu": every["s_mfu"],
        "mean_step_smbu": np.mean([r["s_mbu"] for r in rows.values()]),
        "mean_step_smfu": np.mean([r["s_mfu"] for r in rows.values()]),
        "decode_smbu": steps["decode"]["s_mbu"],
        "decode_smfu": steps["decode"]["s_mfu"],
        "prefill_smbu": steps["prefill"]["s_mbu"],
        "prefill_smfu": steps["prefill"]["s_mfu"],
        "gpu_seconds": every["gpu_seconds"],
        "window_total_token_throughput": every["window_total_token_throughput"],
        "window_output_throughput": every["window_output_throughput"],
        "host_gap_s": every["host_gap_s"],
        "gpu_busy_fraction": every["gpu_busy_fraction"],
        "window_s": every["window_s"],
        "tokens": every["tokens"],
        "output_tokens": every["output_tokens"],
    }


# ---- 15.3, 15.4: attention with MLA and with sliding windows, per step ---------------------------------
def _batch(prefix: list[list[int]], new: list[list[int]]) -> pa.Table:
    """A `steps` table, one sampled logit row per request."""
    return pa.table(
        {
            "num_tokens": pa.array([sum(n) for n in new], pa.int32()),
            "num_reqs": pa.array([len(n) for n in new], pa.int32()),
            "req_prefix_lens": pa.array(prefix, pa.list_(pa.int32())),
            "req_new_tokens": pa.array(new, pa.list_(pa.int32())),
            "req_num_logits": pa.array([[1] * len(n) for n in new], pa.list_(pa.int16())),
        }
    )


def mla_values(_: Analysis) -> dict[str, Any]:
    spec = load_model_spec("deepseek-ai/DeepSeek-V2-Lite")
    latent = spec.kv_bytes_per_token_per_layer()
    decompressed = spec.kv_bytes_per_token_per_layer(mla_layout="decompressed")
    steps = _batch([[0], [4095]], [[1000], [1]])  # a 1000-token prompt; one decode token at p = 4095
    active = np.array([26.0 * 64, 26.0 * 6])
    lat = step_costs(steps, cost_model(spec), active)
    dec = step_costs(
        steps, cost_model(spec, kv_bytes_per_token_per_layer=[decompressed] * spec.num_layers), active
    )
    return {
        "attn_flops_per_pair": cost_model(spec).attn_score_flops_per_pair,
        "flops_attention_prefill": lat["flops_attention"][0],
        "flops_attention_decode": lat["flops_attention"][1],
        "kv_latent": latent,
        "kv_decompressed": decompressed,
        "kv_read_decode_latent": lat["bytes_kv_read"][1],
        "kv_read_decode_decompressed": dec["bytes_kv_read"][1],
        "kv_write_prefill_latent": lat["bytes_kv_write"][0],
    }


def swa_values(_: Analysis) -> dict[str, Any]:
    spec = load_model_spec("openai/gpt-oss-20b")
    window = spec.attention_windows[0]
    assert window == 128 and spec.attention_windows[1] is None
    model = cost_model(spec)
    got = step_costs(_batch([[1000], [0]], [[1], [300]]), model, np.array([24.0 * 4, 24.0 * 32]))
    p, n = np.array([1000, 0]), np.array([1, 300])
    full, sliding = windowed_context_sum(p, n, 0), windowed_context_sum(p, n, window)
    return {
        "expert_bytes": model.expert_bytes,
        "kv_per_token_per_layer": spec.kv_bytes_per_token_per_layer(),
        "peak_dtype": spec.activation_dtype("routed_expert"),
        "pairs_full_decode": full[0],
        "pairs_sliding_decode": sliding[0],
        "pairs_full_prefill": full[1],
        "pairs_sliding_prefill": sliding[1],
        "kv_read_decode": got["bytes_kv_read"][0],
        "flops_attention_decode": got["flops_attention"][0],
        "flops_attention_prefill": got["flops_attention"][1],
        "kv_write_prefill": got["bytes_kv_write"][1],
    }


# ---- 15.6, 15.7, 15.8 ------------------------------------------------------------------------------
def _requests() -> pl.DataFrame:
    chunks = [[180, 210, 235, 295, 315], [350], [220, 260, 300, 340]]
    return pl.DataFrame(
        {
            "req_id": ["r1", "r2", "r3"],
            "arrival_ns": [0, 50 * MS, 100 * MS],
            "first_token_ns": [c[0] * MS for c in chunks],
            "finish_ns": [c[-1] * MS for c in chunks],
            "prompt_tokens": [100, 200, 50],
            "output_tokens": [7, 1, 4],
            "chunk_times_ns": [[t * MS for t in c] for c in chunks],
            "chunk_tokens": [[1, 1, 1, 3, 1], [1], [1, 1, 1, 1]],
            "error": [None, None, None],
        },
        schema_overrides={"error": pl.String},
    )


def requests_values(_: Analysis) -> dict[str, Any]:
    requests = _requests()
    per = request_table(requests).sort("req_id")
    doc = request_metrics(requests, slo_ttft_s=0.200, slo_tpot_s=0.030)
    return {
        "r1_ttft_s": per["ttft_s"][0],
        "r1_tpot_s": per["tpot_s"][0],
        "r2_tpot_s": per["tpot_s"][1],
        "r3_tpot_s": per["tpot_s"][2],
        "ttft_mean": doc["ttft_s"]["mean"],
        "e2e_mean": doc["e2e_s"]["mean"],
        "tpot_mean": doc["tpot_s"]["mean"],
        "tpot_n": doc["tpot_s"]["n"],
        "tpot_token_weighted": doc["tpot_token_weighted_s"],
        "itl_mean": doc["itl_s"]["mean"],
        "itl_p50": doc["itl_s"]["p50"],
        "itl_p90": doc["itl_s"]["p90"],
        "itl_n": doc["itl_s"]["n"],
        "makespan_s": doc["makespan_s"],
        "request_throughput": doc["request_throughput"],
        "output_throughput": doc["output_throughput"],
        "good_requests": doc["goodput"]["good_requests"],
        "good_requests_per_s": doc["goodput"]["good_requests_per_s"],
        "goodput_fraction": doc["goodput"]["fraction"],
    }


def experts_values(_: Analysis) -> dict[str, Any]:
    totals = pl.DataFrame(
        {
            "layer": [0] * 8 + [1] * 8,
            "expert": list(range(8)) * 2,
            "tokens": [40, 30, 10, 10, 5, 5, 0, 0] + [25] * 8,
        }
    )
    s = expert_stats(totals, 8)
    out: dict[str, Any] = {}
    for i in (0, 1):
        out[f"imbalance_l{i}"] = s["imbalance_max_over_mean"][i]
        out[f"cv_l{i}"] = s["cv"][i]
        out[f"top10_l{i}"] = s["top10pct_token_share"][i]
        out[f"dead_l{i}"] = s["dead_experts"][i]
        out[f"entropy_l{i}"] = s["entropy_normalized"][i]
    summary = s["summary"]
    return {
        **out,
        "imbalance_mean": summary["imbalance_max_over_mean_mean"],
        "cv_mean": summary["cv_mean"],
        "top10_mean": summary["top10pct_token_share_mean"],
        "dead_total": summary["dead_experts_total"],
        "entropy_mean": summary["entropy_normalized_mean"],
        "routed_tokens_total": summary["routed_tokens_total"],
    }


def reference_values(_: Analysis) -> dict[str, Any]:
    record = {
        "forward_mode": "decode",
        "batch_size": 4,
        "seq_lens_sum": 1854,
        "latency": 0.012,
        "expert_activation": 336 / 24,
        "gpu_num": 1,
        "gpu_raw_type": "NVIDIA-H100-HBM3-80GB",
    }
    got = reference_metrics([record], model_config=load_model_config(QWEN), model_name=QWEN)
    assert got["reason"] is None
    keys = ("decoding_smbu", "decoding_smfu", "kv_size", "decoding_throughput", "tpot")
    return {k: got[k] for k in keys}


EXAMPLES: dict[str, Callable[[Analysis], dict[str, Any]]] = {
    "decode": decode_values,
    "prefill": prefill_values,
    "mla": mla_values,
    "swa": swa_values,
    "ratio": ratio_values,
    "requests": requests_values,
    "experts": experts_values,
    "reference": reference_values,
}


def test_the_page_checks_every_example() -> None:
    checks = doc_checks(DOC.read_text(encoding="utf-8"))
    assert set(checks) == set(EXAMPLES)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_worked_example_matches_the_code(example: str, analysis: Analysis) -> None:
    printed = doc_checks(DOC.read_text(encoding="utf-8")).get(example, {})
    computed = EXAMPLES[example](analysis)
    assert set(printed) == set(computed), (
        f"keys only in the page: {sorted(set(printed) - set(computed))}; "
        f"only in the test: {sorted(set(computed) - set(printed))}"
    )
    problems = {k: why for k, v in printed.items() if (why := disagreement(v, computed[k])) is not None}
    assert not problems, f"docs/metrics.md example {example!r}: {problems}"


def test_the_rounding_rule() -> None:
    assert disagreement("0.2307", 0.2306693) is None
    assert disagreement("0.2306", 0.2306693) is not None
    assert disagreement("0.23", 0.2306693) is not None  # too few digits
    assert disagreement("29163", 29163.12) is None and disagreement("29163", 29163.6) is not None
    assert disagreement("1.384e11", 1.3837824e11) is None
    assert disagreement("null", None) is None and disagreement("null", 0.0) is not None
    assert disagreement("bf16", "bf16") is None and disagreement("bf16", "fp8") is not None
    assert disagreement("0", 0.0) is None and disagreement("0.2307", None) is not None
