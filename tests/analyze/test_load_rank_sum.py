"""Ranks that each counted only their own share of the expert counts (`counts_scope` `sum_over_ranks`:
SGLang under DeepEP and its dump importer's `--sum-ranks`): the analyzer sums their counts element-wise
by (step, layer, expert) before any summary, keeps the batch composition of the lowest TP rank, and says
what it could not sum. Plain TP duplicates (`replicated`) still count once.

The traces are written with the project's own writer; every expected number is worked out by hand in
the test (tiny layouts: 2 MoE layers x 4 experts, top-2)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from moecap.analyze.checks import check_run, tp_count_agreement
from moecap.analyze.load import load_traces
from moecap.analyze.load import ranks as load_ranks
from moecap.schemas import (
    EngineInfo,
    ModelInfo,
    MoEInfo,
    Parallelism,
    RunMetadata,
    TraceWriter,
    read_trace_file,
    trace_file_name,
)

L, E, K = 2, 4, 2  # MoE layers, experts, top-k
RUN_ID = "20261204T000000Z-sglang-deepep-0000"


def meta(tp: int, ranks: int, scope: str = "sum_over_ranks", num_experts: int = E) -> RunMetadata:
    return RunMetadata(
        run_id=RUN_ID,
        engine=EngineInfo(name="sglang", version="0.5.23"),
        model=ModelInfo(id="tiny/moe", config={"model_type": "qwen2_moe"}),
        moe=MoEInfo(layer_ids=list(range(L)), num_experts=num_experts, top_k=K),
        parallelism=Parallelism(tp=ranks, ep=ranks),
        extra={"sglang": {"counts_scope": scope, "moe_a2a_backend": "deepep"}},
    ).with_rank(tp=tp, ep=tp)


def step_row(step: int, phase: str, tokens: list[int]) -> dict:
    """A steps row of len(tokens) requests computing `tokens[r]` tokens each (1 ms per step)."""
    t = 1_000_000 * (step + 1)
    return {
        "step": step,
        "t_start_ns": t,
        "t_end_ns": t + 900_000,
        "gpu_start_ns": t,
        "gpu_end_ns": t + 900_000,
        "phase": phase,
        "is_draft": False,
        "num_reqs": len(tokens),
        "num_tokens": sum(tokens),
        "req_ids": [f"r{i}" for i in range(len(tokens))],
        "req_prefix_lens": [0] * len(tokens),
        "req_new_tokens": tokens,
        "req_num_logits": [1] * len(tokens),
        "req_spec_tokens": None,
    }


def write_rank(
    out: Path,
    run: RunMetadata,
    steps: list[dict],
    counts: dict[int, list[list[int]]],
    *,
    rows_per_batch: int = 256,
) -> tuple[Path, Path]:
    """A rank's steps + experts files; counts: step -> [layer][expert]."""
    out.mkdir(parents=True, exist_ok=True)
    s_path, e_path = out / trace_file_name(run, "steps"), out / trace_file_name(run, "experts")
    with TraceWriter(s_path, "steps", run) as w:
        w.write_rows(steps)
    with TraceWriter(e_path, "experts", run, rows_per_batch=rows_per_batch) as w:
        w.write_rows([{"step": s, "counts": [v for layer in c for v in layer]} for s, c in counts.items()])
    return s_path, e_path


# Three steps of 3, 2 and 2 tokens; two ranks, each routing its own tokens (top-2 on 2 layers).
STEPS = [step_row(0, "prefill", [3]), step_row(1, "decode", [1, 1]), step_row(2, "decode", [1, 1])]
RANK0 = {
    0: [[2, 2, 0, 0], [1, 1, 1, 1]],  # 2 tokens: layer 0 experts {0, 1}
    1: [[1, 0, 0, 1], [0, 1, 1, 0]],  # 1 token
    2: [[0, 0, 2, 2], [2, 0, 0, 2]],  # both tokens of the step
}
RANK1 = {
    0: [[0, 1, 1, 0], [0, 0, 1, 1]],  # 1 token: layer 0 experts {1, 2}
    1: [[1, 0, 0, 1], [1, 1, 0, 0]],  # 1 token, layer 0 the same experts as rank 0
    2: [[0, 0, 0, 0], [0, 0, 0, 0]],  # no token of this step on rank 1
}
# By hand: RANK0 + RANK1, element by element.
SUM = {
    0: [[2, 3, 1, 0], [1, 1, 2, 2]],
    1: [[2, 0, 0, 2], [1, 2, 1, 0]],
    2: [[0, 0, 2, 2], [2, 0, 0, 2]],
}
# Experts with >= 1 token, per layer, of the SUM: step 0: 3 + 4, step 1: 2 + 3, step 2: 2 + 2.
# (Adding each rank's own activated experts would give step 0: (2 + 4) + (2 + 2) = 10.)
ACTIVE = {0: 7, 1: 5, 2: 4}


def two_ranks(out: Path, scope: str = "sum_over_ranks") -> None:
    write_rank(out, meta(0, 2, scope), STEPS, RANK0)
    write_rank(out, meta(1, 2, scope), STEPS, RANK1)


def expert_tokens(db) -> dict[tuple[int, int, int], int]:
    rows = db.sql("SELECT step, layer, expert, tokens FROM expert_tokens").fetchall()
    return {(s, layer, e): int(t) for s, layer, e, t in rows}


def as_cells(counts: dict[int, list[list[int]]]) -> dict[tuple[int, int, int], int]:
    return {
        (s, layer, e): v for s, c in counts.items() for layer, row in enumerate(c) for e, v in enumerate(row)
    }


def test_two_ranks_shares_are_summed_element_wise_before_every_summary(tmp_path):
    two_ranks(tmp_path / "t")
    db = load_traces([tmp_path / "t"], cache_dir=tmp_path / "c")
    assert not db.errors and db.warnings == []
    assert expert_tokens(db) == as_cells(SUM)
    # One row per step in the expert views, with the recording rank's identity (joins steps).
    assert db.sql("SELECT DISTINCT tp, ep FROM experts").fetchall() == [(0, 0)]
    stats = db.sql(
        "SELECT step, active_experts, routed_tokens FROM expert_step_stats ORDER BY step"
    ).fetchall()
    assert [(s, a) for s, a, _ in stats] == sorted(ACTIVE.items())
    # Σ tokens per layer = scheduled tokens x top_k, over the sum (3, 2, 2 tokens; 2 layers).
    assert [r for _, _, r in stats] == [3 * K * L, 2 * K * L, 2 * K * L]
    per_layer = db.sql(
        "SELECT step, layer, sum(tokens) FROM expert_tokens GROUP BY step, layer ORDER BY step, layer"
    ).fetchall()
    assert [t for _, _, t in per_layer] == [3 * K, 3 * K, 2 * K, 2 * K, 2 * K, 2 * K]
    # Imbalance of step 0 (max x E / tokens per layer): layer 0 3*4/6 = 2, layer 1 2*4/6 = 4/3.
    (mean, top) = db.sql(
        "SELECT imbalance_mean, imbalance_max FROM expert_step_stats WHERE step = 0"
    ).fetchall()[0]
    assert mean == pytest.approx((2 + 4 / 3) / 2) and top == pytest.approx(2)
    # Totals per phase: prefill = step 0's sum; decode = steps 1 + 2; expert 3 of layer 0 in prefill
    # got no token from either rank (a dead expert shows as a zero row).
    totals = {
        (p, layer, e): (int(t), int(a))
        for p, layer, e, t, a in db.sql(
            "SELECT phase, layer, expert, tokens, active_steps FROM expert_totals"
        ).fetchall()
    }
    assert totals[("prefill", 0, 3)] == (0, 0)
    assert totals[("prefill", 0, 1)] == (3, 1)
    assert totals[("decode", 0, 3)] == (2 + 2, 2) and totals[("decode", 1, 1)] == (2 + 0, 1)
    assert sum(t for (p, _, _), (t, _) in totals.items() if p == "decode") == (2 + 2) * K * L
    # Steps from one rank: three rows, not six.
    assert db.sql("SELECT count(*), sum(num_tokens), min(tp), max(tp) FROM steps").fetchall() == [
        (3, 7, 0, 0)
    ]
    run = db.runs[RUN_ID]
    (summed,) = run.summed
    assert summed.summed_ranks == [0, 1] and summed.rows == 3 and summed.steps_left_out == 0
    assert tp_count_agreement(db, run) == []  # shares differ by design: not TP duplicates
    assert check_run(db, run) == []  # counts of the sum = num_tokens x top_k x layers


def test_four_ranks_with_overlapping_and_disjoint_experts(tmp_path):
    out = tmp_path / "t"
    steps = [step_row(0, "prefill", [4]), step_row(1, "decode", [1, 1, 1, 1])]
    # One token per rank and step (top-2 on 2 layers); step 1 layer 1: all four ranks pick experts {0, 1}.
    shares = [
        {0: [[1, 1, 0, 0], [0, 0, 1, 1]], 1: [[1, 0, 1, 0], [1, 1, 0, 0]]},
        {0: [[0, 1, 1, 0], [0, 0, 1, 1]], 1: [[1, 0, 1, 0], [1, 1, 0, 0]]},
        {0: [[0, 0, 1, 1], [1, 0, 0, 1]], 1: [[0, 1, 0, 1], [1, 1, 0, 0]]},
        {0: [[1, 0, 0, 1], [0, 1, 1, 0]], 1: [[0, 1, 0, 1], [1, 1, 0, 0]]},
    ]
    for tp, counts in enumerate(shares):
        write_rank(out, meta(tp, 4), steps, counts)
    db = load_traces([out], cache_dir=tmp_path / "c")
    assert db.warnings == []
    want = {
        0: [[2, 2, 2, 2], [1, 1, 3, 3]],
        1: [[2, 2, 2, 2], [4, 4, 0, 0]],
    }
    assert expert_tokens(db) == as_cells(want)
    # Activated per layer of the sum: step 0: 4 + 4, step 1: 4 + 2 (per rank and added: 16 and 16).
    stats = db.sql("SELECT step, active_experts FROM expert_step_stats ORDER BY step").fetchall()
    assert stats == [(0, 8), (1, 6)]
    assert db.sql("SELECT sum(tokens) FROM expert_totals").fetchall()[0][0] == (4 + 4) * K * L


def test_a_replicated_tp_pair_still_counts_once(tmp_path):
    write_rank(tmp_path / "t", meta(0, 2, "replicated"), STEPS, RANK0)
    write_rank(tmp_path / "t", meta(1, 2, "replicated"), STEPS, RANK0)
    db = load_traces([tmp_path / "t"], cache_dir=tmp_path / "c")
    assert db.warnings == [] and db.runs[RUN_ID].summed == []
    assert expert_tokens(db) == as_cells(RANK0)  # not doubled
    stats = db.sql("SELECT step, active_experts FROM expert_step_stats ORDER BY step").fetchall()
    assert stats == [(0, 2 + 4), (1, 2 + 2), (2, 2 + 2)]
    assert tp_count_agreement(db, db.runs[RUN_ID]) == []


def test_ranks_that_disagree_on_the_scope_are_left_out_not_guessed(tmp_path):
    write_rank(tmp_path / "t", meta(0, 2), STEPS, RANK0)
    write_rank(tmp_path / "t", meta(1, 2, "replicated"), STEPS, RANK1)
    db = load_traces([tmp_path / "t"], cache_dir=tmp_path / "c")
    (line,) = db.warnings
    assert "disagree on counts_scope (replicated, sum_over_ranks)" in line and "left out of the views" in line
    assert db.sql("SELECT count(*) FROM expert_step_stats").fetchall() == [(0,)]
    with pytest.raises(Exception, match="disagree on counts_scope"):
        load_traces([tmp_path / "t"], cache_dir=tmp_path / "c", strict=True)


def test_metadata_without_a_scope_is_the_tp_duplicate_rule(tmp_path):
    for tp in (0, 1):
        run = dataclasses.replace(meta(tp, 2), extra={})
        write_rank(tmp_path / "t", run, STEPS, RANK0)
    db = load_traces([tmp_path / "t"], cache_dir=tmp_path / "c")
    assert expert_tokens(db) == as_cells(RANK0)


def test_a_rank_missing_a_step_is_left_out_of_the_sum_and_said(tmp_path):
    out = tmp_path / "t"
    write_rank(out, meta(0, 2), STEPS, RANK0)
    _, experts = write_rank(out, meta(1, 2), STEPS, RANK1, rows_per_batch=1)
    data = experts.read_bytes()
    experts.write_bytes(data[: len(data) - 20])  # the last batch (step 2) and the end marker lost
    assert [r["step"] for r in read_trace_file(experts).table.to_pylist()] == [0, 1]
    db = load_traces([out], cache_dir=tmp_path / "c")
    (line,) = [w for w in db.warnings if "summed" in w]
    assert "summed over 2 ranks (tp0, tp1) on 2 step(s)" in line
    assert "1 step(s) lack some rank's counts and are left out" in line
    assert "tp1 lacks 1 (steps 2..2, its experts file is truncated)" in line
    # Steps 0 and 1 are full sums; step 2 is not in the expert views (rank 0's share alone would
    # under-count it), though it stays a step.
    assert expert_tokens(db) == as_cells({s: SUM[s] for s in (0, 1)})
    assert db.sql("SELECT step FROM expert_step_stats ORDER BY step").fetchall() == [(0,), (1,)]
    assert db.sql("SELECT count(*) FROM steps").fetchall()[0][0] == 3
    assert db.runs[RUN_ID].summed[0].steps_left_out == 1
    with pytest.raises(Exception, match="truncated"):
        load_traces([out], cache_dir=tmp_path / "c", strict=True)


@pytest.mark.parametrize("raw", [True, False])
def test_a_rank_without_an_experts_file_leaves_every_step_out(tmp_path, raw):
    out = tmp_path / "t"
    write_rank(out, meta(0, 2), STEPS, RANK0)
    _, experts1 = write_rank(out, meta(1, 2), STEPS, RANK1)
    experts1.unlink()
    db = load_traces([out], cache_dir=tmp_path / "c", expert_counts=raw)
    (line,) = [w for w in db.warnings if "summed" in w]
    assert "3 step(s) lack some rank's counts" in line and "tp1 lacks 3 (no experts file)" in line
    assert db.sql("SELECT count(*) FROM expert_step_stats").fetchall()[0][0] == 0


def test_fewer_ranks_than_the_run_has_are_flagged(tmp_path):
    out = tmp_path / "t"
    write_rank(out, meta(0, 4), STEPS, RANK0)
    write_rank(out, meta(1, 4), STEPS, RANK1)
    db = load_traces([out], cache_dir=tmp_path / "c")
    (line,) = db.warnings
    assert "4 ranks per (dp, pp) (tp 4 / dp 1), but the files of 2 were loaded (tp0, tp1)" in line
    assert expert_tokens(db) == as_cells(SUM)  # what there is, summed
    write_rank(tmp_path / "one", meta(0, 2), STEPS, RANK0)  # one rank's files of two
    (line,) = load_traces([tmp_path / "one"], cache_dir=tmp_path / "c").warnings
    assert "the run has 2 ranks per (dp, pp) (tp 2 / dp 1), but the files of 1 were loaded (tp0)" in line


def test_attention_dp_ranks_of_one_rank_each_are_separate_streams(tmp_path):
    """Attention DP without attention TP: every (dp, pp) has one rank, whose share is its own steps'
    counts: nothing to add, nothing missing."""
    out = tmp_path / "t"
    for dp, counts in enumerate((RANK0, RANK1)):
        run = meta(dp, 2)
        run = dataclasses.replace(run, parallelism=Parallelism(tp=2, dp=2, ep=2, attention_dp=True))
        write_rank(out, run.with_rank(dp=dp, tp=dp), STEPS, counts)
    db = load_traces([out], cache_dir=tmp_path / "c", expert_counts=False)
    assert db.warnings == [] and db.runs[RUN_ID].summed == []
    stats = db.sql("SELECT dp, step, active_experts FROM expert_step_stats ORDER BY dp, step").fetchall()
    # Rank 0: 2 + 4, 2 + 2, 2 + 2; rank 1: 2 + 2, 2 + 2, 0 + 0 experts with a token.
    assert stats == [(0, 0, 6), (0, 1, 4), (0, 2, 4), (1, 0, 4), (1, 1, 4), (1, 2, 0)]


def test_ranks_whose_steps_disagree_are_flagged(tmp_path):
    out = tmp_path / "t"
    write_rank(out, meta(0, 2), STEPS, RANK0)
    other = [dict(r) for r in STEPS]
    other[1] = step_row(1, "mixed", [1, 1])
    other[2] = step_row(2, "decode", [1, 2])
    write_rank(out, meta(1, 2), other, RANK1)
    db = load_traces([out], cache_dir=tmp_path / "c")
    (line,) = db.warnings
    assert (
        "tp1's steps differ from tp0's in phase or num_tokens on 2 of 3 common step(s) (first: step 1)"
        in line
    )
    assert db.sql("SELECT step, phase FROM steps ORDER BY step").fetchall() == [
        (0, "prefill"),
        (1, "decode"),
        (2, "decode"),
    ]
    assert expert_tokens(db) == as_cells(SUM)


def test_the_sum_is_cached_and_keyed_by_every_ranks_file(tmp_path):
    out = tmp_path / "t"
    two_ranks(out)
    first = load_traces([out], cache_dir=tmp_path / "c")
    assert not first.runs[RUN_ID].summed[0].from_cache
    second = load_traces([out], cache_dir=tmp_path / "c")
    assert second.runs[RUN_ID].summed[0].from_cache and expert_tokens(second) == as_cells(SUM)
    # Rank 1 rewritten (its share of step 2 now one token on experts 0 and 1 of both layers): the
    # rank-0 file is unchanged, the sum is not.
    changed = dict(RANK1)
    changed[2] = [[1, 1, 0, 0], [1, 1, 0, 0]]
    write_rank(out, meta(1, 2), STEPS, changed)
    third = load_traces([out], cache_dir=tmp_path / "c")
    assert not third.runs[RUN_ID].summed[0].from_cache
    assert expert_tokens(third)[(2, 0, 0)] == 0 + 1 and expert_tokens(third)[(2, 1, 0)] == 2 + 1
    stats = dict(third.sql("SELECT step, active_experts FROM expert_step_stats").fetchall())
    assert stats[2] == 4 + 3  # layer 0 {0, 1, 2, 3}, layer 1 {0, 1, 3}


def test_a_metrics_only_load_still_sums(tmp_path):
    two_ranks(tmp_path / "t")
    db = load_traces([tmp_path / "t"], cache_dir=tmp_path / "c", expert_counts=False)
    assert db.sql("SELECT count(*) FROM experts").fetchall()[0][0] == 0  # raw views skipped
    stats = db.sql("SELECT step, active_experts FROM expert_step_stats ORDER BY step").fetchall()
    assert stats == sorted(ACTIVE.items())
    full = load_traces([tmp_path / "t"], cache_dir=tmp_path / "c")  # raw counts asked for later
    assert expert_tokens(full) == as_cells(SUM)


def test_many_steps_in_any_order_sum_in_bounded_blocks(tmp_path, monkeypatch):
    """Random shares over 40 steps, one rank's rows in shuffled order, summed in blocks of 3 steps:
    the sums are numpy's."""
    rng = np.random.default_rng(7)
    n_steps, ranks = 40, 3
    shares = rng.integers(0, 4, size=(ranks, n_steps, L, E))
    shares[1, 5] = 0  # a step without a token on rank 1
    tokens = shares.sum(axis=(0, 3))[:, 0]  # per step, layer 0's tokens summed over ranks (top_k aside)
    steps = [step_row(s, "decode", [int(tokens[s])]) for s in range(n_steps)]
    out = tmp_path / "t"
    for tp in range(ranks):
        order = rng.permutation(n_steps) if tp == 2 else np.arange(n_steps)
        counts = {int(s): shares[tp, s].tolist() for s in order}
        write_rank(out, meta(tp, ranks), steps, counts, rows_per_batch=4)
    monkeypatch.setattr(load_ranks, "SUM_BLOCK_VALUES", 3 * L * E)
    db = load_traces([out], cache_dir=tmp_path / "c")
    total = shares.sum(axis=0)
    got = db.sql("SELECT step, counts FROM experts ORDER BY step").fetchall()
    assert [s for s, _ in got] == list(range(n_steps))
    assert np.array_equal(np.array([c for _, c in got]).reshape(n_steps, L, E), total)
    stats = db.sql("SELECT active_experts FROM expert_step_stats ORDER BY step").fetchall()
    assert [a for (a,) in stats] == (total > 0).sum(axis=(1, 2)).tolist()


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    code = "from moecap.analyze.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


def test_cli_metrics_reflect_the_sum_over_ranks(tmp_path):
    """A synthetic Qwen1.5-MoE run whose every count is split into two ranks' shares: metrics.json's
    expert metrics are those of the whole counts, and it says they were summed over 2 ranks."""
    from synthetic_traces import SimConfig, simulate_run

    whole = tmp_path / "whole"
    simulate_run(whole, SimConfig(num_requests=6, concurrency=3))
    steps = read_trace_file(next(whole.glob("*.steps.arrow")))
    experts = read_trace_file(next(whole.glob("*.experts.arrow")))
    n_layers, n_experts = len(experts.run.moe.layer_ids), experts.run.moe.num_experts
    counts = np.asarray(pc.list_flatten(experts.table.column("counts"))).reshape(experts.num_rows, -1)
    share0 = np.random.default_rng(3).binomial(counts, 0.5).astype(np.int32)
    shares = [share0, counts - share0]
    split = tmp_path / "split"
    for tp, share in enumerate(shares):
        run = dataclasses.replace(
            steps.run,
            engine=EngineInfo(name="sglang", version="0.5.23"),
            parallelism=Parallelism(tp=2, ep=2),
            extra={"sglang": {"counts_scope": "sum_over_ranks"}},
        ).with_rank(tp=tp, ep=tp)
        with TraceWriter(split / trace_file_name(run, "steps"), "steps", run) as w:
            w.write_rows(steps.table.to_pylist())
        with TraceWriter(split / trace_file_name(run, "experts"), "experts", run) as w:
            step_col = experts.table.column("step").combine_chunks()
            w.write_batch(pa.record_batch({"step": step_col, "counts": list(share)}))
    r = _cli(split, "--out", tmp_path / "out", "--window", "all", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (run_doc,) = doc["runs"]
    assert run_doc["expert_counts"]["stages"] == [
        {
            "dp": 0,
            "pp": 0,
            "ranks_summed": 2,
            "tp_ranks": [0, 1],
            "steps_summed": experts.num_rows,
            "steps_left_out": 0,
        }
    ]
    allm = run_doc["metrics"]["steps"]["all"]
    per_step = (counts.reshape(-1, n_layers, n_experts) > 0).sum(axis=(1, 2))
    assert allm["activated_experts_per_step_mean"] == pytest.approx(per_step.mean())
    added = sum((s.reshape(-1, n_layers, n_experts) > 0).sum(axis=(1, 2)) for s in shares)
    assert added.mean() > per_step.mean() * 1.05  # what adding per rank would have claimed
    assert allm["s_mbu"] is not None
    # Expert statistics are those of the whole counts: the same as analysing the unsplit run.
    r = _cli(whole, "--out", tmp_path / "out_whole", "--window", "all", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    whole_doc = json.loads((tmp_path / "out_whole" / "metrics.json").read_text())["runs"][0]
    assert run_doc["metrics"]["experts"] == whole_doc["metrics"]["experts"]
    assert allm["bytes_routed_experts"] == pytest.approx(
        whole_doc["metrics"]["steps"]["all"]["bytes_routed_experts"]
    )


def test_imported_sglang_dumps_with_sum_ranks_are_summed(tmp_path):
    torch = pytest.importorskip("torch")
    config = {
        "_name_or_path": "tiny/moe",
        "model_type": "qwen2_moe",
        "num_hidden_layers": 3,
        "num_experts": E,
        "num_experts_per_tok": K,
        "mlp_only_layers": [0],  # layer 0 dense: MoE layers 1 and 2
    }
    identity = torch.arange(E, dtype=torch.int64).repeat(3, 1)  # physical expert i = logical i
    # Per rank and pass: [decoder layer][expert] of that rank's own tokens (dense layer 0 empty).
    passes = {
        0: {7: [[0] * 4, [1, 1, 0, 0], [0, 1, 1, 0]], 8: [[0] * 4, [1, 0, 0, 1], [0, 0, 1, 1]]},
        1: {7: [[0] * 4, [0, 1, 1, 0], [1, 0, 0, 1]], 8: [[0] * 4, [0, 0, 1, 1], [1, 1, 0, 0]]},
    }
    dumps = []
    for rank, by_pass in passes.items():
        records = [
            {
                "forward_pass_id": fid,
                "rank": rank,
                "gatherer_key": "primary",
                "global_physical_count": torch.tensor(c, dtype=torch.int32),
            }
            for fid, c in by_pass.items()
        ]
        path = tmp_path / f"expert_distribution_recorder_1.5_{rank}.pt"
        torch.save({"records": records, "last_physical_to_logical_map": identity}, path)
        dumps.append(path)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    cli = "import sys; from moecap.collect.cli import main; sys.argv = ['moecap-collect', *sys.argv[1:]]; main()"
    done = subprocess.run(
        [sys.executable, "-c", cli, "import-sglang-dump", *map(str, dumps), "--model-config", str(cfg),
         "--sum-ranks", "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    db = load_traces([tmp_path / "out"], cache_dir=tmp_path / "c")
    # By hand, rank 0 + rank 1 per pass and MoE layer (decoder layers 1, 2).
    want = {
        7: [[1, 2, 1, 0], [1, 1, 1, 1]],
        8: [[1, 0, 1, 2], [1, 1, 1, 1]],
    }
    got = {(s, layer - 1, e): t for (s, layer, e), t in expert_tokens(db).items()}
    assert got == as_cells(want)
    assert db.sql("SELECT step, active_experts FROM expert_step_stats ORDER BY step").fetchall() == [
        (7, 3 + 4),
        (8, 3 + 4),
    ]
    # A per_pass dump has no batch composition: every rank's steps carry the pass's tokens, the sum of
    # the ranks' shares (counts / top_k: one token per rank and pass), so the ranks' steps agree.
    assert not [w for w in db.warnings if "differ" in w or "summed" in w]
    assert db.sql("SELECT step, num_tokens FROM steps ORDER BY step").fetchall() == [(7, 1 + 1), (8, 1 + 1)]


def test_imported_ranks_with_unequal_token_shares_carry_the_pass_total(tmp_path):
    """Where the dumps' ranks routed different numbers of tokens in a pass, the pass's tokens are the sum
    of the shares (1 + 3), in every rank's steps: the summed counts reconcile with them."""
    torch = pytest.importorskip("torch")
    from moecap.collect.engines.sglang.dump import import_sglang_dumps

    config = {"model_type": "qwen2_moe", "num_hidden_layers": 1, "num_experts": E, "num_experts_per_tok": K}
    identity = torch.arange(E, dtype=torch.int64).repeat(1, 1)
    shares = {0: [[1, 1, 0, 0]], 1: [[2, 1, 1, 2]]}  # 1 token on rank 0, 3 on rank 1
    dumps = []
    for rank, c in shares.items():
        record = {"forward_pass_id": 3, "rank": rank, "gatherer_key": "primary",
                  "global_physical_count": torch.tensor(c, dtype=torch.int32)}  # fmt: skip
        path = tmp_path / f"expert_distribution_recorder_2.5_{rank}.pt"
        torch.save({"records": [record], "last_physical_to_logical_map": identity}, path)
        dumps.append(path)
    import_sglang_dumps(dumps, tmp_path / "out", model_config=config, sum_ranks=True)
    db = load_traces([tmp_path / "out"], cache_dir=tmp_path / "c")
    assert expert_tokens(db) == as_cells({3: [[3, 2, 1, 2]]})
    assert db.sql("SELECT routed_tokens FROM expert_step_stats").fetchall() == [((1 + 3) * K,)]
    assert db.sql("SELECT num_tokens FROM steps").fetchall() == [(1 + 3,)]
    assert not [w for w in db.warnings if "differ" in w]
    from moecap.analyze.checks import check_run

    assert check_run(db, next(iter(db.runs.values()))) == []
