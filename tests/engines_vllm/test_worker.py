"""The patched real `vllm.v1.worker.gpu_worker.Worker`, end to end on the CPU: real scheduler outputs in,
a tiny MoE model routed by vLLM's real router classes, trace files out, counts checked exactly."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

import torch
from vllm_objects import (
    MOE_LAYERS,
    NUM_EXPERTS,
    TOP_K,
    FakeRunner,
    ToyScheduler,
    kv_cache_config,
    make_model,
    make_worker,
)

from moecap.collect.engines.vllm import adapter
from moecap.schemas import read_trace_file


@pytest.fixture
def worker_class(vllm_env):
    from vllm.v1.worker.gpu_worker import Worker

    adapter.patch_worker_class(Worker)
    yield Worker
    adapter.unpatch_worker_class(Worker)


@pytest.fixture
def trace_env(tmp_path, monkeypatch):
    monkeypatch.setenv(adapter.ENV_TRACE_DIR, str(tmp_path))
    monkeypatch.setenv(adapter.ENV_RUN_ID, "20261124T000000Z-vllm-tiny-test")
    monkeypatch.setenv(adapter.ENV_MODEL_ID, "tiny/qwen2-moe")
    monkeypatch.setenv(adapter.ENV_WORKLOAD, json.dumps({"dataset": "scripted", "concurrency": 4}))
    return tmp_path


def duplicating_plan(num_rows: int) -> torch.Tensor:
    """Layer 0's routing: row i -> experts (i % 8, (i * 3) % 8); every 4th row picks one expert twice."""
    i = torch.arange(num_rows)
    ids = torch.stack([i % NUM_EXPERTS, (i * 3) % NUM_EXPERTS], dim=1)
    ids[::4, 1] = ids[::4, 0]
    return ids.to(torch.int32)


class RecordingModel:
    """Reads back the routing each MoE block really chose (the reference for the counts)."""

    def __init__(self, model):
        self.model = model
        self.per_forward: list[list[torch.Tensor]] = []
        self._current: list[torch.Tensor] = []
        for index in MOE_LAYERS:
            block = model.model.layers[index]
            original = block.router.select_experts

            def select(*args, _orig=original, **kwargs):
                w, ids = _orig(*args, **kwargs)
                self._current.append(ids.clone())
                return w, ids

            block.router.select_experts = select
        model.register_forward_hook(self._done)

    def _done(self, *_):
        self.per_forward.append(self._current)
        self._current = []


def drive(worker, scheduler, steps_with_dummy=(4,), max_steps=200):
    """Run the scheduler's workload through the worker as vLLM's engine core does."""
    outputs = []
    step = 0
    while not scheduler.done() and step < max_steps:
        if step in steps_with_dummy:
            worker.execute_dummy_batch()
        so, _ = scheduler.step()
        out = worker.execute_model(so)
        if out is None:
            out = worker.sample_tokens(None)
        outputs.append((so, out))
        step += 1
    return outputs


def trace_files(folder):
    steps = [p for p in folder.iterdir() if p.name.endswith(".steps.arrow")]
    experts = [p for p in folder.iterdir() if p.name.endswith(".experts.arrow")]
    assert len(steps) == 1 and len(experts) == 1, sorted(p.name for p in folder.iterdir())
    return read_trace_file(steps[0]), read_trace_file(experts[0])


@pytest.mark.parametrize(
    ("count_on", "host_cap"),
    [("auto", None), ("device", None), ("host", None), ("auto", 3 * TOP_K * len(MOE_LAYERS) * 4)],
    ids=["auto", "device", "host", "auto-mixed"],
)
def test_real_worker_records_every_step_with_exact_counts(
    worker_class, vllm_env, trace_env, monkeypatch, count_on, host_cap
):
    # Counts made on the host (small steps) and on the device (large ones) must be the same counts.
    monkeypatch.setenv("MOECAP_COUNT_ON", count_on)
    if host_cap is not None:  # steps of more than 12 tokens go to the device, smaller ones to the host
        monkeypatch.setattr(adapter, "HOST_COUNT_MAX_IDS", host_cap)
    model = make_model(plans={0: duplicating_plan})
    rec = RecordingModel(model)
    runner = FakeRunner(model)
    worker = make_worker(vllm_env, runner)
    worker.load_model()
    tracer = worker._moecap_tracer
    assert (
        tracer.layer_ids == list(MOE_LAYERS) and tracer.num_experts == NUM_EXPERTS and tracer.top_k == TOP_K
    )
    ptr = tracer.buffer.data_ptr()
    worker.initialize_from_config(kv_cache_config())
    sched = ToyScheduler(24, runner="v2", spec_k=0, seed=5)
    for i in range(5):
        sched.add(f"q{i}", prompt_len=6 + 9 * i, max_tokens=4, prefix_hit=16 if i == 3 else 0)
    outputs = drive(worker, sched)
    assert tracer.buffer.data_ptr() == ptr  # preallocated once, never moved (CUDA graphs point at it)
    stats = worker.moecap_control("stats")
    worker.shutdown()

    steps, experts = trace_files(trace_env)
    assert steps.complete and experts.complete
    n_exec = len(outputs)
    assert steps.num_rows == n_exec + 1 == stats["steps_recorded"]
    rows = steps.table.to_pylist()
    assert [r["step"] for r in rows] == list(range(n_exec + 1))
    assert rows[4]["phase"] == "idle" and rows[4]["num_tokens"] == 0  # the dummy batch
    real = [r for r in rows if r["num_tokens"] > 0]
    assert len(real) == len(runner.inputs) - runner.dummy_runs
    assert all(r["t_start_ns"] <= r["t_end_ns"] for r in rows)
    assert all(r["gpu_start_ns"] is None for r in rows)  # CPU: no CUDA events
    # Counts: exactly the real rows' routing, every top-k choice, padding never.
    counts = {r["step"]: r["counts"] for r in experts.table.to_pylist()}
    forwards = iter(zip(runner.inputs, rec.per_forward))
    checked = 0
    for r in rows:
        (_x, n_real), routed = next(forwards)
        assert n_real == r["num_tokens"]
        got = torch.tensor(counts[r["step"]]).reshape(len(MOE_LAYERS), NUM_EXPERTS)
        for layer, ids in enumerate(routed):
            assert ids.shape[0] > n_real or n_real == 0  # the forward saw padding rows
            want = torch.bincount(ids[:n_real].reshape(-1).long(), minlength=NUM_EXPERTS)
            assert torch.equal(got[layer], want.to(got.dtype)), (r["step"], layer)
            assert int(got[layer].sum()) == n_real * TOP_K
        checked += 1
    assert checked == n_exec + 1
    on_host = tracer.steps_counted_on_host  # after shutdown: the last step is emitted at the drain
    ids_per_token = TOP_K * len(MOE_LAYERS)
    small = sum(r["num_tokens"] * ids_per_token <= adapter.HOST_COUNT_MAX_IDS for r in rows)
    expected = {"device": 0, "host": n_exec + 1, "auto": small}[count_on]
    assert stats["count_on"] == count_on and on_host == expected
    if host_cap is not None:
        assert 0 < on_host < n_exec + 1  # both paths ran in one trace
    run = steps.run
    assert run.engine.name == "vllm" and run.engine.version
    assert run.model.id == "tiny/qwen2-moe" and run.model.config["model_type"] == "qwen2_moe"
    assert run.moe.layer_ids == list(MOE_LAYERS) and run.moe.counts_available
    assert run.moe.num_experts == NUM_EXPERTS and run.moe.top_k == TOP_K
    assert run.model.kv_bytes_per_token_per_layer == [2 * 2 * 16 * 4] * 3
    assert (run.rank.dp, run.rank.pp, run.rank.tp) == (0, 0, 0)
    assert (run.parallelism.tp, run.parallelism.pp, run.parallelism.dp) == (1, 1, 1)
    assert run.workload == {"dataset": "scripted", "concurrency": 4}
    assert steps.path.name == "20261124T000000Z-vllm-tiny-test.dp0-pp0-tp0.steps.arrow"


def test_empty_steps_and_counts_off(worker_class, vllm_env, trace_env, monkeypatch):
    monkeypatch.setenv(adapter.ENV_COUNTS, "0")
    runner = FakeRunner(make_model())
    worker = make_worker(vllm_env, runner)
    worker.load_model()
    assert worker._moecap_tracer.buffer is None
    from vllm_objects import cached_requests, scheduler_output

    empty = scheduler_output([], cached_requests([], [], []), {})
    out = worker.execute_model(empty)  # nothing scheduled: the output comes back without sampling
    assert out is not None
    worker.execute_dummy_batch()
    worker.shutdown()
    steps = [p for p in trace_env.iterdir() if p.name.endswith(".steps.arrow")]
    assert len(steps) == 1 and not [p for p in trace_env.iterdir() if p.name.endswith(".experts.arrow")]
    tf = read_trace_file(steps[0])
    assert [r["phase"] for r in tf.table.to_pylist()] == ["idle", "idle"]
    assert not tf.run.moe.counts_available and "MOECAP_COUNTS=0" in tf.run.moe.counts_unavailable_reason


def test_monolithic_kernel_records_steps_without_counts(worker_class, vllm_env, trace_env):
    model = make_model()
    for index in MOE_LAYERS:
        model.model.layers[index].is_monolithic = True
    worker = make_worker(vllm_env, FakeRunner(model))
    worker.load_model()
    sched = ToyScheduler(32, seed=1)
    sched.add("a", 10, 2)
    drive(worker, sched, steps_with_dummy=())
    worker.shutdown()
    steps = [p for p in trace_env.iterdir() if p.name.endswith(".steps.arrow")]
    tf = read_trace_file(steps[0])
    assert tf.num_rows >= 2
    assert not tf.run.moe.counts_available
    assert "monolithic" in tf.run.moe.counts_unavailable_reason
    assert not [p for p in trace_env.iterdir() if p.name.endswith(".experts.arrow")]


def test_untraced_worker_is_untouched(worker_class, vllm_env, monkeypatch):
    monkeypatch.delenv(adapter.ENV_TRACE_DIR, raising=False)
    runner = FakeRunner(make_model())
    worker = make_worker(vllm_env, runner)
    worker.load_model()
    assert "_moecap_tracer" not in worker.__dict__
    sched = ToyScheduler(32, seed=2)
    sched.add("a", 5, 2)
    drive(worker, sched, steps_with_dummy=())
    assert runner.sampled >= 2
    for index in MOE_LAYERS:
        assert worker.model_runner.model.model.layers[index].router.capture_fn is None
    worker.shutdown()


def test_an_existing_capture_callback_keeps_running(worker_class, vllm_env, trace_env):
    """vLLM's own routed-experts capture (--enable-return-routed-experts) may bind first: both run."""
    model = make_model()
    seen = []
    for index in MOE_LAYERS:
        model.model.layers[index].router.set_capture_fn(lambda ids, _i=index: seen.append((_i, ids.shape[0])))
    worker = make_worker(vllm_env, FakeRunner(model))
    worker.load_model()
    sched = ToyScheduler(32, seed=3)
    sched.add("a", 6, 2)
    drive(worker, sched, steps_with_dummy=())
    worker.shutdown()
    assert {i for i, _ in seen} == set(MOE_LAYERS)
    _, experts = trace_files(trace_env)
    assert experts.num_rows >= 2 and sum(experts.table.to_pylist()[0]["counts"]) == 6 * TOP_K * len(
        MOE_LAYERS
    )


def test_a_capture_callback_bound_after_load_model_keeps_both_running(worker_class, vllm_env, trace_env):
    """vLLM 0.26 binds its routed-experts capturer in initialize_from_config, after our load_model hook."""
    model = make_model()
    worker = make_worker(vllm_env, FakeRunner(model))
    worker.load_model()
    seen = []
    for index in MOE_LAYERS:
        model.model.layers[index].router.set_capture_fn(lambda ids, _i=index: seen.append(_i))
    worker.initialize_from_config(kv_cache_config())
    worker.initialize_from_config(kv_cache_config())  # rebinding twice never stacks ours twice
    sched = ToyScheduler(32, seed=4)
    sched.add("a", 6, 2)
    drive(worker, sched, steps_with_dummy=())
    worker.shutdown()
    assert seen.count(MOE_LAYERS[0]) == 2  # their callback ran once per forward (prefill, decode)
    _, experts = trace_files(trace_env)
    assert [sum(r["counts"]) for r in experts.table.to_pylist()] == [6 * TOP_K * 2, 1 * TOP_K * 2]


def test_warm_up_passes_through_the_worker_are_not_recorded(worker_class, vllm_env, trace_env):
    """Model runner V2 warms up through Worker.execute_model with `_warmup_<i>_` requests."""
    worker = make_worker(vllm_env, FakeRunner(make_model()))
    worker.load_model()
    warm = ToyScheduler(64, seed=6)
    for i in range(3):
        warm.add(f"_warmup_{i}_", 2, 2)
    adapter._around_compile_or_warm_up_model(lambda w: drive(w, warm, steps_with_dummy=()), worker)
    sched = ToyScheduler(32, seed=7)
    sched.add("a", 5, 2)
    drive(worker, sched, steps_with_dummy=())
    worker.shutdown()
    steps, _ = trace_files(trace_env)
    rows = steps.table.to_pylist()
    assert [r["step"] for r in rows] == [0, 1]
    assert all(rid == "a" for r in rows for rid in r["req_ids"])


def test_a_paused_tracer_records_nothing_until_resumed(worker_class, vllm_env, trace_env):
    """`run --warmup`: the client pauses every worker's tracer (`moecap_control("pause")` over
    collective_rpc), runs its warm-up requests, and resumes; the warm-up steps never reach the trace."""
    worker = make_worker(vllm_env, FakeRunner(make_model()))
    worker.load_model()
    warm = ToyScheduler(64, seed=8)
    for i in range(2):
        warm.add(f"moecap-warmup-{i}", 4, 3)
    assert worker.moecap_control("pause")["steps_recorded"] == 0
    drive(worker, warm, steps_with_dummy=())
    assert worker.moecap_control("resume")["steps_recorded"] == 0
    sched = ToyScheduler(32, seed=9)
    sched.add("a", 5, 2)
    outputs = drive(worker, sched, steps_with_dummy=())
    worker.shutdown()
    steps, experts = trace_files(trace_env)
    rows = steps.table.to_pylist()
    assert [r["step"] for r in rows] == list(range(len(outputs)))
    assert all(rid == "a" for r in rows for rid in r["req_ids"]) and experts.num_rows == len(rows)


def test_a_clients_warm_up_steps_are_not_recorded(worker_class, vllm_env, trace_env):
    """drive's warm-up and residue ladder reach a traced `vllm serve` with ids vLLM names
    `cmpl-moecap-warmup-…-<i>`: their steps are left out, as `run` pauses the tracer for its own; the
    measured requests after them are recorded from step 0, counted exactly."""
    model = make_model(plans={0: duplicating_plan})
    rec = RecordingModel(model)
    runner = FakeRunner(model)
    worker = make_worker(vllm_env, runner)
    worker.load_model()
    worker.initialize_from_config(kv_cache_config())
    sched = ToyScheduler(24, runner="v2", seed=7)
    sched.add("cmpl-moecap-warmup-ab12-ladder-17-0", prompt_len=17, max_tokens=1)
    sched.add("cmpl-moecap-warmup-ab12-3-0", prompt_len=9, max_tokens=3)
    warm = drive(worker, sched, steps_with_dummy=())
    for i in range(3):
        sched.add(f"cmpl-ab12-00000{i}-0", prompt_len=5 + 4 * i, max_tokens=3)
    measured = drive(worker, sched, steps_with_dummy=())
    stats = worker.moecap_control("stats")
    worker.shutdown()

    steps, experts = trace_files(trace_env)
    rows = steps.table.to_pylist()
    assert stats["warmup_steps_skipped"] == len(warm) > 0 and stats["steps_recorded"] == len(measured)
    assert [r["step"] for r in rows] == list(range(len(measured)))
    assert all("warmup" not in rid for r in rows for rid in r["req_ids"])
    assert sum(r["num_tokens"] for r in rows) == sum(so.total_num_scheduled_tokens for so, _ in measured)
    counts = {r["step"]: r["counts"] for r in experts.table.to_pylist()}
    forwards = list(zip(runner.inputs, rec.per_forward))[len(warm) :]  # the warm-up's forwards ran too
    for r, ((_x, n_real), routed) in zip(rows, forwards, strict=True):
        assert n_real == r["num_tokens"]
        got = torch.tensor(counts[r["step"]]).reshape(len(MOE_LAYERS), NUM_EXPERTS)
        want = torch.bincount(routed[0][:n_real].reshape(-1).long(), minlength=NUM_EXPERTS)
        assert torch.equal(got[0], want.to(got.dtype))


def test_record_warmup_keeps_a_clients_warm_up_steps(worker_class, vllm_env, trace_env, monkeypatch):
    """MOECAP_RECORD_WARMUP=1 (a diagnostic: how did the engine form drive's ladder?) records them too."""
    monkeypatch.setenv("MOECAP_RECORD_WARMUP", "1")
    worker = make_worker(vllm_env, FakeRunner(make_model()))
    worker.load_model()
    worker.initialize_from_config(kv_cache_config())
    sched = ToyScheduler(24, runner="v2", seed=7)
    sched.add("cmpl-moecap-warmup-ab12-ladder-17-0", prompt_len=17, max_tokens=1)
    warm = drive(worker, sched, steps_with_dummy=())
    stats = worker.moecap_control("stats")
    worker.shutdown()
    steps, _ = trace_files(trace_env)
    assert stats["warmup_steps_skipped"] == 0 and steps.num_rows == len(warm) > 0
    assert steps.table.to_pylist()[0]["req_ids"] == ["cmpl-moecap-warmup-ab12-ladder-17-0"]
