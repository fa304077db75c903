"""End-to-end: the moecap-analyze commands on real trace files, in a subprocess like a user."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _cli(*args, cwd=None):
    code = "from moecap.analyze.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_summary_prints_and_writes_metrics_json(synthetic_run, tmp_path):
    trace, truth = synthetic_run
    r = _cli(trace, "--out", tmp_path / "out", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert "S-MBU" in r.stdout and "requests: 16/16 ok" in r.stdout
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert doc["schema"] == "moecap.metrics/1" and doc["formula"] == "moecap"
    run = doc["runs"][0]
    assert run["window"]["kind"] == "steady"
    total = run["metrics"]["steps"]["all"]
    # Steady state: steps with at least 90 % of the 4 concurrent requests.
    assert total["steps"] == sum(1 for s in truth["steps"] if s["num_reqs"] >= 4) < len(truth["steps"])
    assert 0 < total["s_mbu"] < 1 and 0 < total["s_mfu"] < 1
    assert (tmp_path / "out" / "step_metrics.parquet").exists()


def test_json_output_and_window_all_counts_every_step(synthetic_run, tmp_path):
    trace, truth = synthetic_run
    r = _cli(trace, "--format", "json", "--window", "all", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    steps = doc["runs"][0]["metrics"]["steps"]
    assert steps["all"]["steps"] == len(truth["steps"])
    assert steps["all"]["tokens"] == sum(s["tokens"] for s in truth["steps"])
    by_phase = {p: v["steps"] for p, v in steps.items() if p != "all"}
    expected = {}
    for s in truth["steps"]:
        expected[s["phase"]] = expected.get(s["phase"], 0) + 1
    assert by_phase == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["/definitely/not/here.arrow"], "no such file"),
        # `sql PATHS QUERY` instead of `sql QUERY PATHS`: the query is taken for a path, too long for one
        (
            ["sql", "{trace}", "select " + "x, " * 200 + "1 from steps"],
            "not a usable path (File name too long)",
        ),
        (["{trace}", "--window", "bogus"], "--window 'bogus'"),
        (["{trace}", "--gpu", "NoSuchGPU"], "unknown GPU"),
        (["{trace}", "--formula", "nope"], "expected moecap or reference"),
    ],
)
def test_user_errors_are_one_line_without_traceback(synthetic_run, tmp_path, args, expected):
    trace, _ = synthetic_run
    r = _cli(*[a.format(trace=trace) for a in args], "--cache-dir", tmp_path / "c")
    assert r.returncode == 2
    assert expected in r.stderr and "Traceback" not in r.stderr


def test_check_passes_on_a_consistent_run_and_flags_a_damaged_one(synthetic_run, tmp_path):
    trace, _ = synthetic_run
    r = _cli("check", trace, "--cache-dir", tmp_path / "c")
    assert r.returncode == 0 and ": ok" in r.stdout, r.stdout + r.stderr
    steps_file = next(trace.glob("*.steps.arrow"))
    data = steps_file.read_bytes()
    steps_file.write_bytes(data[: len(data) // 2])
    r = _cli("check", trace, "--cache-dir", tmp_path / "c")
    assert r.returncode == 1
    assert "truncated" in r.stdout


def test_retargeting_to_a_faster_gpu_lowers_smbu_by_the_bandwidth_ratio(synthetic_run, tmp_path):
    trace, _ = synthetic_run
    h100 = json.loads(_cli(trace, "--format", "json", "--cache-dir", tmp_path / "c").stdout)
    h200 = json.loads(_cli(trace, "--format", "json", "--gpu", "H200", "--cache-dir", tmp_path / "c").stdout)
    a = h100["runs"][0]["metrics"]["steps"]["all"]["s_mbu"]
    b = h200["runs"][0]["metrics"]["steps"]["all"]["s_mbu"]
    assert b == pytest.approx(a * 3.35 / 4.8, rel=1e-9)  # datasheet bandwidths, TB/s


def test_accuracy_and_client_engine_join_in_metrics_json(synthetic_run, tmp_path):
    """gsm8k-format outputs are scored into metrics.json; client rows join the engine's steps."""
    from moecap.schemas import TraceWriter, read_trace_file

    trace, _ = synthetic_run
    outputs = next(trace.glob("*.outputs.arrow"))
    run = read_trace_file(outputs).run
    answers = ["The answer is #### 42", "so 7 apples #### 7", "#### 3", "I think 5"]
    refs = ["42", "7", "4", "5"]
    outputs.unlink()
    with TraceWriter(outputs, "outputs", run) as w:
        for i in range(16):
            w.write(
                {
                    "req_id": f"req-{i}",
                    "dataset": "gsm8k",
                    "prompt": "q",
                    "output": answers[i % 4],
                    "reference": refs[i % 4],
                }
            )
    doc = json.loads(_cli(trace, "--format", "json", "--cache-dir", tmp_path / "c").stdout)
    metrics = doc["runs"][0]["metrics"]
    acc = metrics["accuracy"]
    # Per group of four: 42 ok, 7 ok, 3 vs 4 wrong, "I think 5" has no #### but the last number is 5.
    assert acc["total"] == 16
    assert acc["correct"] == 12 and acc["exact_match"] == pytest.approx(0.75)
    join = metrics["requests"]["client_engine_join"]
    assert join["requests"] == 16 and join["joined"] == 16
    assert join["arrival_to_first_step_s_mean"] >= 0


def test_reference_formula_on_a_trace_reduces_steps_to_moecap_records(synthetic_run, tmp_path):
    trace, truth = synthetic_run
    r = _cli(trace, "--formula", "reference", "--format", "json", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)["runs"][0]
    bm = run["batch_metrics"]
    # The H100 in the trace resolves to the reference's own key, so its bandwidth table applies.
    assert run["constants"]["gpu_raw_type"] == "NVIDIA-H100-HBM3-80GB"
    assert 0 < bm["decoding_smbu"] < 1 and bm["tpot"] > 0
    # The reference treats every non-prefill pass (our decode and mixed steps) as decode; tpot = the
    # mean of their latencies; the latency we hand it is the GPU span (step time minus host time).
    decode_times = [s["time_s"] for s in truth["steps"] if s["phase"] != "prefill"]
    assert bm["tpot"] == pytest.approx(sum(decode_times) / len(decode_times) - 0.002, rel=1e-3)


def _rewrite_table(path, edit):
    """Rewrite a trace file with moecap's writer (same run metadata; batches carry their checksums),
    its table passed through `edit`."""
    from moecap.schemas import TraceWriter, read_trace_file

    trace = read_trace_file(path)
    table = edit(trace.table)
    path.unlink()
    with TraceWriter(path, trace.table_kind, trace.run) as w:
        for batch in table.to_batches():
            w.write_batch(batch)


def _rewrite_output_tokens(path, change):
    """Rewrite a requests file (same schema and metadata) with `change(req_id, output_tokens)` applied."""
    import pyarrow as pa

    def edit(table):
        i = table.schema.get_field_index("output_tokens")
        new = [change(r, n) for r, n in zip(table.column("req_id").to_pylist(), table.column(i).to_pylist())]
        return table.set_column(i, table.schema.field(i), pa.array(new, type=table.schema.field(i).type))

    _rewrite_table(path, edit)


def test_check_tells_one_decode_past_the_end_apart_from_other_token_mismatches(synthetic_run, tmp_path):
    """A request recorded with one output token fewer than the steps scheduled for it looks like an
    engine that ran one decode past its last token (SGLang's overlap scheduler); three fewer is not that."""
    trace, _ = synthetic_run
    req_file = next(trace.glob("*.requests.arrow"))
    import pyarrow as pa

    with pa.memory_map(str(req_file)) as src:
        ids = pa.ipc.open_stream(src).read_all().column("req_id").to_pylist()
    one_past, off_by_three = set(ids[:2]), ids[2]
    _rewrite_output_tokens(
        req_file, lambda r, n: n - 1 if r in one_past else n - 3 if r == off_by_three else n
    )
    r = _cli("check", trace, "--cache-dir", tmp_path / "c")
    assert r.returncode == 1, r.stdout + r.stderr
    flat = " ".join(r.stdout.split())
    assert "2 request(s) scheduled exactly one token more than prompt + output - 1 - cached" in flat
    assert (
        f"1 request(s) whose scheduled tokens differ from prompt + output - 1 - cached (first: {off_by_three})"
        in flat
    )


def test_check_flags_a_step_whose_tokens_do_not_match_its_requests(synthetic_run, tmp_path):
    trace, _ = synthetic_run
    steps_file = next(trace.glob("*.steps.arrow"))
    import pyarrow as pa

    def edit(table):
        i = table.schema.get_field_index("num_tokens")
        tokens = table.column(i).to_pylist()
        tokens[5] += 1  # one token more than its requests' new tokens
        return table.set_column(i, table.schema.field(i), pa.array(tokens, type=table.schema.field(i).type))

    _rewrite_table(steps_file, edit)
    r = _cli("check", trace, "--cache-dir", tmp_path / "c")
    assert r.returncode == 1
    assert "1 step(s) whose num_tokens differs from the sum of req_new_tokens" in " ".join(r.stdout.split())


def test_check_and_summary_name_a_corrupt_batch_and_strict_refuses_it(synthetic_run, tmp_path):
    """A batch the reader leaves out (here: a requests file rewritten without its checksums while its
    header still promises them) is named by `check` (exit 1) and the summary, never silently dropped."""
    import pyarrow as pa

    trace, _ = synthetic_run
    req_file = next(trace.glob("*.requests.arrow"))
    with pa.memory_map(str(req_file)) as src:
        table = pa.ipc.open_stream(src).read_all()
    with pa.OSFile(str(req_file), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    r = _cli("check", trace, "--cache-dir", tmp_path / "c")
    assert r.returncode == 1
    flat = " ".join(r.stdout.split())
    assert f"{req_file.name}: 1 corrupt record batch(es)" in flat and "checksum missing" in flat
    s = _cli(trace, "--cache-dir", tmp_path / "c")
    assert s.returncode == 0 and "checksum missing" in " ".join((s.stdout + s.stderr).split())
    strict = _cli(trace, "--strict", "--cache-dir", tmp_path / "c2")
    assert strict.returncode != 0 and "--strict refuses it" in strict.stderr
    assert "Traceback" not in strict.stderr and len(strict.stderr.strip().splitlines()) == 1


def test_check_names_a_step_that_compiled_kernels_inside_the_window(synthetic_run, tmp_path):
    """A decode step 1.2 s long among decode steps of a few ms (a Triton JIT of a new shape) is named
    by `check` with its rank and step (analyze/slow_steps.py's rule)."""
    import pyarrow as pa

    trace, _ = synthetic_run
    steps_file = next(trace.glob("*.steps.arrow"))
    step_key = None

    def edit(table):
        nonlocal step_key
        decode = [i for i, p in enumerate(table.column("phase").to_pylist()) if p == "decode"]
        slow = decode[len(decode) // 2]
        step_key = table.column("step")[slow].as_py()
        for name in ("gpu_end_ns", "t_end_ns"):
            i = table.schema.get_field_index(name)
            col = table.column(i).to_pylist()
            if col[slow] is not None:
                col[slow] += 1_200_000_000
            table = table.set_column(i, table.schema.field(i), pa.array(col, type=table.schema.field(i).type))
        return table

    _rewrite_table(steps_file, edit)
    r = _cli("check", trace, "--cache-dir", tmp_path / "c")
    flat = " ".join(r.stdout.split())
    # A note about the measurement, not a disagreement of the tables: exit 0, and 1 under --strict.
    assert r.returncode == 0 and "ok, 1 note(s)" in flat
    assert "note: 1 step(s) took >= 10x their phase's median" in flat
    assert f"step {step_key} (decode" in flat
    strict = _cli("check", trace, "--strict", "--cache-dir", tmp_path / "c")
    assert strict.returncode == 1 and "note: 1 step(s)" in " ".join(strict.stdout.split())
    as_json = json.loads(_cli("check", trace, "--format", "json", "--cache-dir", tmp_path / "c").stdout)
    (run,) = as_json["runs"]
    assert run["findings"] == [] and len(run["notes"]) == 1 and f"step {step_key}" in run["notes"][0]
