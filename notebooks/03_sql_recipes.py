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
# # SQL recipes
#
# The trace views answer most questions in one query. This notebook runs the documented example
# queries (`docs/sql.md`; the tests check each against the raw trace files) and a few more
# patterns: parameters, Polars LazyFrames, restricting expert counts to some steps, and exporting.
# Every query here runs unchanged from the shell: `moecap-analyze sql "…" traces/`, or
# interactively in `moecap-analyze shell traces/`.

# %%
import tempfile
from pathlib import Path

import polars as pl
from _traces import trace_paths  # beside the notebooks: traces/*.arrow, or synthetic runs
from IPython.display import Markdown, display

from moecap.analyze import tables
from moecap.analyze.sql import EXAMPLES, VIEWS

pl.Config.set_tbl_width_chars(160)
pl.Config.set_tbl_rows(12)
t = tables(trace_paths())

# %% [markdown]
# ## The views
#
# What one row of each view is (columns and units: `docs/sql.md`, or `DESCRIBE view` here).

# %%
pl.DataFrame({"view": list(VIEWS), "one row is": [v.grain for v in VIEWS.values()]})

# %% [markdown]
# ## The documented examples
#
# Each is shown with its SQL and the first rows of its result.

# %%
for example in EXAMPLES:
    display(Markdown(f"### {example.title}\n\n{example.description}\n\n```sql\n{example.sql.strip()}\n```"))
    display(t.pl(example.sql).head(8))

# %% [markdown]
# ## Parameters instead of string formatting
#
# `?` placeholders keep run ids (and anything else user-supplied) out of the SQL text.

# %%
run_id = t.pl("SELECT run_id FROM runs ORDER BY batch_size DESC LIMIT 1")["run_id"][0]
t.pl(
    """SELECT phase, count(*) AS steps, avg(num_reqs) AS batch_mean, sum(num_tokens)::BIGINT AS tokens
       FROM steps WHERE run_id = ? GROUP BY phase ORDER BY phase""",
    [run_id],
)

# %% [markdown]
# ## Polars LazyFrames over the same views
#
# `t.lazy(view)` is evaluated by DuckDB on `collect()`, with the frame's column selection and
# filters pushed into the query, so nothing outside them is read. Frames join freely.

# %%
steps = t.lazy("steps").select("run_id", "dp", "step", "num_reqs", "req_prefix_lens")
metrics = (
    t.lazy("step_metrics")
    .filter(pl.col("phase") == "decode")
    .select("run_id", "dp", "step", "time_s", "bytes_kv_read")
)
(
    steps.join(metrics, on=["run_id", "dp", "step"])
    .with_columns(context=pl.col("req_prefix_lens").list.sum())
    .group_by("run_id")
    .agg(
        decode_steps=pl.len(),
        corr_kv_bytes_time=pl.corr("bytes_kv_read", "time_s"),
        mean_context_tokens=pl.col("context").mean(),
    )
    .sort("run_id")
    .collect()
)

# %% [markdown]
# ## Expert counts of some steps only
#
# `expert_totals` sums whole phases; `expert_tokens` is the per-step long form, computed only when
# queried, with filters on run and step pushed into the scan before the counts are unnested. Here:
# the hottest expert of every layer during the ten slowest decode steps of one run, against the
# run's overall hottest expert of that layer.

# %%
t.pl(
    """WITH slow AS (
           SELECT run_id, dp, pp, tp, step FROM step_metrics
           WHERE run_id = ? AND phase = 'decode' ORDER BY time_s DESC LIMIT 10
       ), slow_load AS (
           SELECT e.layer, e.expert, sum(e.tokens) AS tokens
           FROM expert_tokens e JOIN slow USING (run_id, dp, pp, tp, step)
           GROUP BY e.layer, e.expert
       ), overall AS (
           SELECT layer, arg_max(expert, tokens) AS hottest_overall FROM expert_totals WHERE run_id = ? GROUP BY layer
       )
       SELECT layer, arg_max(expert, tokens) AS hottest_in_slow_steps,
              (max(tokens) / sum(tokens))::DOUBLE AS its_share, any_value(o.hottest_overall) AS hottest_overall
       FROM slow_load JOIN overall o USING (layer)
       GROUP BY layer ORDER BY layer""",
    [run_id, run_id],
)

# %% [markdown]
# ## A request's life in steps
#
# Unnesting `steps.req_ids` follows one request through the batches it was computed in: its
# prompt chunks, then one token per decode step, next to everything else in the batch.

# %%
req = t.pl(
    "SELECT engine_req_id FROM request_metrics WHERE run_id = ? ORDER BY e2e_s DESC LIMIT 1", [run_id]
)[0, 0]
t.pl(
    """SELECT step, phase, num_reqs, num_tokens, new_tokens, prefix_len, round(time_s * 1e3, 3) AS time_ms
       FROM (SELECT run_id, dp, pp, tp, step, phase, num_reqs, num_tokens,
                    unnest(req_ids) AS rid, unnest(req_new_tokens) AS new_tokens, unnest(req_prefix_lens) AS prefix_len
             FROM steps WHERE run_id = ?)
       JOIN step_metrics USING (run_id, dp, pp, tp, step, phase, num_reqs, num_tokens)
       WHERE rid = ? ORDER BY step""",
    [run_id, req],
)

# %% [markdown]
# ## Exporting
#
# A relation writes itself to Parquet or CSV without passing through Python (the CLI's `--out`
# does the same). The files keep the view's columns, for Spark, Trino or another DuckDB.

# %%
out = Path(tempfile.mkdtemp(prefix="moecap-sql-recipes-"))
t.sql("SELECT * FROM request_metrics").write_parquet(str(out / "request_metrics.parquet"))
t.sql("SELECT * FROM window_steps").write_csv(str(out / "window_steps.csv"))
pl.DataFrame(
    {
        "file": [p.name for p in sorted(out.iterdir())],
        "bytes": [p.stat().st_size for p in sorted(out.iterdir())],
    }
)

# %%
t.close()
