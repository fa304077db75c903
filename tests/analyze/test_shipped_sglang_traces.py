"""The SGLang traces in traces/ (recorded on an H200 with SGLang 0.5.16, see traces/README.md): they read
back whole, their counts satisfy the per-pass invariant, and `check` reconciles the `run` trace's
requests with its steps under SGLang's overlap scheduler."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecap.analyze import checks
from moecap.analyze.load import load_traces
from moecap.schemas.reader import read_trace_file

TRACES = Path(__file__).resolve().parents[2] / "traces"
RUN = "20261204T044925Z-sglang-Qwen1.5-MoE-A2.7B-10a9"
VALIDATE = "sglang-validate-experts-1796360011"
SERVE = "sglang-serve-1796393507"
"""`moecap-collect serve --engine sglang` + `moecap-collect drive`, stopped with SIGINT (run 4)."""


def _files(prefix: str) -> list[Path]:
    files = sorted(TRACES.glob(f"{prefix}.*.arrow"))
    assert files, f"{prefix}: not in traces/"
    return files


@pytest.mark.parametrize("prefix", [RUN, VALIDATE, SERVE])
def test_files_end_with_the_end_of_stream_marker(prefix):
    """The schedulers closed their files before SGLang's shutdown killed them."""
    for f in _files(prefix):
        assert read_trace_file(f).complete, f.name


@pytest.mark.parametrize("prefix", [RUN, VALIDATE, SERVE])
def test_every_pass_counts_its_real_tokens_times_top_k_in_every_layer(tmp_path, prefix):
    db = load_traces(_files(prefix), cache_dir=tmp_path)
    top_k = db.runs[next(iter(db.runs))].metadata.moe.top_k
    rows = db.sql(
        f"""SELECT count(*) AS steps,
                   count(*) FILTER (WHERE e.per_layer IS NULL) AS without_counts,
                   count(*) FILTER (WHERE e.lo <> s.num_tokens * {top_k} OR e.hi <> s.num_tokens * {top_k}) AS bad
            FROM steps s LEFT JOIN (
                SELECT step, min(t) AS lo, max(t) AS hi, count(*) AS per_layer
                FROM (SELECT step, layer, sum(tokens) AS t FROM expert_tokens GROUP BY step, layer) GROUP BY step
            ) e USING (step)"""
    ).fetchall()
    steps, without_counts, bad = rows[0]
    assert steps > 200 and without_counts == 0 and bad == 0
    if prefix == VALIDATE:  # batches 3 and 27 ran in CUDA graphs padded to larger buckets
        sizes = {
            r[0] for r in db.sql("SELECT DISTINCT num_reqs FROM steps WHERE phase = 'decode'").fetchall()
        }
        assert {3, 27} <= sizes


def test_check_reconciles_requests_under_the_overlap_scheduler(tmp_path, monkeypatch):
    db = load_traces(_files(RUN), cache_dir=tmp_path)
    run = next(iter(db.runs.values()))
    # The recorded fact the rule is about: every request was scheduled prompt + output tokens, one more
    # than the last sampled token needs (SGLang launched one decode past its end).
    extra = db.sql(
        """SELECT DISTINCT t.n - (r.prompt_tokens + r.output_tokens - 1 - coalesce(r.cached_prompt_tokens, 0))
           FROM requests r JOIN (SELECT rid, sum(n) AS n FROM (SELECT unnest(req_ids) AS rid,
                unnest(req_new_tokens) AS n FROM steps) GROUP BY rid) t ON t.rid = r.req_id"""
    ).fetchall()
    assert extra == [(1,)]
    assert checks.check_run(db, run) == []
    monkeypatch.setattr(checks, "decodes_one_past_the_end", lambda md: False)
    findings = checks.check_run(db, run)
    assert len(findings) == 1 and findings[0].startswith("64 request(s) scheduled exactly one token more")


def test_the_served_runs_driver_tables_join_the_servers_trace(tmp_path):
    """The driver recorded the model as the server listed it (the scratch folder of --random-weights,
    before serve named it) and engine "client"; its 64 requests join the scheduler's steps by run id.
    The one request in steps but not in requests is SGLang's own warm-up request at server start."""
    from moecap.schemas import is_driver_side

    db = load_traces(_files(SERVE), cache_dir=tmp_path)
    assert db.errors == [] and list(db.runs) == [SERVE]
    run = db.runs[SERVE]
    driver = [f.run for f in run.files if is_driver_side(f.run)]
    assert driver and all(m.model.id != run.metadata.model.id for m in driver)
    joined, missing = db.sql(
        """SELECT count(*) FILTER (WHERE s.rid IS NOT NULL), count(*) FILTER (WHERE s.rid IS NULL)
           FROM requests r LEFT JOIN (SELECT DISTINCT unnest(req_ids) AS rid FROM steps) s ON s.rid = r.req_id"""
    ).fetchall()[0]
    assert (joined, missing) == (64, 0)
    (extra,) = db.sql(
        """SELECT count(DISTINCT rid) FROM (SELECT unnest(req_ids) AS rid FROM steps)
           WHERE rid NOT IN (SELECT req_id FROM requests)"""
    ).fetchall()[0]
    assert extra == 1
    assert checks.check_run(db, run) == []
