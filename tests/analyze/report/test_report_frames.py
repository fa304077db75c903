"""Chart frames: aggregated from the views without losing or inventing tokens, steps or requests,
and bounded in size by their arguments, not by the trace."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import RUNS

from moecap.analyze.report import frames as F

RUN = RUNS[1][0]  # c4, with expert counts
NO_COUNTS = RUNS[3][0]


def test_expert_shares_sum_to_one_per_layer_and_keep_every_token(analysis):
    shares = F.expert_share_frame(analysis.db, RUN)
    per_layer = shares.group_by("phase", "layer").agg(pl.col("share").sum())
    assert np.allclose(per_layer["share"].to_numpy(), 1.0)
    total = analysis.db.con.execute(
        "SELECT sum(tokens) FROM expert_totals WHERE run_id = ?", [RUN]
    ).fetchall()[0][0]
    assert shares["tokens"].sum() == total > 0
    # Every (layer, expert) of a phase is present, dead experts as zeros: 24 layers x 60 experts.
    assert shares.group_by("phase").len()["len"].to_list() == [24 * 60] * shares["phase"].n_unique()
    assert shares["phase"].unique(maintain_order=True).to_list()[0] == "prefill"


def test_runs_without_expert_counts_give_empty_expert_frames(analysis):
    assert F.expert_share_frame(analysis.db, NO_COUNTS).is_empty()
    assert F.expert_load_frame(analysis.db, NO_COUNTS).is_empty()


def test_layer_imbalance_by_hand():
    shares = pl.DataFrame(
        {
            "phase": ["decode"] * 4,
            "layer": [0] * 4,
            "expert": [0, 1, 2, 3],
            "tokens": [3, 1, 0, 0],
            "share": [0.75, 0.25, 0.0, 0.0],
        }
    )
    row = F.layer_imbalance_frame(shares, num_experts=4).row(0, named=True)
    assert row["imbalance"] == pytest.approx(3.0)  # max 3 / mean 1
    assert row["dead_experts"] == 2
    assert row["cv"] == pytest.approx(np.std([3, 1, 0, 0]) / 1.0)
    # Experts absent from the frame count as dead when num_experts says they exist.
    assert F.layer_imbalance_frame(shares, num_experts=8).row(0, named=True)["imbalance"] == pytest.approx(
        6.0
    )


def test_expert_load_bins_sum_to_the_expert_totals(analysis):
    """Reading counts by list index (no unnest) picks the right (layer, expert) column."""
    load = F.expert_load_frame(analysis.db, RUN, top_n=5, bins=7)
    assert load["expert_label"].n_unique() == 5
    assert load["bin"].n_unique() <= 7
    totals = analysis.db.con.sql(
        "SELECT layer, expert, sum(tokens) AS tokens FROM expert_totals WHERE run_id = ? GROUP BY ALL",
        params=[RUN],
    ).pl()
    got = load.group_by("layer", "expert").agg(pl.col("tokens").sum())
    joined = got.join(totals, on=["layer", "expert"], suffix="_totals")
    assert joined.height == 5
    assert joined["tokens"].to_list() == joined["tokens_totals"].to_list()
    # The hottest pairs: no other (layer, expert) has more tokens than the fifth.
    assert totals.sort("tokens", descending=True)["tokens"][4] <= joined["tokens"].min()
    assert ((load["share"].drop_nulls() >= 0) & (load["share"].drop_nulls() <= 1)).all()


@pytest.mark.parametrize("max_points", [10, 1500])
def test_step_frame_keeps_every_step_and_is_bounded(analysis, max_points):
    steps = F.step_frame(analysis.db, RUN, max_points=max_points)
    n = analysis.db.con.execute(
        "SELECT count(*) FROM step_metrics WHERE run_id = ? AND NOT is_draft AND time_s > 0", [RUN]
    ).fetchall()[0][0]
    assert steps["steps"].sum() == n
    phases = steps["phase"].n_unique()
    assert steps.height <= max(10, max_points // phases) * phases
    assert (steps["tokens_min"] <= steps["tokens"]).all() and (steps["tokens"] <= steps["tokens_max"]).all()
    # The roofline bound never exceeds what the steps measured on this synthetic GPU (60 % of peak BW).
    assert (steps["memory_bound_ms"] < steps["time_ms"]).all()


def test_timeline_ratio_of_sums_matches_the_document(analysis):
    tl = F.timeline_frame(analysis.db, RUN, bins=1)
    assert tl.height == 1
    doc_all = analysis.db.con.execute(
        "SELECT sum(bytes_total) / (any_value(gpu_bandwidth) * sum(time_s * gpus)) FROM step_metrics "
        "WHERE run_id = ? AND NOT is_draft AND time_s > 0",
        [RUN],
    ).fetchall()[0][0]
    assert tl["s_mbu"][0] == pytest.approx(doc_all)
    many = F.timeline_frame(analysis.db, RUN, bins=20)
    assert many.height <= 20 and many["steps"].sum() == tl["steps"][0]
    assert ((many["in_window"] >= 0) & (many["in_window"] <= 1)).all()
    assert (many["t_end_s"] > many["t_start_s"]).all()


def test_timeline_smbu_is_null_without_expert_counts(analysis):
    tl = F.timeline_frame(analysis.db, NO_COUNTS, bins=5)
    assert tl.height and tl["s_mbu"].null_count() == tl.height and tl["s_mfu"].null_count() == 0


def test_latency_cdfs_are_monotone_end_at_one_and_are_reduced(analysis):
    labels = F.run_labels(analysis)
    lat = F.latency_cdf_frame(analysis.db, labels, points=8)
    assert set(lat["metric"].unique()) == {"TTFT", "TPOT", "ITL"}
    for (_run, _metric), g in lat.group_by("run", "metric"):
        assert g.height <= 12  # 12 requests: exact CDF (<= 12 points) or 8 quantiles
        assert (g["cdf"].diff().drop_nulls() >= 0).all() and g["cdf"][-1] == pytest.approx(1.0)
        assert (g["value_ms"].diff().drop_nulls() >= 0).all()
    # Under `points` requests the CDF is exact: the sorted TTFTs of the successful requests.
    exact = F.latency_cdf_frame(analysis.db, {RUN: "r"}, points=100).filter(pl.col("metric") == "TTFT")
    req = analysis.db.con.sql(
        "SELECT (first_token_ns - arrival_ns) / 1e6 AS ms FROM requests WHERE run_id = ? AND error IS NULL",
        params=[RUN],
    ).pl()
    assert exact["value_ms"].to_list() == pytest.approx(sorted(req["ms"].to_list()))


def test_runs_frame_reads_cost_and_accuracy_when_present_and_nulls_otherwise(analysis):
    import dataclasses

    ids = analysis.run_ids
    accuracy = pl.DataFrame(
        {"run_id": ids[:2], "exact_match": [0.75, 0.5], "correct": [3.0, 1.0], "total": [4.0, 2.0]}
    )
    costs = analysis.costs.filter(pl.col("run_id") != ids[2]).with_columns(
        usd_per_1m_output_tokens=pl.when(pl.col("run_id") == ids[1])
        .then(2.5)
        .otherwise(pl.col("usd_per_1m_output_tokens"))
    )
    runs = F.runs_frame(dataclasses.replace(analysis, accuracy=accuracy, costs=costs))
    assert runs.height == len(RUNS) and runs["run_id"].to_list() == ids
    assert runs["accuracy"].to_list()[:3] == [0.75, 0.5, None]
    assert runs["cost_usd_per_m_output_tokens"][1] == 2.5
    assert runs["cost_usd_per_m_output_tokens"][2] is None
    assert runs["window_output_throughput"].null_count() == 0


def test_section_frames_take_exact_match_or_correct_over_total():
    from moecap.analyze.pipeline import _section_frames

    def run(rid, accuracy, cost):
        return {"run_id": rid, "metrics": {"requests": {"requests": 0}, "accuracy": accuracy, "cost": cost}}

    frames = _section_frames(
        [
            run("a", {"correct": 3, "total": 4}, {"usd_per_1m_output_tokens": 2.0}),
            run("b", {"exact_match": 0.5, "correct": 1, "total": 2}, {"error": "no GPU spec"}),
            run("c", None, {"usd_per_1m_output_tokens": 1.0, "band_usd_per_1m_output_tokens": [0.5, 2.0]}),
            # A rate but no output token to charge: the rate (the headline scope's) is kept.
            run(
                "d",
                None,
                {
                    "headline_scope": "run",
                    "scopes": {"window": {"usd_per_hour": 9.0}, "run": {"usd_per_hour": 7.2}},
                },
            ),
        ]
    )
    assert frames["accuracy"].select("run_id", "exact_match").rows() == [("a", 0.75), ("b", 0.5)]
    assert frames["cost"].rows() == [
        ("a", 2.0, None, None, None),
        ("c", 1.0, 0.5, 2.0, None),
        ("d", None, None, None, 7.2),
    ]


def test_run_labels_are_unique_and_short(analysis):
    labels = F.run_labels(analysis)
    assert len(set(labels.values())) == len(labels)
    assert all("bs " in v for v in labels.values())
