# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Comparing runs: batch sizes, GPUs, and a what-if on another GPU
#
# Several runs side by side: how utilisation, step time and per-token latency move with the batch
# size; how the GPUs of different runs compare; and what the same measured steps would mean on a
# GPU we did not run on (`Options(gpu="H200")`, the `--gpu` flag of `moecap-analyze`).

# %%
import altair as alt
import polars as pl
from _traces import trace_paths  # beside the notebooks: traces/*.arrow, or synthetic runs
from IPython.display import display

from moecap.analyze import tables
from moecap.analyze.specs import resolve_gpu

alt.data_transformers.disable_max_rows()
pl.Config.set_tbl_width_chars(160)

paths = trace_paths()
t = tables(paths)

# %% [markdown]
# ## One line per run
#
# `run_metrics` (phase `all`) over each run's own steady-state window, with request latency from
# `request_metrics`. Output throughput is tokens sampled per second of the window's busy time.

# %%
latency = t.pl(
    """SELECT run_id, count(*) AS requests,
              quantile_cont(ttft_s, 0.5) * 1e3 AS ttft_ms_p50, quantile_cont(tpot_s, 0.5) * 1e3 AS tpot_ms_p50,
              quantile_cont(tpot_s, 0.9) * 1e3 AS tpot_ms_p90
       FROM request_metrics WHERE ok GROUP BY run_id"""
)
overview = (
    t.pl(
        """SELECT run_id, gpu, num_gpus, batch_size, steps, s_mbu, s_mfu, step_time_s_mean * 1e3 AS step_ms_mean,
              gpu_busy_fraction, window_output_throughput AS output_tok_per_s
       FROM run_metrics WHERE phase = 'all'"""
    )
    .join(latency, on="run_id", how="left")
    .sort("gpu", "batch_size")
)
overview.with_columns(pl.col(pl.Float64).round(4))

# %% [markdown]
# ## Batch size
#
# Bigger batches share each step's weight reads among more requests: throughput grows while the
# time per output token grows much more slowly, until the step stops being memory-bound. Decode
# steps only, grouped by the number of requests actually in the step (not the target concurrency).

# %%
# The metric layer's step metrics per (run, batch size) of the decode steps.
from moecap.analyze.metrics.steps import summary_rows  # noqa: E402

per_batch = summary_rows(
    t.con,
    "(SELECT * FROM step_metrics s WHERE s.phase = 'decode' AND NOT s.is_draft AND s.time_s > 0)",
    key="s.num_reqs",
)
targets = dict(t.con.sql("SELECT run_id, batch_size FROM run_settings").fetchall())
decode = pl.DataFrame(
    [
        {
            "target_batch": targets.get(rid),
            "batch": int(b),
            "steps": v["steps"],
            "step_ms": v["step_time_s_mean"] * 1e3,
            "s_mbu": v["s_mbu"],
            "tokens_per_gpu_s": v["tokens"] / v["gpu_seconds"],
        }
        for rid, groups in per_batch.items()
        for b, v in groups.items()
        if b != "all" and v["steps"] >= 3
    ]
)
line = (
    alt.Chart(decode)
    .mark_line(point=True)
    .encode(
        x=alt.X("batch:Q", title="requests in the decode step"),
        color=alt.Color("target_batch:O", title="run batch size"),
    )
)
(
    line.encode(y=alt.Y("step_ms:Q", title="decode step time (ms)")).properties(width=250, height=200)
    | line.encode(y=alt.Y("tokens_per_gpu_s:Q", title="decode tokens / GPU-s")).properties(
        width=250, height=200
    )
    | line.encode(y=alt.Y("s_mbu:Q", title="S-MBU", scale=alt.Scale(zero=False))).properties(
        width=250, height=200
    )
)

# %% [markdown]
# Per request: TPOT against the batch each request was decoded in (its mean decode-step batch,
# from `request_steps`). The client-side TPOT includes host gaps and streaming, so it sits above
# the decode step time.

# %%
tpot = t.pl(
    """SELECT run_id, r.batch_size, m.tpot_s * 1e3 AS tpot_ms, s.decode_batch_reqs_mean AS decode_batch
       FROM request_metrics m JOIN request_steps s USING (run_id, engine_req_id) JOIN runs r USING (run_id)
       WHERE m.ok AND m.tpot_s IS NOT NULL"""
)
alt.Chart(tpot).mark_circle(size=30, opacity=0.6).encode(
    x=alt.X("decode_batch:Q", title="mean requests in the request's decode steps"),
    y=alt.Y("tpot_ms:Q", title="TPOT (ms)"),
    color=alt.Color("batch_size:O", title="run batch size"),
).properties(width=480, height=240)

# %% [markdown]
# ## GPUs
#
# Runs recorded on different GPUs compare directly in `run_metrics` (each is analysed with its own
# GPU's bandwidth and peak). With traces from one GPU only, this is a single group.

# %%
t.pl(
    """SELECT gpu, count(*) AS runs, min(batch_size) AS min_batch, max(batch_size) AS max_batch,
              avg(s_mbu) AS s_mbu_mean, max(window_output_throughput) AS best_output_tok_per_s
       FROM run_metrics WHERE phase = 'all' GROUP BY gpu ORDER BY gpu"""
)

# %% [markdown]
# ## What if these runs were on an H200?
#
# Re-targeting (`tables(paths, gpu="H200")`, or `moecap-analyze --gpu H200`) keeps every measured
# step (its bytes, FLOPs and time) and swaps the GPU constants. S-MBU on the H200 therefore answers
# "what fraction of an H200's bandwidth would these step times use", and scales by the bandwidth
# ratio.
#
# To project *times* we can replay each step's bytes and FLOPs on the other GPU's roofline,
# keeping the fraction of the roofline the measured run achieved: projected time =
# measured time × roofline(H200) / roofline(measured GPU), with roofline = max(bytes / bandwidth,
# FLOPs / peak). This simple projection assumes the achieved fraction carries over and ignores the
# host gap (which does not shrink on a faster GPU).

# %%
h200 = tables(paths, gpu="H200")
retargeted = h200.pl(
    "SELECT run_id, gpu, s_mbu AS s_mbu_h200, s_mfu AS s_mfu_h200 FROM run_metrics WHERE phase = 'all'"
).join(overview.select("run_id", "batch_size", s_mbu_measured="s_mbu"), on="run_id")
display(retargeted.sort("batch_size"))

target = resolve_gpu("H200")
projection = t.pl(
    f"""SELECT r.batch_size, count(*) AS decode_steps,
               avg(m.time_s) * 1e3 AS measured_ms,
               avg(m.time_s * greatest(m.bytes_total / {target.memory_bandwidth!r}, m.flops_total / {target.peak_flops("bf16")!r})
                   / greatest(m.bytes_total / m.gpu_bandwidth, m.flops_total / m.gpu_peak_flops)) * 1e3 AS projected_h200_ms
        FROM window_steps m JOIN runs r USING (run_id)
        WHERE m.phase = 'decode'
        GROUP BY r.batch_size ORDER BY r.batch_size"""
).with_columns(speedup=pl.col("measured_ms") / pl.col("projected_h200_ms"))
display(projection)

# %%
alt.Chart(
    projection.unpivot(
        index="batch_size", on=["measured_ms", "projected_h200_ms"], variable_name="gpu", value_name="ms"
    )
).mark_bar().encode(
    x=alt.X("batch_size:O", title="run batch size"),
    xOffset="gpu:N",
    y=alt.Y("ms:Q", title="mean decode step (ms)"),
    color="gpu:N",
).properties(width=420, height=220)

# %% [markdown]
# `moecap.analyze.whatif` (the `moecap-analyze whatif` command) does this properly: it fits each
# run's achieved roofline plus a fixed per-step overhead, re-times every step on the target, and
# carries the new step times through to request latency (TTFT, TPOT) and cost. Its decode step
# times should sit close to the simple projection above.

# %%
from moecap.analyze.cost import load_cost_settings  # noqa: E402
from moecap.analyze.whatif import whatif  # noqa: E402

projected = whatif(t.analysis, [target], load_cost_settings())
pl.DataFrame(
    [
        {
            "batch_size": run["batch_size"],
            "decode_step_ms_projected": run["targets"][target.name]["models"]["projection"]["phases"][
                "decode"
            ]["step_time_s_mean"]
            * 1e3,
            "tpot_ms_mean_projected": (
                run["targets"][target.name]["models"]["projection"]
                .get("requests", {})
                .get("tpot_s", {})
                .get("mean")
                or float("nan")
            )
            * 1e3,
        }
        for run in projected["runs"]
        if "error" not in run  # runs without expert counts cannot be projected
    ]
).sort("batch_size")

# %%
h200.close()
t.close()
