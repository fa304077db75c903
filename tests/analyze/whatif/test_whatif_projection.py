"""What-if on synthetic traces whose step times come from a known roofline + overhead model.

The simulator (benchmarks/synthetic_traces.py) takes each step's bytes and FLOPs from the analyzer's
own per-step formulas (`step_costs`, tested elsewhere against hand-derived values), so the traces
follow t = max(B/(BW·0.6), F/(P·0.5)) + 0.4 ms exactly on the GPU span, plus 2 ms of host time per
step. The same workload simulated with the target GPU's peaks is the ground truth.

Stated tolerance: projected per-step GPU times within 0.01 % of the truth (the traces store integer
nanoseconds), request latencies and throughput within 0.1 %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import typer
from typer.testing import CliRunner

from moecap.analyze.analysis import Options
from moecap.analyze.cost import load_cost_settings
from moecap.analyze.errors import InputError
from moecap.analyze.metrics.step_costs import cost_model, step_costs
from moecap.analyze.pipeline import analyze_paths
from moecap.analyze.specs import model_spec_from_config, resolve_gpu
from moecap.analyze.whatif import TimeWarp, calibrate, compare_runs, project_times, whatif
from moecap.analyze.whatif.cli import register
from moecap.analyze.whatif.project import step_frame

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from synthetic_traces import QWEN15_MOE_CONFIG, SimConfig, TimeModel, run_metadata, simulate_run

H100 = resolve_gpu("H100")
H200 = resolve_gpu("H200")
B200 = resolve_gpu("B200")
STEP_TOL = 1e-4
METRIC_TOL = 1e-3


def _analyzer_step_cost():
    """(bytes, FLOPs) of a simulated step by the analyzer's formulas (what the what-if reads back)."""
    kv = run_metadata(SimConfig(), QWEN15_MOE_CONFIG).model.kv_bytes_per_token_per_layer
    model = cost_model(model_spec_from_config(QWEN15_MOE_CONFIG), kv_bytes_per_token_per_layer=kv)

    def cost(row):
        batch = pa.table(
            {
                "num_tokens": pa.array([row["num_tokens"]], pa.int32()),
                "num_reqs": pa.array([row["num_reqs"]], pa.int32()),
                "req_prefix_lens": pa.array([row["req_prefix_lens"]], pa.list_(pa.int32())),
                "req_new_tokens": pa.array([row["req_new_tokens"]], pa.list_(pa.int32())),
                "req_num_logits": pa.array([row["req_num_logits"]], pa.list_(pa.int16())),
            }
        )
        c = step_costs(batch, model, np.array([float(row["active_experts"])]))
        return float(c["bytes_total"][0]), float(c["flops_total"][0])

    return cost


def _time_model(gpu) -> TimeModel:
    return TimeModel(
        bandwidth=gpu.memory_bandwidth,
        peak_flops=gpu.peak_flops("bf16"),
        eff_bw=0.6,
        eff_flops=0.5,
        host_s=0.002,
        launch_s=0.0004,
    )


def _sim(out: Path, gpu, gpu_name: str, concurrency: int, tag: str):
    cfg = SimConfig(
        num_requests=16,
        concurrency=concurrency,
        prompt_len=(1000, 3000),
        output_len=16,
        token_budget=4096,
        seed=7,
        gpu_name=gpu_name,
        time_model=_time_model(gpu),
        run_id=f"20260101T000000Z-whatif-{tag}-c{concurrency}",
        step_cost=_analyzer_step_cost(),
    )
    d = out / f"{tag}-c{concurrency}"
    return d, simulate_run(d, cfg)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    out = tmp_path_factory.mktemp("whatif")
    runs = {}
    for c in (4, 8):
        runs[("h100", c)] = _sim(out, H100, "NVIDIA H100 80GB HBM3", c, "h100")
        runs[("h200", c)] = _sim(out, H200, "NVIDIA H200", c, "h200")
    runs[("b200", 8)] = _sim(out, B200, "NVIDIA B200", 8, "b200")
    return out, runs


def _analysis(paths, tmp_path, **options):
    return analyze_paths(
        [str(p) for p in paths], Options(window="all", **options), cache_dir=tmp_path / "cache"
    )


def test_simulated_workload_has_both_sides_of_the_ridge(traces, tmp_path):
    _, runs = traces
    a = _analysis([runs[("h100", 8)][0]], tmp_path)
    cal = calibrate(step_frame(a, a.contexts[0]), a.contexts[0])
    fit = cal.fits["all"]
    assert fit.bandwidth_identified and fit.flops_identified
    assert 0.05 < fit.memory_bound_fraction < 0.95
    # The fit recovers the simulator's model.
    assert fit.eta_bw == pytest.approx(0.6, rel=1e-4)
    assert fit.eta_flops == pytest.approx(0.5, rel=1e-4)
    assert fit.overhead_s == pytest.approx(4e-4, rel=1e-3)


@pytest.mark.parametrize(("target", "tag"), [(H200, "h200"), (B200, "b200")])
def test_projection_recovers_the_target_gpus_step_times(traces, tmp_path, target, tag):
    _, runs = traces
    a = _analysis([runs[("h100", 8)][0]], tmp_path)
    ctx = a.contexts[0]
    df = step_frame(a, ctx)
    cal = calibrate(df, ctx)
    projected = project_times(df, cal, target, "projection")
    truth = {s["step"]: s["gpu_time_s"] for s in runs[(tag, 8)][1]["steps"]}
    expected = np.array([truth[s] for s in df["step"].to_list()])
    assert projected == pytest.approx(expected, rel=STEP_TOL)
    # ... and the measured times are really different (the test can fail).
    assert not np.allclose(df["time_s"].to_numpy(), expected, rtol=0.05)


def test_baselines_are_what_they_say(traces, tmp_path):
    _, runs = traces
    a = _analysis([runs[("h100", 8)][0]], tmp_path)
    ctx = a.contexts[0]
    df = step_frame(a, ctx)
    cal = calibrate(df, ctx)
    t = df["time_s"].to_numpy()
    assert np.array_equal(project_times(df, cal, H200, "no_change"), t)
    ratio = project_times(df, cal, H200, "bandwidth_ratio")
    B, F = df["bytes_per_gpu"].to_numpy(), df["flops_per_gpu"].to_numpy()
    memory_bound = B / 3.35e12 >= F / 989.4e12  # nominal H100 roofline
    assert memory_bound.any() and (~memory_bound).any()
    assert ratio[memory_bound] == pytest.approx(t[memory_bound] * 3.35 / 4.8)
    assert ratio[~memory_bound] == pytest.approx(t[~memory_bound])  # same dense peak on H200
    with pytest.raises(ValueError, match="unknown what-if model"):
        project_times(df, cal, H200, "magic")


def test_time_warp_stretches_gpu_time_and_keeps_host_gaps():
    df = pl.DataFrame(
        {
            "t_start_ns": [1_000, 2_000, 4_000],
            "time_s": [600e-9, 1500e-9, 500e-9],
            "wall_s": [1000e-9, 2000e-9, 500e-9],
        }
    )
    warp = TimeWarp.from_steps(df, np.array([300e-9, 750e-9, 1000e-9]))  # GPU parts halved, then doubled
    # Step 0: [1000, 1600) GPU -> [1000, 1300); gap 400 kept -> step 1 starts at 1700.
    # Step 1: GPU 1500 -> 750, gap 500 -> step 2 at 2950; step 2: GPU 500 -> 1000, ends at 3950.
    x = np.array([500, 1000, 1300, 1600, 1800, 2000, 3500, 4000, 4250, 4500, 5000])
    assert warp(x) == pytest.approx([500, 1000, 1150, 1300, 1500, 1700, 2450, 2950, 3450, 3950, 4450])


def test_requests_and_throughput_on_the_target_match_the_simulation(traces, tmp_path):
    _, runs = traces
    src = _analysis([runs[("h100", 8)][0]], tmp_path)
    dst = _analysis([runs[("h200", 8)][0]], tmp_path)
    doc = compare_runs(src, dst, load_cost_settings())
    (pair,) = doc["comparison"]["pairs"]
    assert pair["batch_size"] == 8 and pair["target_gpu"] == "H200-SXM-141GB"
    for label, entry in pair["metrics"].items():
        if entry["measured"] is None:
            continue
        assert entry["projection_error"] == pytest.approx(0, abs=METRIC_TOL), label
    m = pair["metrics"]
    # The baselines miss: no change is the H100's time; the bandwidth ratio also scales the fixed
    # 0.4 ms launch overhead, so it predicts decode steps too fast.
    assert m["decode step time mean (s)"]["no_change_error"] > 0.2
    assert m["decode step time mean (s)"]["bandwidth_ratio_error"] < -0.01
    assert m["TPOT mean (s)"]["no_change_error"] > 0.1
    assert abs(m["prefill step time mean (s)"]["bandwidth_ratio_error"]) < 0.2
    rows = pair["decode_by_batch_size"]
    assert rows and {r["num_reqs"] for r in rows} <= set(range(1, 9))
    for r in rows:
        assert r["projection_step_time_error"] == pytest.approx(0, abs=METRIC_TOL)
        assert r["no_change_step_time_error"] > 0.2


def test_compare_pairs_runs_by_batch_size_and_summarises(traces, tmp_path):
    _, runs = traces
    src = _analysis([runs[("h100", 4)][0], runs[("h100", 8)][0]], tmp_path)
    dst = _analysis([runs[("h200", 8)][0], runs[("h200", 4)][0]], tmp_path)
    doc = compare_runs(src, dst, load_cost_settings(), [B200])
    pairs = doc["comparison"]["pairs"]
    assert [(p["batch_size"], p["source_run"][-2:], p["compare_run"][-2:]) for p in pairs] == [
        (4, "c4", "c4"),
        (8, "c8", "c8"),
    ]
    summary = doc["comparison"]["summary"]["mean_abs_error"]
    assert summary["TPOT mean (s)"]["projection"] < METRIC_TOL
    assert summary["TPOT mean (s)"]["no_change"] > 0.1
    assert summary["decode step time per batch size"]["projection"] < METRIC_TOL
    # The extra --gpu target is projected too.
    assert set(doc["runs"][0]["targets"]) == {"H200-SXM-141GB", "B200-SXM-180GB"}
    assert doc["assumptions"] and doc["comparison"]["notes"] == []


def test_unpaired_runs_are_reported(traces, tmp_path):
    _, runs = traces
    src = _analysis([runs[("h100", 4)][0]], tmp_path)
    dst = _analysis([runs[("h200", 8)][0]], tmp_path)
    doc = compare_runs(src, dst, load_cost_settings())
    assert doc["comparison"]["pairs"] == []
    notes = doc["comparison"]["notes"]
    assert any("no compare-to run" in n for n in notes) and any("not paired" in n for n in notes)


def test_whatif_document_cost_and_smbu_on_the_target(traces, tmp_path):
    _, runs = traces
    a = _analysis([runs[("h100", 8)][0]], tmp_path)
    doc = whatif(a, [H200], load_cost_settings())
    run = doc["runs"][0]
    measured, proj = run["measured"], run["targets"]["H200-SXM-141GB"]["models"]["projection"]
    # Same bytes in less time on a GPU with more bandwidth: decode S-MBU is the fitted efficiency.
    assert proj["phases"]["decode"]["s_mbu"] < measured["phases"]["decode"]["s_mbu"] <= 0.6
    # Cost on the target: its price and TDP, the projected window.
    assert proj["cost"]["gpu_price"]["value"] == 35_000
    assert proj["cost"]["usd_per_1m_output_tokens"] != measured["cost"]["usd_per_1m_output_tokens"]
    assert run["calibration"]["fits"]["all"]["flops_identified"]
    assert "same batch composition" in doc["assumptions"][0]


def test_runs_without_expert_counts_cannot_be_calibrated(tmp_path):
    cfg = SimConfig(
        num_requests=4, concurrency=2, write_experts=False, run_id="20260101T000000Z-nocounts-0000"
    )
    simulate_run(tmp_path / "t", cfg)
    a = _analysis([tmp_path / "t"], tmp_path)
    with pytest.raises(InputError, match="no expert counts"):
        whatif(a, [H200], load_cost_settings())


# -- the command ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    app.command(name="noop")(lambda: None)  # two commands, so "whatif" is a sub-command name
    return app


def test_cli_table_json_and_out(app, traces, tmp_path):
    _, runs = traces
    h100, h200 = runs[("h100", 8)][0], runs[("h200", 8)][0]
    cache = str(tmp_path / "cache")
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "whatif",
            str(h100),
            "--compare-to",
            str(h200),
            "--window",
            "all",
            "--cache-dir",
            cache,
            "--out",
            str(tmp_path / "o"),
        ],
        catch_exceptions=False,
        env={"COLUMNS": "160"},
    )
    assert res.exit_code == 0, res.output
    assert "decode step time (GPU) per batch size" in res.output and "mean |error|" in res.output
    written = json.loads((tmp_path / "o" / "whatif.json").read_text())
    assert written["comparison"]["pairs"][0]["target_gpu"] == "H200-SXM-141GB"
    res = runner.invoke(
        app,
        [
            "whatif",
            str(h100),
            "--gpu",
            "H200",
            "--format",
            "json",
            "--window",
            "all",
            "--cache-dir",
            cache,
            "--cost-model",
            "cloud",
            "--usd-per-gpu-hour",
            "H200=2.5",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    cost = doc["runs"][0]["targets"]["H200-SXM-141GB"]["models"]["projection"]["cost"]
    assert cost["model"] == "cloud" and cost["gpu_price"]["value"] == 2.5


def test_cli_needs_a_target_and_names_unknown_prices(app, traces, tmp_path):
    _, runs = traces
    runner = CliRunner()
    with pytest.raises(InputError, match="--gpu NAME"):
        runner.invoke(app, ["whatif", str(runs[("h100", 4)][0])], catch_exceptions=False)
    res = runner.invoke(
        app,
        [
            "whatif",
            str(runs[("h100", 4)][0]),
            "--gpu",
            "L40S",
            "--format",
            "json",
            "--window",
            "all",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        catch_exceptions=False,
    )
    cost = json.loads(res.output)["runs"][0]["targets"]["L40S"]["models"]["projection"]["cost"]
    assert "--gpu-price-usd L40S=USD" in cost["error"]


def test_registered_in_moecap_analyze():
    from moecap.analyze import cli

    cli._register_commands()
    assert "whatif" in {c.name for c in cli.app.registered_commands}


def test_projection_keeps_each_steps_residual():
    """Only the roofline part moves: a warm-up step's extra 0.5 s stays 0.5 s on the target."""
    from moecap.analyze.whatif import Calibration, RooflineFit

    peak = H100.peak_flops("bf16")
    fit = RooflineFit(0.5, 0.5, 1e-3, True, True, 3, 1.0, 0.0, 0.0, 1.0, H100.memory_bandwidth, peak)
    cal = Calibration(H100, "bf16", peak, {"all": fit})
    B = np.array([3.35e10, 3.35e10, 3.35e10])  # 20 ms of bytes at 50 % of the H100's 3.35 TB/s
    F = np.array([1e12, 1e12, 1e12])
    residual = np.array([0.0, 0.5, -0.002])
    t = 0.020 + 1e-3 + residual
    df = pl.DataFrame({"time_s": t, "bytes_per_gpu": B, "flops_per_gpu": F, "phase": ["decode"] * 3})
    projected = project_times(df, cal, H200, "projection")
    on_h200 = 3.35e10 / (4.8e12 * 0.5)  # the same bytes at 50 % of 4.8 TB/s
    assert projected == pytest.approx(on_h200 + 1e-3 + residual)


def test_pairing_prefers_the_closest_engine_arguments():
    from types import SimpleNamespace as NS

    from moecap.analyze.whatif import pair_runs

    def ctx(run_id, graphs, blocks):
        md = NS(
            model=NS(id="m"),
            engine=NS(name="hf", args={"use_cuda_graph": graphs, "num_blocks": blocks}),
            workload={"dataset": "d", "batch_size": 8},
        )
        return NS(run=NS(run_id=run_id, metadata=md))

    src = NS(contexts=[ctx("h100-graphs", True, 816), ctx("h100-eager", False, 816)])
    dst = NS(contexts=[ctx("h200-eager", False, 1886), ctx("h200-graphs", True, 1886)])
    pairs, notes = pair_runs(src, dst)  # type: ignore[arg-type]
    assert [(a.run.run_id, b.run.run_id) for a, b in pairs] == [
        ("h100-graphs", "h200-graphs"),
        ("h100-eager", "h200-eager"),
    ]
    assert notes == []


def test_calibration_on_some_batch_sizes_holds_the_others_out(traces, tmp_path):
    from moecap.analyze.whatif.project import CalibrationSpec

    _, runs = traces
    src = _analysis([runs[("h100", 8)][0]], tmp_path)
    dst = _analysis([runs[("h200", 8)][0]], tmp_path)
    sizes = frozenset({8})
    doc = compare_runs(src, dst, load_cost_settings(), calibration=CalibrationSpec(batch_sizes=sizes))
    on = doc["runs"][0]["calibration"]["calibrated_on"]
    n8 = step_frame(src, src.contexts[0]).filter(pl.col("num_reqs") == 8).height
    assert on["batch_sizes"] == [8] and on["steps"] == n8 and on["runs"] == [src.contexts[0].run.run_id]
    rows = doc["comparison"]["pairs"][0]["decode_by_batch_size"]
    assert {r["num_reqs"] for r in rows if not r["held_out"]} == {8}
    held = [r for r in rows if r["held_out"]]
    assert held, "the simulated run drains below 8 requests at its end"
    # The model is the simulator's, so held-out batch sizes are projected as well as the rest.
    for r in held:
        assert r["projection_step_time_error"] == pytest.approx(0, abs=METRIC_TOL)
        assert r["projection_step_time_p50_error"] == pytest.approx(0, abs=METRIC_TOL)
    summary = doc["comparison"]["summary"]
    assert summary["held_out_batch_size_rows"] == len(held)
    assert summary["mean_abs_error"]["decode step time per batch size (held-out)"]["no_change"] > 0.2


def test_calibration_on_another_run_of_the_same_gpu(traces, tmp_path):
    from moecap.analyze.whatif.project import CalibrationSpec

    _, runs = traces
    src = _analysis([runs[("h100", 4)][0]], tmp_path)
    sweep = _analysis([runs[("h100", 8)][0], runs[("h200", 8)][0]], tmp_path)
    doc = whatif(src, [H200], load_cost_settings(), CalibrationSpec(runs=sweep))
    run = doc["runs"][0]
    # Only the run measured on the same GPU (H100) calibrates; the H200 run of the same model does not.
    h100_run = next(c.run.run_id for c in sweep.contexts if c.gpu.name == src.contexts[0].gpu.name)
    assert "h100-c8" in h100_run
    assert run["calibration"]["calibrated_on"]["runs"] == [h100_run]
    assert run["calibration"]["fits"]["all"]["eta_bw"] == pytest.approx(0.6, rel=1e-4)


def test_calibration_errors_name_what_is_missing(traces, tmp_path):
    from moecap.analyze.whatif.project import CalibrationSpec

    _, runs = traces
    src = _analysis([runs[("h100", 4)][0]], tmp_path)
    other_gpu = _analysis([runs[("h200", 8)][0]], tmp_path)
    with pytest.raises(InputError, match=r"--calibrate-on holds no run of model .* measured on H100"):
        whatif(src, [H200], load_cost_settings(), CalibrationSpec(runs=other_gpu))
    with pytest.raises(InputError, match="no step with 999 requests"):
        whatif(src, [H200], load_cost_settings(), CalibrationSpec(batch_sizes=frozenset({999})))


def test_no_change_reproduces_the_measured_requests_of_a_real_async_trace(tmp_path):
    # vLLM's async scheduling: a step's host start precedes the previous step's GPU end, so step
    # boundaries do not tile the timeline; unchanged step times must still give unchanged requests.
    from moecap.analyze.whatif.compare import measured_view
    from moecap.analyze.whatif.project import View, run_settings, stream_warp, views_metrics

    root = Path(__file__).resolve().parents[3] / "traces"
    files = sorted(root.glob("vllm-0.26.0-qwen15moe-graphs.*.arrow"))
    assert files, "the shipped vLLM trace"
    a = analyze_paths([str(p) for p in files], Options(), cache_dir=tmp_path / "cache")
    ctx = a.contexts[0]
    df = step_frame(a, ctx)
    t = df["time_s"].to_numpy().astype(np.float64)
    requests = a.db.con.sql("SELECT * FROM requests WHERE run_id = ?", params=[ctx.run.run_id]).pl()
    identity, warped = views_metrics(
        df,
        [View(t, ctx.gpu, TimeWarp.identity()), View(t, ctx.gpu, stream_warp(df, t))],
        ctx.peak_dtype,
        requests,
        run_settings(ctx),
    )
    for key, stat in (("ttft_s", "mean"), ("tpot_s", "mean"), ("e2e_s", "mean"), ("itl_s", "p50")):
        assert warped["requests"][key][stat] == pytest.approx(identity["requests"][key][stat], rel=1e-9), key
    assert warped["requests"]["output_throughput"] == pytest.approx(identity["requests"]["output_throughput"])
    # The no-change view is the warm run: its one JIT step (check's rule names it) at its typical time,
    # the rest as measured, i.e. the compare-to reference of a run with compile steps.
    run = whatif(a, [H200], load_cost_settings())["runs"][0]
    same = run["targets"]["H200-SXM-141GB"]["models"]["no_change"]["requests"]
    warm = measured_view(a, ctx, load_cost_settings(), warm=True)
    assert warm["compile_steps"] == 1
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert same[key]["mean"] == pytest.approx(warm["requests"][key]["mean"], rel=1e-9), key
    assert (
        same["ttft_s"]["mean"] < run["measured"]["requests"]["ttft_s"]["mean"] - 0.5
    )  # 1.1 s of JIT left out


def test_cli_several_runs_print_one_row_per_run_and_target_in_labelled_units(app, traces, tmp_path):
    _, runs = traces
    paths = [str(runs[("h100", 4)][0]), str(runs[("h100", 8)][0])]
    args = [
        "whatif",
        *paths,
        "--gpu",
        "H200",
        "--gpu",
        "B200",
        "--window",
        "all",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    runner = CliRunner()
    res = runner.invoke(app, args, catch_exceptions=False, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.output.splitlines() if "H200-SXM" in ln or "B200" in ln]
    assert len(rows) == 2 * 2  # 2 runs x 2 targets, one line each
    assert len(res.output.splitlines()) < 20
    assert "e+" not in res.output and "(s)" not in res.output
    detail = runner.invoke(app, [*args, "--detail"], catch_exceptions=False, env={"COLUMNS": "200"})
    assert detail.exit_code == 0, detail.output
    assert "TPOT mean, ms" in detail.output and "fit " in detail.output
    assert len(detail.output.splitlines()) > len(res.output.splitlines())


def test_comparison_labels_carry_the_unit_the_numbers_are_in():
    from moecap.analyze.whatif.cli import _fmt, unit_label

    assert unit_label("TTFT mean (s)") == ("TTFT mean, ms", "ms")
    assert _fmt(1.16, "ms") == "1,160"  # 1.16 s shown in the label's ms, not "1.16e+03 ms"
    assert unit_label("S-MBU (decode)") == ("S-MBU (decode), %", "%")
    assert _fmt(0.4567, "%") == "45.7"


def test_cli_csv_has_one_row_per_run_target_and_model(app, traces, tmp_path):
    import csv
    import io

    _, runs = traces
    paths = [str(runs[("h100", 4)][0]), str(runs[("h100", 8)][0])]
    args = [
        "whatif",
        *paths,
        "--gpu",
        "H200",
        "--window",
        "all",
        "--cache-dir",
        str(tmp_path / "c"),
        "--format",
        "csv",
    ]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.output)))
    assert len(rows) == 2 * 4  # 2 runs x 1 target x (measured + 3 models)
    assert {r["model"] for r in rows} == {"measured", "projection", "no_change", "bandwidth_ratio"}
    measured = next(r for r in rows if r["model"] == "measured")
    assert float(measured["TPOT mean, ms"]) > 0 and "e+" not in res.output


def test_help_examples_name_paths_that_exist():
    import re
    from pathlib import Path

    from moecap.analyze.whatif.cli import whatif

    root = Path(__file__).resolve().parents[3]
    doc = whatif.__doc__ or ""
    assert "traces/h100/" not in doc
    for pattern in re.findall(r"'(traces/[^']+)'", doc):
        assert list(root.glob(pattern + ".steps.arrow")) or list(root.glob(pattern)), pattern
