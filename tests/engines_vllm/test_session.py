"""`run --engine vllm` hands work to vLLM the way `LLM.generate` does: `LLM`'s usage context, `max_num_seqs`
= batch size, every prompt added before the first step, a paused-tracer warm-up of the workload's shapes.

vLLM's engine cannot step on a CPU host, so `LLMEngine` is a stand-in (`ScriptedEngine`) that admits
requests the way vLLM's scheduler does (up to `max_num_seqs` running, a waiting request admitted when a
slot frees, one token per running request per step) and answers `step()` with outputs carrying the real
`RequestOutput` / `CompletionOutput` attribute names (checked against the installed release) in
`RequestOutputKind.DELTA` form. Everything else (options, `EngineArgs`, `SamplingParams`, usage context) is
vLLM's own."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from moecap.collect.engines.vllm import adapter
from moecap.collect.engines.vllm import runner as vllm_run
from moecap.collect.workload import WARMUP_PREFIX


class ScriptedEngine:
    """`LLMEngine`'s add_request / step / has_unfinished_requests / collective_rpc, scheduled like vLLM."""

    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.events: list[tuple[str, Any]] = []
        self.waiting: list[dict[str, Any]] = []
        self.running: list[dict[str, Any]] = []
        self.max_running = 0
        self.params: list[Any] = []
        self.engine_core = SimpleNamespace(shutdown=lambda: self.events.append(("shutdown", None)))
        self.vllm_config = None

    def add_request(self, request_id: str, prompt: dict[str, Any], params: Any) -> str:
        self.events.append(("add", request_id))
        self.params.append(params)
        self.waiting.append(
            {"id": request_id, "prompt": list(prompt["prompt_token_ids"]), "n": params.max_tokens, "out": 0}
        )
        return request_id  # vLLM 0.26 returns our id (0.33 appends a suffix internally)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Any]:
        self.events.append(("step", None))
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        self.max_running = max(self.max_running, len(self.running))
        outputs = []
        for r in list(self.running):
            r["out"] += 1
            done = r["out"] == r["n"]
            token = (r["prompt"][0] + r["out"]) % 97
            completion = SimpleNamespace(token_ids=[token], finish_reason="length" if done else None)
            outputs.append(
                SimpleNamespace(request_id=r["id"], outputs=[completion], finished=done, num_cached_tokens=0)
            )
            if done:
                self.running.remove(r)
        return outputs

    def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        self.events.append(("rpc", args[0]))
        return [{"steps_written": 0}]

    def reset_prefix_cache(self) -> bool:
        return True


def test_the_stand_in_speaks_the_real_classes():
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.engine.llm_engine import LLMEngine

    for name in ("add_request", "step", "has_unfinished_requests", "collective_rpc", "reset_prefix_cache"):
        assert hasattr(LLMEngine, name)
    assert list(inspect.signature(LLMEngine.add_request).parameters)[1:4] == [
        "request_id",
        "prompt",
        "params",
    ]
    assert {"request_id", "outputs", "finished", "num_cached_tokens"} <= set(
        inspect.signature(RequestOutput.__init__).parameters
    )
    assert {"token_ids", "finish_reason"} <= {f for f in inspect.signature(CompletionOutput).parameters}


@pytest.fixture
def scripted(monkeypatch):
    """`LLMEngine.from_engine_args` answering a `ScriptedEngine` sized by the real `EngineArgs`."""
    from vllm.v1.engine.llm_engine import LLMEngine

    built: dict[str, Any] = {}

    def from_engine_args(engine_args: Any, usage_context: Any = None, **_: Any) -> ScriptedEngine:
        built["args"], built["usage"] = engine_args, usage_context
        built["engine"] = ScriptedEngine(engine_args.max_num_seqs)
        return built["engine"]

    monkeypatch.setattr(LLMEngine, "from_engine_args", from_engine_args)
    yield built
    adapter._reset_for_tests()


def _scheduler_config(max_num_batched_tokens: int, max_num_seqs: int) -> Any:
    """vLLM's own `SchedulerConfig` (0.33 requires `is_encoder_decoder`, 0.26 has a default)."""
    from vllm.config import SchedulerConfig

    kw = dict(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, max_model_len=4096)
    try:
        return SchedulerConfig(**kw)
    except Exception:
        return SchedulerConfig(**kw, is_encoder_decoder=False)


@pytest.fixture(params=[None], ids=["no-model-config"])
def budgeted(monkeypatch, request, tmp_path):
    """`scripted`, the stand-in carrying vLLM's own `VllmConfig` with a `SchedulerConfig` sized by the real
    `EngineArgs` (`max_num_batched_tokens` from `--max-batch-tokens`); no model config, or (parametrized
    indirectly with a length) vLLM's own `ModelConfig` of the tiny model with that `max_model_len`."""
    from vllm.config import ModelConfig, VllmConfig
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm_objects import write_tiny_config

    built: dict[str, Any] = {}
    model_len = request.param

    def from_engine_args(engine_args: Any, usage_context: Any = None, **_: Any) -> ScriptedEngine:
        engine = ScriptedEngine(engine_args.max_num_seqs)
        sc = _scheduler_config(engine_args.max_num_batched_tokens, engine_args.max_num_seqs)
        if model_len is None:
            engine.vllm_config = VllmConfig(scheduler_config=sc)
        else:
            folder = tmp_path / "model-config"
            folder.mkdir(exist_ok=True)
            write_tiny_config(folder)
            mc = ModelConfig(
                model=str(folder), skip_tokenizer_init=True, dtype="float32", max_model_len=model_len
            )
            engine.vllm_config = VllmConfig(model_config=mc, scheduler_config=sc)
        built["engine"] = engine
        return engine

    monkeypatch.setattr(LLMEngine, "from_engine_args", from_engine_args)
    yield built
    adapter._reset_for_tests()


def _options(tmp_path, **kw: Any) -> vllm_run.VllmRunOptions:
    from vllm_objects import write_tiny_config

    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    config = write_tiny_config(folder) / "config.json"
    base = dict(
        model=str(config), random_weights=True, dataset="synthetic:12x5", num_prompts=6, batch_size=3, out=str(tmp_path / "t"),
        ignore_eos=True, gpu_sample_interval_s=None, run_id="run-session",
    )  # fmt: skip
    base.update(kw)
    return vllm_run.VllmRunOptions(**base)


def test_run_hands_every_prompt_over_at_once_like_llm_generate(tmp_path, scripted):
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext

    result = vllm_run.run(_options(tmp_path))
    engine: ScriptedEngine = scripted["engine"]
    # LLM's defaults (the bare engine context leaves 2,048 batched tokens), concurrency = batch size.
    assert scripted["usage"] is UsageContext.LLM_CLASS
    assert scripted["args"].max_num_seqs == 3 and scripted["args"].disable_log_stats is True
    assert engine.max_running == 3
    adds = [i for i, (kind, rid) in enumerate(engine.events) if kind == "add" and rid.startswith("r")]
    assert len(adds) == 6 and adds == list(range(adds[0], adds[0] + 6))  # no step() in between
    assert all(p.output_kind == RequestOutputKind.DELTA and p.detokenize is False for p in engine.params)
    # Warm-up: one batch of the workload's shapes, before the workload, fresh ids, not in the records.
    warm = [rid for kind, rid in engine.events if kind == "add" and rid.startswith(WARMUP_PREFIX)]
    assert len(warm) == 3 and engine.events.index(("add", warm[-1])) < adds[0]
    assert sorted(r.req_id for r in result.records) == [f"r{i}" for i in range(6)]
    for rec in result.records:
        assert len(rec.output_ids) == 5 and rec.chunk_tokens == [1] * 5
        assert (
            rec.arrival_ns
            <= rec.first_token_ns
            == rec.chunk_times_ns[0]
            <= rec.finish_ns
            == rec.chunk_times_ns[-1]
        )
    assert result.output_tokens == 30
    t = result.timing
    assert t["warmup_requests"] == 3 and t["engine_start_s"] >= 0 and t["warmup_s"] >= 0
    assert 0 <= t["submit_s"] <= t["first_token_s"] <= result.wall_s


def test_the_tracer_is_paused_for_the_warm_up_only(tmp_path, scripted):
    vllm_run.run(_options(tmp_path, warmup=2))
    events = scripted["engine"].events
    rpcs = [(i, cmd) for i, (kind, cmd) in enumerate(events) if kind == "rpc"]
    assert [cmd for _, cmd in rpcs] == ["pause", "resume", "close"]
    warm = [i for i, (kind, rid) in enumerate(events) if kind == "add" and rid.startswith(WARMUP_PREFIX)]
    work = [i for i, (kind, rid) in enumerate(events) if kind == "add" and not rid.startswith(WARMUP_PREFIX)]
    assert len(warm) == 2
    assert rpcs[0][0] < warm[0] and warm[-1] < rpcs[1][0] < work[0] and rpcs[2][0] > work[-1]


def test_no_trace_and_no_warmup(tmp_path, scripted, monkeypatch):
    monkeypatch.setenv(adapter.ENV_TRACE_DIR, str(tmp_path / "inherited"))
    seen = {}

    def capture(engine_args: Any, usage_context: Any = None, **_: Any) -> ScriptedEngine:
        import os

        seen["trace_dir"] = os.environ.get(adapter.ENV_TRACE_DIR)
        scripted["engine"] = ScriptedEngine(engine_args.max_num_seqs)
        return scripted["engine"]

    from vllm.v1.engine.llm_engine import LLMEngine

    monkeypatch.setattr(LLMEngine, "from_engine_args", capture)
    result = vllm_run.run(_options(tmp_path, trace=False, warmup=0))
    assert seen["trace_dir"] is None  # an inherited MOECAP_TRACE_DIR does not turn the plugin on
    assert not [e for e in scripted["engine"].events if e[0] == "rpc"]
    assert not [e for e in scripted["engine"].events if e[0] == "add" and e[1].startswith(WARMUP_PREFIX)]
    assert result.timing["warmup_s"] == 0.0 and result.requests == 6
    assert sorted(p.name.split(".")[-2] for p in result.files) == ["outputs", "requests"]


def test_a_lower_concurrency_point_is_a_client_closed_loop(tmp_path, scripted):
    session = vllm_run.VllmSession(_options(tmp_path, batch_size=4, trace=False))
    session.start()
    prompts = session.prompts("synthetic:12x3", 6)
    records, wall_s, delays = session.run_point(prompts, concurrency=2)
    again = session.prompts("synthetic:12x3", 2)
    session.stop(records=records)
    engine: ScriptedEngine = scripted["engine"]
    assert engine.max_running == 2 and len(records) == 6 and wall_s > 0
    assert {p.req_id for p in again}.isdisjoint(p.req_id for p in prompts)  # unique within a session
    # Closed loop: the later hand-overs wait for finished requests, so they come after the first token.
    assert delays["submit_s"] > delays["first_token_s"] >= 0


def test_the_warm_up_climbs_the_residue_ladder_one_step_per_group_before_the_shapes(tmp_path, budgeted):
    """With the engine's step budget known (64 tokens here; 3 in flight × 12-token prompts = 36 reachable)
    the warm-up first hands over 16 groups of 16…31 prompt tokens, each alone and stepped to its end
    before the next, tracer paused; then the workload's shapes; none of it recorded."""
    from moecap.collect.workload import residue_ladder

    result = vllm_run.run(_options(tmp_path, max_batch_tokens=64))
    engine: ScriptedEngine = budgeted["engine"]
    assert vllm_run.step_budget(engine) == 64
    events = engine.events
    ladder = [rid for kind, rid in events if kind == "add" and "ladder" in rid]
    expected = residue_ladder(step_budget=64, max_prompt_tokens=12, max_requests=3, vocab_size=1, seed=0)
    assert len(expected) == 16 and len(ladder) == sum(len(g) for g in expected)
    groups: list[list[str]] = []
    for i, (kind, rid) in enumerate(events):
        if kind == "add" and "ladder" in rid:
            if events[i - 1][0] != "add":
                groups.append([])
            groups[-1].append(rid)
    assert [len(g) for g in groups] == [len(g) for g in expected]  # each group handed over alone
    counts = [int(g[0].split("ladder-")[1].split("-")[0]) for g in groups]
    assert counts == list(range(16, 32))
    rpcs = [i for i, (kind, _) in enumerate(events) if kind == "rpc"]
    first_ladder = events.index(("add", ladder[0]))
    shapes = [
        i
        for i, (kind, rid) in enumerate(events)
        if kind == "add" and rid.startswith(WARMUP_PREFIX) and "ladder" not in rid
    ]
    workload = [i for i, (kind, rid) in enumerate(events) if kind == "add" and rid.startswith("r")]
    assert rpcs[0] < first_ladder < events.index(("add", ladder[-1])) < shapes[0] < rpcs[1] < workload[0]
    assert sorted(r.req_id for r in result.records) == [f"r{i}" for i in range(6)]
    assert result.timing["warmup_ladder_steps"] == 16 and result.timing["warmup_requests"] == 3


def test_the_ladder_climbs_no_higher_than_the_prompts_can_fill(tmp_path, budgeted):
    """Two 12-token prompts at batch size 8 form steps of at most 24 tokens: below the ladder's first size
    with its +15 (31), so no climb, though 8 × 12 would reach 64."""
    result = vllm_run.run(_options(tmp_path, max_batch_tokens=64, batch_size=8, num_prompts=2))
    engine: ScriptedEngine = budgeted["engine"]
    assert vllm_run.step_budget(engine) == 64
    assert not [rid for kind, rid in engine.events if kind == "add" and "ladder" in rid]
    assert result.timing["warmup_ladder_steps"] == 0 and len(result.records) == 2


@pytest.mark.parametrize("budgeted", [40], indirect=True, ids=["max-model-len-40"])
def test_ladder_groups_use_prompts_as_long_as_the_engine_takes(tmp_path, budgeted):
    """With vLLM's own `ModelConfig` saying 40 tokens (39 of prompt with one output token), every ladder
    group of 16…31 tokens is one prompt (the workload's prompts are 12 tokens: without the model config
    they are 2-3 prompts each), so no engine can split a group over two steps; the reach stays the run's
    (3 in flight × 12 tokens)."""
    result = vllm_run.run(_options(tmp_path, max_batch_tokens=64))
    engine: ScriptedEngine = budgeted["engine"]
    assert vllm_run.longest_prompt(engine) == 39
    ladder = [rid for kind, rid in engine.events if kind == "add" and "ladder" in rid]
    assert ladder == [f"{WARMUP_PREFIX}ladder-{c}-0" for c in range(16, 32)]
    assert result.timing["warmup_ladder_steps"] == 16


def test_drive_reads_the_step_budget_from_vllms_own_dev_mode_server_info(monkeypatch):
    """`drive --warmup-ladder auto` against vLLM: the body vLLM's own dev-mode endpoint
    (`GET /server_info?config_format=json`, VLLM_SERVER_DEV_MODE=1) returns for a real `VllmConfig` gives
    `vllm_limits` the budget the offline runner reads from the engine (its system-environment part, which
    runs collect_env, is left out)."""
    import asyncio
    import json

    from vllm.config import VllmConfig
    from vllm.entrypoints.serve.dev.server_info import api_router

    from moecap.collect.driver.drive import vllm_limits

    monkeypatch.setattr(api_router, "_get_system_env_info_cached", lambda: {})
    vc = VllmConfig(scheduler_config=_scheduler_config(96, 5))
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(vllm_config=vc)))
    response = asyncio.run(api_router.show_server_info(request, config_format="json"))
    limits = vllm_limits(json.loads(response.body))
    assert limits.step_budget == vllm_run.step_budget(SimpleNamespace(vllm_config=vc)) == 96
    assert limits.max_requests == 5
