"""`moecap-collect serve|run --engine sglang`: the server's command line and environment, SGLang's own
parser accepting them, the closed loop over `Engine.async_generate` streams (against a stand-in whose
signature is checked against the real `sglang.Engine`), and the client tables it writes.

The closed-loop tests need no SGLang and run in the main suite too; the rest use the real classes
(`sglang_version` fixture: `.ci/sglang-venv.sh test`)."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from moecap.collect.datasets import load_samples
from moecap.collect.engines.sglang import adapter
from moecap.collect.engines.sglang import runner as sglang_run
from moecap.collect.errors import CollectError
from moecap.collect.workload import WARMUP_PREFIX, make_prompts, write_client_tables
from moecap.schemas import EngineInfo, ModelInfo, RunMetadata, open_traces


class FakeEngine:
    """`sglang.Engine`'s streaming API as the tokenizer manager serves it: `async_generate(..., stream=True)`
    returns an async iterator of `{"output_ids", "meta_info": {"id", "completion_tokens", "cached_tokens",
    "finish_reason"}}` chunks; `output_ids` cumulative (SGLang's default) or only the new ids
    (`incremental_streaming_output`). One token per engine step for every request in flight."""

    def __init__(self, *, incremental: bool = False, tokens_per_chunk: int = 1, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.env = dict(os.environ)
        cfg = Path(str(kwargs.get("model_path", "")), "config.json")
        self.model_config = json.loads(cfg.read_text()) if cfg.is_file() else None
        self.loop = asyncio.new_event_loop()
        self.incremental = incremental
        self.tokens_per_chunk = tokens_per_chunk
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: list[dict[str, Any]] = []
        self.shut = False

    async def async_generate(
        self,
        prompt: Any = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        stream: bool = False,
        rid: str | None = None,
    ) -> Any:
        assert stream is True and input_ids and rid
        self.calls.append(
            {"rid": rid, "input_ids": list(input_ids), "sampling_params": dict(sampling_params or {})}
        )
        return self._stream(rid, list(input_ids), int((sampling_params or {})["max_new_tokens"]))

    async def _stream(self, rid: str, ids: list[int], n: int) -> Any:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        out: list[int] = []
        try:
            while len(out) < n:
                await asyncio.sleep(0.001)
                new = [(ids[0] + len(out) + j) % 97 for j in range(min(self.tokens_per_chunk, n - len(out)))]
                out += new
                done = len(out) == n
                meta = {
                    "id": rid,
                    "completion_tokens": len(out),
                    "cached_tokens": 0,
                    "prompt_tokens": len(ids),
                    "finish_reason": {"type": "length", "length": n} if done else None,
                }
                yield {"output_ids": list(new) if self.incremental else list(out), "meta_info": meta}
        finally:
            self.in_flight -= 1

    def shutdown(self) -> None:
        self.shut = True


def _prompts(n: int, out: int) -> list[Any]:
    samples = load_samples(f"synthetic:6x{out}", n, seed=0, vocab_size=1000)
    return make_prompts(samples, None, out, 1000)


def _options(tmp_path: Path, **kw: Any) -> sglang_run.SglangRunOptions:
    base = dict(model="m", dataset="synthetic:6x4", num_prompts=5, batch_size=2, out=str(tmp_path))
    base.update(kw)
    return sglang_run.SglangRunOptions(**base)


@pytest.mark.parametrize(("incremental", "per_chunk"), [(False, 1), (True, 1), (False, 3), (True, 2)])
def test_closed_loop_keeps_batch_size_in_flight_and_times_every_chunk(tmp_path, incremental, per_chunk):
    engine = FakeEngine(incremental=incremental, tokens_per_chunk=per_chunk)
    prompts = _prompts(5, 4)
    seen = []
    records, wall_s = sglang_run.drive(
        engine, prompts, _options(tmp_path), lambda *a: seen.append(a), concurrency=2
    )
    assert engine.max_in_flight == 2 and len(engine.calls) == 5
    assert sorted(c["rid"] for c in engine.calls) == sorted(p.req_id for p in prompts)
    assert engine.calls[0]["sampling_params"] == {
        "max_new_tokens": 4,
        "ignore_eos": False,
        "temperature": 0.0,
    }
    assert seen[-1] == (5, 5, 20) and wall_s > 0
    by_id = {p.req_id: p for p in prompts}
    for rec in records:
        p = by_id[rec.req_id]
        assert rec.engine_req_id == rec.req_id and rec.prompt_ids == p.token_ids
        assert rec.output_ids == [(p.token_ids[0] + j) % 97 for j in range(4)]
        assert sum(rec.chunk_tokens) == 4 and len(rec.chunk_times_ns) == -(-4 // per_chunk)
        assert (
            rec.arrival_ns
            < rec.first_token_ns
            == rec.chunk_times_ns[0]
            <= rec.chunk_times_ns[-1]
            == rec.finish_ns
        )
        assert rec.chunk_times_ns == sorted(rec.chunk_times_ns)
        assert rec.finish_reason == "length" and rec.cached_prompt_tokens == 0


def test_by_default_every_prompt_is_handed_over_at_once(tmp_path):
    # As SGLang's own offline benchmark does: SGLang (max_running_requests) admits them, not the client.
    engine = FakeEngine()
    records, _ = sglang_run.drive(engine, _prompts(5, 4), _options(tmp_path), None)
    assert engine.max_in_flight == 5 and len(records) == 5
    last_submission = max(r.arrival_ns for r in records)
    assert last_submission < min(r.first_token_ns for r in records)


def test_the_client_tables_hold_the_loops_records(tmp_path):
    engine = FakeEngine()
    records, _ = sglang_run.drive(engine, _prompts(3, 2), _options(tmp_path, num_prompts=3), None)
    meta = RunMetadata(run_id="r-sgl", engine=EngineInfo(name="sglang"), model=ModelInfo(id="m"))
    write_client_tables(tmp_path, meta, records, None)
    (run,) = open_traces([tmp_path], strict=True).runs.values()
    (req,) = run.tables("requests")
    rows = {r["req_id"]: r for r in req.table.to_pylist()}
    assert len(rows) == 3
    for rec in records:
        row = rows[rec.req_id]
        assert (row["arrival_ns"], row["first_token_ns"], row["finish_ns"]) == (
            rec.arrival_ns,
            rec.first_token_ns,
            rec.finish_ns,
        )
        assert row["chunk_times_ns"] == rec.chunk_times_ns and row["chunk_tokens"] == [1, 1]
        assert row["output_tokens"] == 2 and row["prompt_tokens"] == 6


def test_recorder_flags_are_added_unless_the_user_chose(tmp_path):
    stat = ["--expert-distribution-recorder-mode", "stat", "--expert-distribution-recorder-buffer-size", "1"]
    assert sglang_run.recorder_args(["--tp-size", "2"], counts=True) == stat
    assert sglang_run.recorder_args(["--expert-distribution-recorder-mode=per_pass"], counts=True) == []
    assert sglang_run.recorder_args([], counts=False) == []
    assert sglang_run.recorder_args(["--enable-eplb"], counts=True) == stat[:2]  # EPLB reads SGLang's buffer
    assert sglang_run.recorder_kwargs({}, counts=True) == {
        "expert_distribution_recorder_mode": "stat",
        "expert_distribution_recorder_buffer_size": 1,
    }
    assert sglang_run.recorder_kwargs({"expert_distribution_recorder_mode": "per_token"}, counts=True) == {}


def test_tracing_env_turns_the_plugin_on_in_every_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_PLUGINS", "other")
    env = sglang_run.tracing_env(
        tmp_path,
        "run-1",
        counts=False,
        model_id="m/x",
        workload={"dataset": "gsm8k"},
        strict=True,
        stats_dir="/s",
    )
    assert env[adapter.ENV_TRACE_DIR] == str(tmp_path.resolve()) and env[adapter.ENV_RUN_ID] == "run-1"
    assert (
        env[adapter.ENV_COUNTS] == "0"
        and env[adapter.ENV_STRICT] == "1"
        and env[adapter.ENV_STATS_DIR] == "/s"
    )
    assert json.loads(env[adapter.ENV_WORKLOAD]) == {"dataset": "gsm8k"}
    assert env["SGLANG_PLUGINS"] == "other,moecap"  # an allow-list would otherwise skip the tracer
    monkeypatch.delenv("SGLANG_PLUGINS")
    assert "SGLANG_PLUGINS" not in sglang_run.tracing_env(
        tmp_path, "r", counts=True, model_id="m", workload={}, strict=False
    )


# -- against the real SGLang -------------------------------------------------------------------------
def test_the_stand_in_has_the_real_engines_async_api(sglang_version):
    import sglang
    from sglang.srt.entrypoints.engine import Engine

    assert sglang.Engine._load() is Engine  # a LazyImport of the class run() constructs
    real = inspect.signature(Engine.async_generate).parameters
    fake = inspect.signature(FakeEngine.async_generate).parameters
    assert list(fake) == [p for p in real if p in fake]  # same names, same order
    for name in ("prompt", "sampling_params", "input_ids", "stream", "rid"):
        assert real[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
    assert inspect.iscoroutinefunction(Engine.async_generate)
    body = inspect.getsource(Engine.async_generate)
    assert "if stream is True:" in body and "return generator" in body
    assert "self.loop" in inspect.getsource(Engine.__init__) and callable(Engine.shutdown)
    from sglang.srt.managers import tokenizer_manager

    src = inspect.getsource(tokenizer_manager)
    for key in ('"completion_tokens"', '"cached_tokens"', '"finish_reason"', '"output_ids"', '"meta_info"'):
        assert key in src, key


def _parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


def test_serve_runs_sglangs_server_with_tracing_and_the_stat_recorder(sglang_version, tmp_path):
    from typer.testing import CliRunner

    from moecap.collect import cli

    seen: dict[str, Any] = {}
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 8}))
    original = sglang_run.serve_command

    def start(argv, env, before_stop):
        seen.update(argv=argv, env=env, stop_warnings=before_stop())
        return -2  # the server ended by SIGINT

    def serve_command(*args, **kwargs):
        return original(*args, start_fn=start, **kwargs)

    sglang_run.serve_command = serve_command
    try:
        cli._register()
        result = CliRunner().invoke(
            cli.app,
            ["serve", "--engine", "sglang", "--out", str(tmp_path / "t"), "--run-id", "r1", "--random-weights",
             str(cfg), "--tp-size", "2", "--skip-tokenizer-init"],
        )  # fmt: skip
    finally:
        sglang_run.serve_command = original
    assert result.exit_code == 130, result.output  # 128 + SIGINT, as a shell reports it
    assert seen["stop_warnings"] == []  # no recording scheduler started: nothing to close
    argv = seen["argv"]
    assert argv[:5] == [sys.executable, "-m", "sglang.launch_server", "--model-path", argv[4]]
    assert json.loads(Path(argv[4], "config.json").read_text())["num_experts"] == 8
    assert argv[5:] == ["--tp-size", "2", "--skip-tokenizer-init", "--host", "127.0.0.1", "--load-format", "dummy",
                        "--served-model-name", "tiny", "--expert-distribution-recorder-mode", "stat",
                        "--expert-distribution-recorder-buffer-size", "1"]  # fmt: skip
    env = seen["env"]
    assert env[adapter.ENV_TRACE_DIR] == str((tmp_path / "t").resolve()) and env[adapter.ENV_RUN_ID] == "r1"
    assert env[adapter.ENV_COUNTS] == "1"
    assert Path(env[adapter.ENV_STATS_DIR]).is_dir()  # where the schedulers' stats (and pids) appear
    # SGLang's own parser takes the command line as we built it.
    ns = _parser().parse_args(argv[3:])
    assert (ns.model_path, ns.tp_size, ns.load_format, ns.skip_tokenizer_init) == (argv[4], 2, "dummy", True)
    assert ns.served_model_name == "tiny"  # what /v1/models lists, so the driver records that name
    assert ns.host == "127.0.0.1"  # loopback unless the user names a host
    assert (ns.expert_distribution_recorder_mode, ns.expert_distribution_recorder_buffer_size) == ("stat", 1)
    import importlib.util

    assert importlib.util.find_spec("sglang.launch_server") is not None
    assert sglang_run.plugin_installed()


def test_engine_flags_parse_with_sglangs_own_parser(sglang_version):
    got = sglang_run.sglang_argv(["--tp-size", "2", "--chunked-prefill-size", "512", "--disable-cuda-graph"])
    assert got == {"tp_size": 2, "chunked_prefill_size": 512, "disable_cuda_graph": True}
    with pytest.raises(CollectError, match="cannot parse SGLang server flags"):
        sglang_run.sglang_argv(["--no-such-flag"])


def test_run_command_hands_engine_args_to_sglangs_parser(sglang_version, tmp_path, monkeypatch):
    """`moecap-collect run --engine sglang --engine-args "…"`: the flags reach `SglangRunOptions` as
    ServerArgs fields; a flag SGLang does not know is one line, before any engine starts."""
    import subprocess

    from typer.testing import CliRunner

    from moecap.collect import cli

    cli._register()
    seen: list[sglang_run.SglangRunOptions] = []

    def fake_run(self: Any, options: sglang_run.SglangRunOptions, **_: Any) -> Any:
        seen.append(options)
        raise CollectError("stop here")

    monkeypatch.setattr(sglang_run.SglangEngine, "run", fake_run)  # the registry's entry, as `run` calls it
    base = ["run", "--engine", "sglang", "--model", "m", "--dataset", "synthetic:8x2", "--num-prompts", "1",
            "--batch-size", "1", "--out", str(tmp_path / "t")]  # fmt: skip
    res = CliRunner().invoke(
        cli.app, [*base, "--engine-args", "--tp-size 2 --mem-fraction-static 0.7", "--strict-engine"]
    )
    assert isinstance(res.exception, CollectError) and "stop here" in str(res.exception)
    assert seen[0].engine_args == {"tp_size": 2, "mem_fraction_static": 0.7} and seen[0].strict_engine
    # The real command line: a flag SGLang does not know is one line, before anything starts.
    code = "import sys; sys.argv = ['moecap-collect', *sys.argv[1:]]; from moecap.collect.cli import main; main()"
    p = subprocess.run([sys.executable, "-c", code, *base, "--engine-args", "--tp-sizee 2"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2
    # (SGLang 0.5.16 itself warns on import that Triton is unsupported on a CPU host: not ours.)
    assert "usage:" not in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "moecap-collect: error: cannot parse SGLang server flags '--tp-sizee 2': unrecognized arguments: --tp-sizee 2"
    )
    assert not (tmp_path / "t").exists()


def _tiny_config(folder: Path) -> Path:
    """A Qwen2-MoE config.json small enough for SGLang's `ServerArgs` to resolve on a CPU."""
    cfg = folder / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 8,
                "num_experts_per_tok": 2, "vocab_size": 1000, "hidden_size": 64, "num_attention_heads": 4,
                "num_hidden_layers": 2, "intermediate_size": 128, "moe_intermediate_size": 32,
                "max_position_embeddings": 512,
            }
        )
    )  # fmt: skip
    return cfg


def _patch_engine(
    monkeypatch: Any, *, resolve_server_args: bool = False, max_req_input_len: int | None = None
) -> list[FakeEngine]:
    """`sglang.Engine` answering `FakeEngine`s (collected in the returned list); with `resolve_server_args`
    each carries SGLang's own `ServerArgs` built from its kwargs, as `Engine.server_args` (device "cpu":
    0.5.16 resolves a device); with `max_req_input_len`, a tokenizer manager holding it, as the engine's
    does once its scheduler is up."""
    import sglang
    from sglang.srt.server_args import ServerArgs

    made: list[FakeEngine] = []

    def engine(**kwargs: Any) -> FakeEngine:
        made.append(FakeEngine(**kwargs))
        if resolve_server_args:
            made[-1].server_args = ServerArgs(**kwargs, device="cpu")
        if max_req_input_len is not None:
            made[-1].tokenizer_manager = argparse.Namespace(max_req_input_len=max_req_input_len)
        return made[-1]

    monkeypatch.setattr(sglang, "Engine", engine)
    monkeypatch.delenv(adapter.ENV_TRACE_DIR, raising=False)
    return made


def test_run_builds_the_engine_from_server_args_and_writes_the_client_tables(
    sglang_version, tmp_path, monkeypatch
):
    from sglang.srt.server_args import ServerArgs

    from moecap.collect.engines.sglang import compat

    made = _patch_engine(monkeypatch)
    options = _options(
        tmp_path / "out", model=str(_tiny_config(tmp_path)), random_weights=True, max_new_tokens=3, run_id="run-s",
        cuda_graphs="off", max_batch_tokens=256, flush_wait_s=0.1, gpu_sample_interval_s=None,
    )  # fmt: skip
    result = sglang_run.run(options)
    (eng,) = made
    names = set(compat.server_arg_names(ServerArgs))
    assert set(eng.kwargs) <= names, set(eng.kwargs) - names
    assert eng.kwargs["load_format"] == "dummy" and eng.kwargs["skip_tokenizer_init"] is True
    assert (
        eng.kwargs["expert_distribution_recorder_mode"] == "stat" and eng.kwargs["disable_cuda_graph"] is True
    )
    assert eng.kwargs["chunked_prefill_size"] == 256
    assert eng.model_config is not None and eng.model_config["num_experts"] == 8
    assert (
        eng.env[adapter.ENV_TRACE_DIR] == str((tmp_path / "out").resolve())
        and eng.env[adapter.ENV_RUN_ID] == "run-s"
    )
    assert adapter.ENV_TRACE_DIR not in os.environ and eng.shut  # restored, shut down
    assert result.requests == 5 and result.output_tokens == 15
    (run,) = open_traces([tmp_path / "out"], strict=True).runs.values()
    assert run.run_id == "run-s" and {f.table_kind for f in run.files} == {"requests", "outputs"}
    meta = run.metadata
    assert meta.engine.name == "sglang" and meta.engine.version == sglang_version
    # SGLang admits (max_running_requests = batch size); every prompt was handed over at once, after a
    # warm-up of one batch of the workload's shapes that the results (and the trace) leave out.
    assert eng.kwargs["max_running_requests"] == 2 and eng.max_in_flight == 5
    warm = [c for c in eng.calls if c["rid"].startswith(WARMUP_PREFIX)]
    assert [c["rid"] for c in eng.calls[:2]] == [c["rid"] for c in warm] and len(warm) == 2
    assert [len(c["input_ids"]) for c in warm] == [len(c["input_ids"]) for c in eng.calls[2:4]]
    assert all(c["input_ids"] != w["input_ids"] for c in eng.calls[2:] for w in warm)
    assert (
        result.timing["warmup_requests"] == 2 and result.timing["first_token_s"] >= result.timing["submit_s"]
    )
    assert meta.workload["driver"] == "sglang-offline-engine-admission" and meta.workload["concurrency"] == 2
    assert meta.workload["num_prompts"] == 5 and meta.extra["timing"]["warmup_requests"] == 2
    assert (meta.moe.num_experts, meta.moe.top_k, meta.model.random_weights) == (8, 2, True)


def test_the_warm_up_climbs_the_residue_ladder_from_sglangs_resolved_server_args(
    sglang_version, tmp_path, monkeypatch
):
    """The step budget comes from the engine's own resolved `ServerArgs` (`Engine.server_args`: the
    smaller of `chunked_prefill_size` and `max_prefill_tokens`); with 2 in flight × 24-token prompts the
    run can form steps of up to 48 tokens, so the warm-up first hands over 32 groups of 16…47 prompt tokens,
    one group at a time and in that order, then the workload's shapes."""
    made = _patch_engine(monkeypatch, resolve_server_args=True)
    options = _options(
        tmp_path / "out", model=str(_tiny_config(tmp_path)), random_weights=True, dataset="synthetic:24x2",
        num_prompts=4, run_id="run-l", cuda_graphs="off", max_batch_tokens=64, flush_wait_s=0.1,
        gpu_sample_interval_s=None,
    )  # fmt: skip
    result = sglang_run.run(options)
    (eng,) = made
    assert sglang_run.step_budget(eng) == 64 == eng.server_args.chunked_prefill_size
    rids = [c["rid"] for c in eng.calls]
    ladder = [r for r in rids if "ladder" in r]
    counts = [int(r.split("ladder-")[1].split("-")[0]) for r in ladder]
    per_count = {c: sum(len(x["input_ids"]) for x in eng.calls if f"ladder-{c}-" in x["rid"]) for c in counts}
    assert list(per_count) == list(range(16, 48))  # every count 16…47, in order
    assert all(per_count[c] == c for c in per_count) and counts == sorted(counts)
    shapes = [i for i, r in enumerate(rids) if r.startswith(WARMUP_PREFIX) and "ladder" not in r]
    workload = [i for i, r in enumerate(rids) if not r.startswith(WARMUP_PREFIX)]
    assert rids.index(ladder[-1]) < shapes[0] and shapes[-1] < workload[0] and len(workload) == 4
    assert result.timing["warmup_ladder_steps"] == 32 and result.requests == 4


def test_drive_reads_the_step_budget_from_sglangs_server_info(sglang_version, tmp_path):
    """`drive --warmup-ladder auto` against SGLang: its /server_info body is the resolved `ServerArgs`
    merged with the scheduler's info (`max_total_num_tokens`, `max_req_input_len`), built by SGLang's own
    `build_server_info` (0.5.23) or, where that does not exist, as 0.5.16's http_server.server_info builds
    it (`dataclasses.asdict`). From SGLang's own `ServerArgs`, `sglang_limits` gives the budget the offline
    runner reads from the engine, the in-flight limit and the longest prompt it accepts."""
    import dataclasses
    from types import SimpleNamespace

    from sglang.srt.server_args import ServerArgs

    from moecap.collect.driver.drive import sglang_limits

    sa = ServerArgs(model_path=str(_tiny_config(tmp_path)), chunked_prefill_size=64, max_prefill_tokens=48,
                    max_running_requests=3, device="cpu")  # fmt: skip
    scheduler_info = {"status": "ready", "max_total_num_tokens": 4096, "max_req_input_len": 25}
    try:
        from sglang.srt.utils.common import build_server_info
    except ImportError:  # 0.5.16
        body = {**dataclasses.asdict(sa), **scheduler_info}
    else:
        body = build_server_info(sa, scheduler_info)
    limits = sglang_limits(json.loads(json.dumps(body, default=str)))
    assert limits.step_budget == sglang_run.step_budget(SimpleNamespace(server_args=sa)) == 48
    assert (limits.max_requests, limits.max_prompt_tokens) == (3, 24)


def test_ladder_groups_use_prompts_as_long_as_the_engine_takes(sglang_version, tmp_path, monkeypatch):
    """The engine's tokenizer manager says 64 (prompts of up to 63 tokens): every ladder group of 16…47
    tokens is then one prompt of exactly its count (the workload's 24-token prompts would need two), so the
    scheduler cannot split a group over two passes."""
    made = _patch_engine(monkeypatch, resolve_server_args=True, max_req_input_len=64)
    options = _options(
        tmp_path / "out", model=str(_tiny_config(tmp_path)), random_weights=True, dataset="synthetic:24x2",
        num_prompts=4, run_id="run-cap", cuda_graphs="off", max_batch_tokens=64, flush_wait_s=0.1,
        gpu_sample_interval_s=None,
    )  # fmt: skip
    sglang_run.run(options)
    (eng,) = made
    assert sglang_run.longest_prompt(eng) == 63
    ladder = [c for c in eng.calls if "ladder" in c["rid"]]
    assert [c["rid"] for c in ladder] == [f"{WARMUP_PREFIX}ladder-{n}-0" for n in range(16, 48)]
    assert [len(c["input_ids"]) for c in ladder] == list(range(16, 48))
