"""Helpers for the per-step cost tests: `steps` batches, synthetic traces, trace rewriting, analysis."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from moecap.analyze.analysis import Options
from moecap.analyze.pipeline import analyze_paths
from moecap.schemas import TraceWriter, read_trace_file

# The synthetic-trace generator lives with the benchmarks (benchmarks/ is not a package).
_BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"
if str(_BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(_BENCHMARKS))

import engine_like_trace as _engine_like  # noqa: E402
import synthetic_traces  # noqa: E402

QWEN15_MOE_CONFIG = synthetic_traces.QWEN15_MOE_CONFIG
SimConfig = synthetic_traces.SimConfig
TimeModel = synthetic_traces.TimeModel
simulate_run = synthetic_traces.simulate_run
run_metadata = synthetic_traces.run_metadata
engine_like_trace = _engine_like.engine_like_trace


def steps_batch(
    prefix: Sequence[Sequence[int]],
    new: Sequence[Sequence[int]],
    logits: Sequence[Sequence[int] | None] | None = None,
) -> pa.Table:
    """A `steps` table with one row per step: per-request cached prefix, new tokens and logit rows
    (None: the engine did not record logit rows for that step)."""
    if logits is None:
        logits = [None] * len(prefix)
    return pa.table(
        {
            "num_tokens": pa.array([sum(n) for n in new], pa.int32()),
            "num_reqs": pa.array([len(n) for n in new], pa.int32()),
            "req_prefix_lens": pa.array([list(p) for p in prefix], pa.list_(pa.int32())),
            "req_new_tokens": pa.array([list(n) for n in new], pa.list_(pa.int32())),
            "req_num_logits": pa.array(
                [None if g is None else list(g) for g in logits], pa.list_(pa.int16())
            ),
        }
    )


def rewrite_steps(src: Path, dst: Path, edit: Callable[[pa.Table], pa.Table]) -> Path:
    """Copy the trace directory `src` to `dst`, passing its steps table through `edit`."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.arrow")):
        if not path.name.endswith(".steps.arrow"):
            shutil.copy(path, dst / path.name)
            continue
        trace = read_trace_file(path)
        table = edit(trace.table)
        with TraceWriter(dst / path.name, "steps", trace.run) as writer:
            for batch in table.to_batches():
                writer.write_batch(batch)
    return dst


def scale_times(table: pa.Table, factor: int) -> pa.Table:
    """Every timestamp moved to t0 + factor·(t − t0): each step span and gap grows `factor` times."""
    t0 = min(table.column("t_start_ns").to_pylist())
    for name in ("t_start_ns", "t_end_ns", "gpu_start_ns", "gpu_end_ns"):
        i = table.schema.get_field_index(name)
        values = [None if v is None else t0 + factor * (v - t0) for v in table.column(name).to_pylist()]
        table = table.set_column(i, name, pa.array(values, table.schema.field(name).type))
    return table


def run_document(paths: Sequence[Path | str], cache: Path, **options: Any) -> dict[str, Any]:
    """The metrics document of `paths` analysed over every step (window "all" unless given)."""
    options.setdefault("window", "all")
    return analyze_paths([str(p) for p in paths], Options(**options), cache_dir=cache).document


# ---- tiny configs with hand-derived costs (tests/analyze/metrics/test_step_costs_hand.py) -----
# Qwen2-MoE, bf16: L = 3 layers, D = 8, H = 2 query heads, G = 1 KV head, h = D/H = 4, V = 16,
# E = 4 experts of width F = 6, top-k = 2, one shared expert of width Fs = 10 with its D -> 1 gate.
# Layer 0 is dense (mlp_only_layers, width 12), layers 1 and 2 are MoE; layers 0, 1 use full
# attention, layer 2 (>= max_window_layers) a sliding window W = 4.
TINY_QWEN2: dict[str, Any] = {
    "model_type": "qwen2_moe",
    "num_hidden_layers": 3,
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 16,
    "intermediate_size": 12,
    "moe_intermediate_size": 6,
    "shared_expert_intermediate_size": 10,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "mlp_only_layers": [0],
    "qkv_bias": True,
    "use_sliding_window": True,
    "sliding_window": 4,
    "max_window_layers": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# DeepSeek-V2-like MLA, bf16: L = 2 (layer 0 dense, layer 1 MoE), D = 8, H = 2, d_n = 3, d_r = 2,
# d_v = 4, r_kv = 5, queries projected directly (q_lora_rank None), V = 16.
TINY_MLA: dict[str, Any] = {
    "model_type": "deepseek_v2",
    "num_hidden_layers": 2,
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 16,
    "intermediate_size": 12,
    "moe_intermediate_size": 6,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": None,
    "kv_lora_rank": 5,
    "qk_rope_head_dim": 2,
    "qk_nope_head_dim": 3,
    "v_head_dim": 4,
    "torch_dtype": "bfloat16",
}

# gpt-oss, bf16: L = 2 (layer 0 sliding, W = 3; layer 1 full), D = 8, H = 2, G = 1, h = 4, V = 16,
# E = 4 experts of width F = 6 with biases, top-2, a router with a bias, one sink per head.
TINY_GPT_OSS: dict[str, Any] = {
    "model_type": "gpt_oss",
    "num_hidden_layers": 2,
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "vocab_size": 16,
    "intermediate_size": 6,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 3,
    "torch_dtype": "bfloat16",
}


def analysis(paths: Sequence[Path | str], cache: Path, **options: Any) -> Any:
    """The full `Analysis` (document + DuckDB views) of `paths` over every step unless told."""
    options.setdefault("window", "all")
    return analyze_paths([str(p) for p in paths], Options(**options), cache_dir=cache)
