"""The sweep loop on the real HF engine in this process (tiny random-weight MoE on the CPU): one engine
start per config, failed points recorded with their reason, --fail-fast, re-runs skip recorded points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moecap.collect.sweep import HFSession, build_spec, expand, run_sweep
from moecap.schemas import open_traces

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "collect" / "models" / "tiny-qwen2-moe" / "config.json")
GSM8K = str(ROOT / "tests" / "data" / "datasets" / "gsm8k")

pytest.importorskip("transformers")


class CountingFactory:
    """The real session factory, counting engine starts."""

    def __init__(self) -> None:
        self.starts: list[str] = []

    def __call__(self, engine: str) -> HFSession:
        factory = self

        class Counted(HFSession):
            def start(self, config, out):  # type: ignore[override]
                factory.starts.append(config.model)
                super().start(config, out)

        return Counted()


def _points(tasks, batch_sizes=(1,), models=(TINY,)):
    return expand(
        build_spec(
            {
                "engines": ["hf"],
                "models": list(models),
                "random_weights": True,
                "tasks": list(tasks),
                "batch_sizes": list(batch_sizes),
                "waves": 1,
                "max_new_tokens": 4,
                "dataset_path": GSM8K,
            }
        )
    )


def _state(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())["points"]


def test_a_failing_point_is_recorded_with_its_reason_and_the_sweep_goes_on(tmp_path):
    # gsm8k padded to 16 tokens needs a tokenizer, which a config.json alone has not: that point fails.
    points = _points(["gsm8k:16x4", "synthetic:16x4"], batch_sizes=(1, 2))
    factory = CountingFactory()
    outcome = run_sweep(points, tmp_path, log=lambda _: None, session_factory=factory)
    assert factory.starts == [TINY]  # one model load for all four points
    failed = [p for p in points if p.task == "gsm8k:16x4"]
    assert set(outcome.failed) == {p.key for p in failed}
    assert all("needs the model's tokenizer" in reason for reason in outcome.failed.values())
    assert sorted(outcome.recorded) == sorted(p.key for p in points if p.task == "synthetic:16x4")
    state = _state(tmp_path)
    assert {k: v["status"] for k, v in state.items()} == {
        p.key: ("failed" if p in failed else "done") for p in points
    }
    assert all("needs the model's tokenizer" in state[p.key]["reason"] for p in failed)
    traces = open_traces([tmp_path])
    assert not traces.errors and len(traces.runs) == 2
    for run in traces.runs.values():
        sweep = run.metadata.workload["sweep"]
        assert sweep["task"] == "synthetic:16x4" and sweep["point"] in outcome.recorded
        assert run.metadata.workload["batch_size"] == sweep["batch_size"]
        assert all(f.complete for f in run.files)


def test_fail_fast_stops_at_the_first_failed_point(tmp_path):
    points = _points(["gsm8k:16x4", "synthetic:16x4"])
    outcome = run_sweep(points, tmp_path, fail_fast=True, log=lambda _: None)
    assert list(outcome.failed) == [points[0].key]
    assert outcome.recorded == [] and outcome.not_run == [points[1].key]
    assert _state(tmp_path)[points[1].key]["status"] == "pending"
    assert not list(tmp_path.glob("*.arrow"))


def test_an_engine_that_does_not_start_fails_its_points_once_and_the_next_config_runs(tmp_path):
    missing = str(tmp_path / "nope" / "config.json")
    points = _points(["synthetic:16x4"], batch_sizes=(1, 2), models=(missing, TINY))
    factory = CountingFactory()
    outcome = run_sweep(points, tmp_path / "out", log=lambda _: None, session_factory=factory)
    assert factory.starts == [missing, TINY]  # not retried for the second point of the broken config
    assert sorted(outcome.failed) == sorted(p.key for p in points if p.config.model == missing)
    assert all(r.startswith("engine start failed: --model") for r in outcome.failed.values())
    assert len(outcome.recorded) == 2


def test_a_rerun_skips_every_recorded_point_and_leaves_its_files_alone(tmp_path):
    points = _points(["synthetic:16x4"], batch_sizes=(1, 2))
    first = run_sweep(points, tmp_path, log=lambda _: None)
    assert len(first.recorded) == 2
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.arrow")}
    factory = CountingFactory()
    again = run_sweep(points, tmp_path, log=lambda _: None, session_factory=factory)
    assert again.recorded == [] and sorted(again.skipped) == sorted(p.key for p in points)
    assert factory.starts == []  # nothing to record: no engine started
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.arrow")} == before
    # one more batch size: only the new point is recorded
    more = _points(["synthetic:16x4"], batch_sizes=(1, 2, 3))
    third = run_sweep(more, tmp_path, log=lambda _: None)
    assert [p.batch_size for p in more if p.key in third.recorded] == [3]


def test_a_fixed_length_dataset_task_with_a_tokenizer(tmp_path, tiny_tokenizer):
    # MoE-CAP's fixed-length mode: the dataset's prompts repeated and cut to 24 tokens, then its suffix
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    spec = build_spec(
        {"engines": ["hf"], "models": [TINY], "random_weights": True, "tasks": ["gsm8k:24x4"],
         "batch_sizes": [2], "waves": 1, "dataset_path": GSM8K, "tokenizer": str(tmp_path / "tok")}
    )  # fmt: skip
    outcome = run_sweep(expand(spec), tmp_path / "out", log=lambda _: None)
    assert outcome.complete and len(outcome.recorded) == 1
    (run,) = open_traces([tmp_path / "out"]).runs.values()
    requests = run.tables("requests")[0].table.to_pylist()
    assert len(requests) == 2 and all(r["output_tokens"] == 4 for r in requests)
    from moecap.collect.datasets.text import PAD_SUFFIX

    suffix = len(tiny_tokenizer.encode(PAD_SUFFIX, add_special_tokens=False))
    # 24 tokens of the question (re-encoding may merge a token or two at the joins) + the guide's suffix
    assert all(24 + suffix - 2 <= r["prompt_tokens"] <= 24 + suffix + 2 for r in requests), requests
    assert run.metadata.workload["sweep"]["task"] == "gsm8k:24x4"


def test_a_second_sweep_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    # Found on the H100: a sweep whose process outlived its killed shell kept recording while a resumed
    # sweep wrote the same folder, so points were recorded twice and the state overwritten.
    import subprocess
    import sys

    from moecap.collect.errors import CollectError
    from moecap.collect.sweep.execute import sweep_lock

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from moecap.collect.sweep.execute import sweep_lock\n"
         "with sweep_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = r"another sweep \(pid \d+\) is recording into this folder"
        with pytest.raises(CollectError, match=busy), sweep_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with sweep_lock(tmp_path):  # the kernel released the dead holder's lock
        pass
