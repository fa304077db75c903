"""A two-TP-rank run gets the per-rank view in its report section (and single-rank runs do not)."""

from __future__ import annotations

from synthetic_traces import SimConfig, simulate_run

from moecap.analyze.pipeline import Options, analyze_paths
from moecap.analyze.report.figures import report_sections
from moecap.schemas import TraceWriter, read_trace_file, trace_file_name


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
