"""An SGLang sweep starts one engine per point (docs/sweep.md), so its runs' recorded server arguments
differ in the scratch folder of the random-weight config (`model_path`, `tokenizer_path`,
`served_model_name`) and in `max_running_requests` (the point's batch size). Those do not make different
kinds of steps: `same_config` must let such runs calibrate jointly, as a vLLM sweep's runs (one engine)
do, and must still keep apart runs whose steps differ (chunked prefill, CUDA graphs)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest

from moecap.analyze.whatif.project import same_config
from moecap.schemas import open_traces

ROOT = Path(__file__).resolve().parents[3]
SGLANG_RUN = "20261204T044925Z-sglang-Qwen1.5-MoE-A2.7B-10a9"


@pytest.fixture(scope="module")
def metadata():
    """The run metadata of the shipped SGLang 0.5.16 run (its scheduler's steps file: every ServerArgs field)."""
    (run,) = open_traces([ROOT / "traces" / f"{SGLANG_RUN}.dp0-pp0-tp0.steps.arrow"]).runs.values()
    return run.metadata


def _ctx(metadata, **args):
    """What `same_config` reads of a run context: the run's metadata (these server arguments) and its GPU."""
    meta = copy.deepcopy(metadata)
    meta.engine.args = {**metadata.engine.args, **args}
    return SimpleNamespace(run=SimpleNamespace(metadata=meta, run_id="r"), gpu=SimpleNamespace(name="H100"))


def test_per_point_engines_of_an_sglang_sweep_calibrate_jointly(metadata):
    args = metadata.engine.args
    assert args["model_path"].startswith("/tmp/moecap-sglang-")  # the scratch copy, per engine
    assert args["tokenizer_path"] == args["served_model_name"] == args["model_path"]
    point_1 = _ctx(metadata, max_running_requests=1)
    other = "/tmp/moecap-sglang-zzzzzzzz/model"
    point_64 = _ctx(
        metadata, max_running_requests=64, model_path=other, tokenizer_path=other, served_model_name=other
    )
    assert same_config(point_1, point_64)


@pytest.mark.parametrize(("field", "value"), [("chunked_prefill_size", 8192), ("disable_cuda_graph", True)])
def test_runs_whose_steps_differ_stay_apart(metadata, field, value):
    assert metadata.engine.args[field] != value
    assert not same_config(_ctx(metadata), _ctx(metadata, **{field: value}))


SWEEP = ROOT / "traces" / "h100-sglang-sweep"


def test_the_real_sglang_sweep_calibrates_as_one_configuration():
    """The shipped H100 SGLang sweep (eight engines, c1..c128): every run is the same configuration as
    every other, so `whatif` on the folder fits all eight jointly. SGLang's recorded server arguments there
    also differ in `pp_max_micro_batch_size`, which SGLang sets from `max_running_requests` at start; a
    sizing argument this check once missed, fitting each run alone."""
    from moecap.analyze.analysis import Options
    from moecap.analyze.cost import load_cost_settings
    from moecap.analyze.pipeline import analyze_paths
    from moecap.analyze.specs import resolve_gpu
    from moecap.analyze.whatif import whatif

    files = sorted(str(p) for p in SWEEP.glob("*.arrow"))
    a = analyze_paths(files, Options())
    assert len(a.contexts) == 8
    micro = {ctx.run.metadata.engine.args["pp_max_micro_batch_size"] for ctx in a.contexts}
    assert micro == {1, 2, 4, 8, 16, 32, 64, 128}
    first = a.contexts[0]
    assert all(same_config(first, ctx) for ctx in a.contexts[1:])
    report = whatif(a, [resolve_gpu("H200")], load_cost_settings())
    for run in report["runs"]:
        assert len(run["calibration"]["calibrated_on"]["runs"]) == 8, run["run_id"]
