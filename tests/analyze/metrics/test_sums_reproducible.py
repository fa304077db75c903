"""Ratio-of-sums metrics are exact and independent of row order (metrics/steps.py `exact_sum`).

DuckDB adds rows on several threads in whatever order they arrive; a sum of doubles then differs in
its last bits from one analysis to the next. Every sum is taken in fixed point as integers, so the
same steps give bit-identical run metrics: analysed twice, and with the window's rows shuffled.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from metrics_helpers import analysis, engine_like_trace

from moecap.analyze.metrics.steps import summary_rows
from moecap.analyze.sql.views import define_run_views

STEPS = 3000  # 12 record batches of 256 engine steps: prefill, mixed and decode steps


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    engine_like_trace(root / "trace", STEPS)
    return root


def _run_steps(doc):
    (run,) = doc["runs"]
    return run["metrics"]["steps"]


def test_two_analyses_give_bit_identical_run_metrics(engine_run):
    a = analysis([engine_run / "trace"], engine_run / "cache-a", window="steady")
    b = analysis([engine_run / "trace"], engine_run / "cache-b", window="steady")
    assert _run_steps(a.document) == _run_steps(b.document)  # == on floats: every bit
    define_run_views(a.db.con)
    define_run_views(b.db.con)
    assert (
        a.db.con.sql("SELECT * FROM run_metrics ORDER BY phase").fetchall()
        == b.db.con.sql("SELECT * FROM run_metrics ORDER BY phase").fetchall()
    )


def test_permuted_rows_give_bit_identical_sums_equal_to_an_exactly_rounded_sum(engine_run):
    an = analysis([engine_run / "trace"], engine_run / "cache-p")
    rows = an.db.con.sql("SELECT * FROM window_steps").to_arrow_table()
    # Forty copies (120k rows: several DuckDB scan tasks), in three different orders.
    tiled = pa.concat_tables([rows] * 40).combine_chunks()
    results = []
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(tiled.num_rows)
        an.db.con.register("shuffled", tiled.take(pa.array(order)))
        results.append(summary_rows(an.db.con, "(SELECT * FROM shuffled)"))
    assert results[0] == results[1] == results[2]
    # Independent value: S-MBU over the steps that computed tokens from math.fsum (a correctly
    # rounded sum), the run's bandwidth from run_settings.
    ((bw,),) = an.db.con.sql("SELECT gpu_bandwidth FROM run_settings").fetchall()
    cols = tiled.to_pydict()
    computed = [i for i, n in enumerate(cols["num_tokens"]) if n > 0]
    smbu = math.fsum(cols["bytes_total"][i] for i in computed) / (
        bw * math.fsum(cols["time_s"][i] * cols["gpus"][i] for i in computed)
    )
    (run,) = results[0].values()
    assert run["all"]["s_mbu"] == pytest.approx(smbu, rel=1e-15)
    assert run["all"]["gpu_busy_s"] == pytest.approx(math.fsum(cols["time_s"]), rel=1e-15)
