"""A two-TP-rank run gets the per-rank view in its report section (and single-rank runs do not); ranks
whose expert counts are summed show as summed shares, not as TP duplicates that disagree."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from synthetic_traces import SimConfig, simulate_run

from moecap.analyze.load import load_traces
from moecap.analyze.pipeline import Options, analyze_paths
from moecap.analyze.report.figures import report_sections
from moecap.analyze.report.ranks import rank_agreement_chart, rank_frame, rank_table
from moecap.schemas import EngineInfo, TraceWriter, read_trace_file, trace_file_name


def test_tp_run_section_has_the_rank_view_and_single_rank_does_not(tmp_path):
    simulate_run(tmp_path / "t", SimConfig())
    for kind in ("steps", "experts"):
        tf = read_trace_file(next((tmp_path / "t").glob(f"*.{kind}.arrow")))
        twin = tf.run.with_rank(tp=1)
        with TraceWriter(tmp_path / "t" / trace_file_name(twin, kind), kind, twin) as w:
            w.write_rows(tf.table.to_pylist())
    analysis = analyze_paths([tmp_path / "t"], Options(), cache_dir=tmp_path / "c")
    (run_section,) = [s for s in report_sections(analysis) if s.run_id is not None]
    titles = [f.title for f in run_section.figures]
    assert "Ranks" in titles
    note = next(n for n in run_section.notes if "steps agree" in n)
    steps = tf.num_rows
    assert f"{steps}/{steps}" in note or str(steps) in note

    simulate_run(tmp_path / "one", SimConfig())
    single = analyze_paths([tmp_path / "one"], Options(), cache_dir=tmp_path / "c")
    (one,) = [s for s in report_sections(single) if s.run_id is not None]
    assert "Ranks" not in [f.title for f in one.figures]


def test_ranks_of_a_sum_are_summed_shares_with_their_own_routed_tokens(tmp_path):
    simulate_run(tmp_path / "one", SimConfig(num_requests=4, concurrency=2))
    steps = read_trace_file(next((tmp_path / "one").glob("*.steps.arrow")))
    experts = read_trace_file(next((tmp_path / "one").glob("*.experts.arrow")))
    counts = np.asarray(pc.list_flatten(experts.table.column("counts"))).reshape(experts.num_rows, -1)
    shares = [counts // 2, counts - counts // 2]
    out = tmp_path / "t"
    for tp, share in enumerate(shares):
        run = dataclasses.replace(
            steps.run,
            engine=EngineInfo(name="sglang", version="0.5.23"),
            extra={"sglang": {"counts_scope": "sum_over_ranks"}},
        ).with_rank(tp=tp)
        with TraceWriter(out / trace_file_name(run, "steps"), "steps", run) as w:
            w.write_rows(steps.table.to_pylist())
        with TraceWriter(out / trace_file_name(run, "experts"), "experts", run) as w:
            step_col = experts.table.column("step").combine_chunks()
            w.write_batch(pa.record_batch({"step": step_col, "counts": list(share.astype(np.int32))}))
    db = load_traces([out], cache_dir=tmp_path / "c")
    frame = rank_frame(db, steps.run.run_id)
    assert frame["summed"].to_list() == [True, True]
    assert frame["recording"].to_list() == [True, False]  # steps still come from tp0
    assert frame["routed_tokens"].to_list() == [int(shares[0].sum()), int(shares[1].sum())]
    assert frame["expert_steps"].to_list() == [experts.num_rows] * 2
    assert frame["steps_agreeing"].to_list() == [None, None]  # shares differ by design
    assert rank_table(frame)["role"].to_list() == ["summed share"] * 2
    assert rank_agreement_chart(frame).to_dict()
