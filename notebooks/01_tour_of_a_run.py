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
# # A tour of one run
#
# One benchmark run, from the headline numbers down to single steps and experts: what the
# utilisation metrics say (S-MBU, S-MFU), where the time went, how the requests fared, and how the
# router spread tokens over experts. Everything comes from the SQL views of `moecap.analyze`
# (`docs/sql.md` documents them), so every number here is one query away from the command line:
# `moecap-analyze sql "…" traces/`.

# %%
import altair as alt
import polars as pl
from _traces import trace_paths  # beside the notebooks: traces/*.arrow, or synthetic runs
from IPython.display import display

from moecap.analyze import tables

alt.data_transformers.disable_max_rows()
pl.Config.set_tbl_width_chars(140)

t = tables(trace_paths())
runs = t.pl(
    "SELECT run_id, model_id, engine, gpu_name, num_gpus, batch_size FROM runs ORDER BY batch_size DESC, run_id"
)
display(runs)

# %% [markdown]
# We look at one run: by default the one with the largest batch size (set `RUN_ID` to pick another).

# %%
RUN_ID = None
run_id = RUN_ID or runs["run_id"][0]
doc = next(r for r in t.document["runs"] if r["run_id"] == run_id)
print(run_id)
print("window:", doc["window"].get("description", doc["window"]["kind"]))
print(
    "GPU constants:",
    doc["constants"]["gpu"]["name"],
    f"{doc['constants']['gpu']['memory_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s,",
    f"{doc['constants']['gpu']['peak_flops_dense'] / 1e12:.0f} TFLOP/s dense ({doc['constants']['gpu']['peak_dtype']})",
)
for w in doc["warnings"]:
    print("warning:", w)

# %% [markdown]
# ## Headline step metrics
#
# `run_metrics` is the step section of metrics.json as a table: one row per phase plus `all`, over
# the run's metrics window (by default the steady state, where the batch is at least 90 % full).
# S-MBU is a ratio of sums, Σ bytes / (bandwidth × Σ GPU time), so long steps weigh more than short ones.

# %%
t.pl(
    """SELECT phase, steps, tokens, round(s_mbu, 4) AS s_mbu, round(s_mfu, 4) AS s_mfu,
              round(step_time_s_mean * 1e3, 3) AS step_ms_mean, round(gpu_busy_fraction, 3) AS gpu_busy,
              round(activated_experts_per_layer_mean, 1) AS experts_per_layer
       FROM run_metrics WHERE run_id = ? ORDER BY phase = 'all', phase""",
    [run_id],
)

# %% [markdown]
# The same S-MBU from the per-step rows: `window_steps` holds exactly the steps the run-level
# numbers are computed over; the metric layer's SQL (`moecap.analyze.metrics.steps`) runs over any
# slice of them — here the whole window again (never re-type the ratio: idle steps have rules).

# %%
from moecap.analyze.metrics.steps import summary_rows  # noqa: E402

check = summary_rows(t.con, "(SELECT * FROM window_steps WHERE run_id = ?)", params=[run_id])[run_id]["all"][
    "s_mbu"
]
print(f"S-MBU from window_steps: {check:.6f}   metrics.json: {doc['metrics']['steps']['all']['s_mbu']:.6f}")

# %% [markdown]
# ## Step time against work
#
# Decode steps are memory-bound: their time follows the bytes moved (weights of the activated
# experts plus the KV cache read), not the tokens. Prefill and mixed steps carry many tokens and
# climb towards the compute roof. A sample of at most 3,000 steps is plotted.

# %%
steps = t.pl(
    """SELECT step, phase, num_tokens, num_reqs, time_s * 1e3 AS time_ms, bytes_total / 1e9 AS gbytes,
              s_mbu, active_experts
       FROM step_metrics WHERE run_id = ? AND time_s > 0
       USING SAMPLE reservoir(3000 ROWS) REPEATABLE (7)""",
    [run_id],
)
base = (
    alt.Chart(steps)
    .mark_circle(size=24, opacity=0.6)
    .encode(
        color=alt.Color("phase:N"), tooltip=["step", "phase", "num_reqs", "num_tokens", "time_ms", "s_mbu"]
    )
)
(
    base.encode(
        x=alt.X("num_tokens:Q", title="tokens in step"), y=alt.Y("time_ms:Q", title="GPU time (ms)")
    ).properties(width=320, height=240)
    | base.encode(
        x=alt.X("gbytes:Q", title="GB moved"), y=alt.Y("time_ms:Q", title="GPU time (ms)")
    ).properties(width=320, height=240)
)

# %% [markdown]
# ## Where the time went
#
# GPU-busy time (the CUDA-event span of each step) against the host gap between steps. A large
# host share means the engine, not the GPU, limits throughput: S-MBU is then low for a reason
# that has nothing to do with the kernels.

# %%
accounting = t.pl(
    """SELECT phase, count(*) AS steps, sum(time_s) AS gpu_busy_s, sum(host_gap_s) AS host_gap_s,
              sum(time_s) / sum(wall_s) AS gpu_busy_fraction
       FROM step_metrics WHERE run_id = ? GROUP BY phase ORDER BY phase""",
    [run_id],
)
display(accounting)
long = accounting.unpivot(
    index="phase", on=["gpu_busy_s", "host_gap_s"], variable_name="kind", value_name="seconds"
)
alt.Chart(long).mark_bar().encode(
    y=alt.Y("phase:N"), x=alt.X("seconds:Q", stack="zero"), color=alt.Color("kind:N")
).properties(width=480, height=120)

# %% [markdown]
# ## Requests
#
# Per-request latency from the client clock (`request_metrics`), with the batch each request was
# decoded in (`request_steps`). TPOT is (E2E − TTFT) / (output tokens − 1).

# %%
requests = t.pl(
    """SELECT r.req_id, r.ttft_s * 1e3 AS ttft_ms, r.tpot_s * 1e3 AS tpot_ms, r.e2e_s, r.output_tokens,
              s.decode_batch_reqs_mean, s.decode_steps
       FROM request_metrics r LEFT JOIN request_steps s USING (run_id, engine_req_id)
       WHERE r.run_id = ? AND r.ok""",
    [run_id],
)
display(
    requests.select(
        pl.len().alias("requests"),
        *(
            pl.col(c).quantile(q).alias(f"{c}_p{int(q * 100)}")
            for c in ("ttft_ms", "tpot_ms")
            for q in (0.5, 0.9, 0.99)
        ),
    )
)
cdf = (
    requests.unpivot(on=["ttft_ms", "tpot_ms"], variable_name="metric", value_name="ms")
    .drop_nulls()
    .with_columns(fraction=((pl.col("ms").rank("ordinal").over("metric")) / pl.len().over("metric")))
)
alt.Chart(cdf).mark_line(interpolate="step-after").encode(
    x=alt.X("ms:Q", title="latency (ms)"),
    y=alt.Y("fraction:Q", title="fraction of requests"),
    color="metric:N",
).properties(width=480, height=220)

# %% [markdown]
# ## Experts
#
# Share of each layer's routed tokens per expert (`expert_totals`, summed while the trace was
# converted, so this is cheap even for long runs). Bright cells are hot experts; a dark column is
# an expert the router rarely picks in that layer.

# %%
shares = t.pl(
    """SELECT layer, expert, sum(tokens)::BIGINT AS tokens,
              sum(tokens) / sum(sum(tokens)) OVER (PARTITION BY layer) AS share
       FROM expert_totals WHERE run_id = ? GROUP BY layer, expert""",
    [run_id],
)
alt.Chart(shares).mark_rect().encode(
    x=alt.X("expert:O", axis=alt.Axis(labels=False, ticks=False)),
    y=alt.Y("layer:O"),
    color=alt.Color("share:Q", scale=alt.Scale(scheme="viridis")),
    tooltip=["layer", "expert", "tokens", alt.Tooltip("share:Q", format=".3f")],
).properties(width=560, height=300)

# %% [markdown]
# Load imbalance (max / mean expert load per layer, averaged over layers) over the run, binned by
# step. In a memory-bound decode step a more concentrated routing activates fewer distinct experts
# and so moves fewer bytes: the next plot shows that trade-off directly.

# %%
per_step = t.pl(
    """SELECT m.step, m.phase, m.num_reqs, m.time_s * 1e3 AS time_ms, e.imbalance_mean,
              e.active_experts / r.num_moe_layers AS experts_per_layer
       FROM step_metrics m
       JOIN expert_step_stats e USING (run_id, dp, pp, tp, step)
       JOIN runs r USING (run_id)
       WHERE m.run_id = ? AND m.phase = 'decode'""",
    [run_id],
)
binned = (
    per_step.with_columns(bin=(pl.col("step") // max(1, per_step.height // 200)))
    .group_by("bin")
    .agg(step=pl.col("step").min(), imbalance=pl.col("imbalance_mean").mean())
)
(
    alt.Chart(binned)
    .mark_line()
    .encode(x="step:Q", y=alt.Y("imbalance:Q", title="max/mean load"))
    .properties(width=300, height=200)
    | alt.Chart(per_step)
    .mark_circle(size=18, opacity=0.5)
    .encode(
        x=alt.X("experts_per_layer:Q", title="activated experts per layer", scale=alt.Scale(zero=False)),
        y=alt.Y("time_ms:Q", title="decode step time (ms)", scale=alt.Scale(zero=False)),
        color="num_reqs:O",
    )
    .properties(width=300, height=200)
)

# %%
t.close()
