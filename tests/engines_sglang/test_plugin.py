"""The plugin through the real `HookRegistry`, wrapping the real `ModelRunner.forward`, counting from
the real select-experts gatherer."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from sglang_objects import E, K, L, location_metadata, make_batch


def _decode(rids, seq):
    return make_batch("DECODE", rids, seq_lens=seq)


def test_inert_without_trace_dir(sgl, monkeypatch):
    monkeypatch.delenv("MOECAP_TRACE_DIR")
    sgl.install()
    assert not sgl.adapter.is_installed(sgl.ModelRunner)


def test_registers_through_hook_registry_and_wraps_forward(sgl):
    sgl.install()
    assert sgl.adapter.is_installed(sgl.ModelRunner)
    from moecap.collect.engines.sglang import compat

    assert compat.FORWARD_TARGET in sgl.HookRegistry._patched


def test_rows_and_counts_through_the_real_forward(sgl):
    sgl.install()
    rec = sgl.set_recorder()
    # Pass 1: 3 prompt tokens; pass 2: decode of 2 requests in a graph padded to 4 rows (ids -1).
    extend_ids = torch.tensor([[0, 1], [1, 2], [7, 7]], dtype=torch.int32)
    decode_ids = torch.tensor([[3, 4], [4, 5], [-1, -1], [-1, -1]], dtype=torch.int32)
    r = sgl.runner([extend_ids, decode_ids])
    fb1 = make_batch("EXTEND", ["a"], seq_lens=[3], extend_seq_lens_cpu=[3], extend_prefix_lens_cpu=[0],
                     extend_num_tokens=3)  # fmt: skip
    r.forward(fb1)
    r.forward(_decode(["a", "b"], [4, 9]))
    assert rec.starts == 1, "the tracer starts SGLang's recorder once"
    rows, counts = sgl.rows()
    assert [row["step"] for row in rows] == [1, 2], "steps keyed by ModelRunner.forward_pass_id"
    assert [row["phase"] for row in rows] == ["prefill", "decode"]
    for row in rows:
        c = counts[row["step"]]
        assert len(c) == L * E
        for layer in range(L):
            assert sum(c[layer * E : (layer + 1) * E]) == row["num_tokens"] * K
    first = counts[1][:E]
    assert first == [1, 2, 1, 0, 0, 0, 0, 2], "a duplicated id counts twice"
    meta = sgl.meta
    assert meta.engine.name == "sglang" and meta.moe.layer_ids == [0, 1, 2]
    assert meta.moe.num_experts == E and meta.moe.top_k == K and meta.moe.counts_available
    assert meta.extra["sglang"]["counts_scope"] == "replicated"


def test_warm_up_passes_are_run_but_not_recorded(sgl):
    # `run --warmup`: requests whose ids start with the warm-up prefix; the pass still runs (SGLang's
    # forward_pass_id advances), and the workload's passes after it are recorded with their own keys.
    from moecap.collect.workload import WARMUP_PREFIX

    sgl.install()
    sgl.set_recorder()
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    r = sgl.runner([ids, ids, ids])
    r.forward(_decode([f"{WARMUP_PREFIX}0", f"{WARMUP_PREFIX}1"], [4, 5]))
    r.forward(_decode(["a", "b"], [4, 5]))
    r.forward(_decode(["a", "b"], [5, 6]))
    rows, counts = sgl.rows()
    assert r.forward_pass_id == 3
    assert [row["step"] for row in rows] == [2, 3] and sorted(counts) == [2, 3]
    assert all(not any(x.startswith(WARMUP_PREFIX) for x in row["req_ids"]) for row in rows)


def test_record_warmup_keeps_warm_up_passes(sgl, monkeypatch):
    # MOECAP_RECORD_WARMUP=1 (a diagnostic: how did the engine form drive's ladder?) records them too.
    from moecap.collect.workload import WARMUP_PREFIX

    monkeypatch.setenv("MOECAP_RECORD_WARMUP", "1")
    sgl.install()
    sgl.set_recorder()
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    r = sgl.runner([ids, ids])
    r.forward(_decode([f"{WARMUP_PREFIX}ab-ladder-17-0", f"{WARMUP_PREFIX}ab-ladder-17-1"], [4, 5]))
    r.forward(_decode(["a", "b"], [4, 5]))
    rows, _ = sgl.rows()
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["req_ids"] == [f"{WARMUP_PREFIX}ab-ladder-17-0", f"{WARMUP_PREFIX}ab-ladder-17-1"]


def test_padding_after_forward_does_not_leak_into_the_row(sgl):
    sgl.install()
    sgl.set_recorder()
    r = sgl.runner([torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)], pad_to=8)
    fb = make_batch("EXTEND", ["a", "b"], seq_lens=[1, 1], extend_seq_lens_cpu=[1, 1],
                    extend_prefix_lens_cpu=[0, 0], extend_num_tokens=2)  # fmt: skip
    r.forward(fb)
    assert fb.batch_size == 8 and "pad" in fb.rids, "the stand-in really padded the batch"
    rows, _ = sgl.rows()
    assert rows[0]["num_reqs"] == 2 and rows[0]["req_ids"] == ["a", "b"] and rows[0]["num_tokens"] == 2


def test_eplb_physical_counts_become_logical(sgl):
    sgl.install()
    # 10 physical slots over 8 logical experts: slots 8 and 9 replicate experts 0 and 5.
    p2l = torch.tensor([[*list(range(8)), 0, 5]] * L)
    sgl.set_recorder(location_metadata(p2l=p2l))
    r = sgl.runner([torch.tensor([[8, 9], [0, 5]], dtype=torch.int32)])
    r.forward(_decode(["a", "b"], [2, 2]))
    _rows, counts = sgl.rows()
    assert counts[1][:E] == [2, 0, 0, 0, 0, 2, 0, 0]
    assert sgl.meta.extra["sglang"]["eplb_conversion"] is True


def test_without_stat_mode_steps_are_kept_and_the_reason_recorded(sgl):
    sgl.install()
    sgl.set_recorder()
    r = sgl.runner([], mode=None)
    r.forward(_decode(["a"], [3]))
    rows, counts = sgl.rows()
    assert len(rows) == 1 and counts == {}
    assert not sgl.meta.moe.counts_available
    assert "--expert-distribution-recorder-mode stat" in sgl.meta.moe.counts_unavailable_reason


def test_counts_off(sgl, monkeypatch):
    monkeypatch.setenv("MOECAP_COUNTS", "0")
    sgl.install()
    sgl.set_recorder()
    r = sgl.runner([torch.tensor([[0, 1]], dtype=torch.int32)])
    r.forward(_decode(["a"], [3]))
    rows, counts = sgl.rows()
    assert len(rows) == 1 and counts == {} and "MOECAP_COUNTS=0" in sgl.meta.moe.counts_unavailable_reason


def test_draft_passes_are_tagged_and_keyed_apart(sgl):
    sgl.install()
    sgl.set_recorder()
    target = sgl.runner([torch.tensor([[0, 1]], dtype=torch.int32)])
    draft = sgl.runner([], draft=True)
    target.forward(_decode(["a"], [3]))
    draft.forward(_decode(["a"], [3]))
    rows, counts = sgl.rows()
    assert [(r["is_draft"], r["step"]) for r in rows] == [(False, 1), (True, sgl.adapter.DRAFT_STEP_BASE + 1)]
    assert set(counts) == {1}, "draft passes carry no expert counts"


def test_a_failure_of_ours_never_reaches_the_engine(sgl, monkeypatch):
    from moecap.collect.engines.sglang import compat

    sgl.install()
    sgl.set_recorder()
    r = sgl.runner([torch.tensor([[0, 1]], dtype=torch.int32)])
    r.forward(_decode(["a"], [3]))

    def broken(fb):
        raise RuntimeError("a field SGLang renamed")

    monkeypatch.setattr(compat, "batch_fields", broken)
    out = r.forward(_decode(["a"], [4]))  # the pass still runs, and returns SGLang's output
    assert out is not None and r.forward_pass_id == 2
    tracer = sgl.adapter.current_tracer()
    assert tracer.errors and "a field SGLang renamed" in tracer.errors[0]
    rows, _ = sgl.rows()
    assert [row["step"] for row in rows] == [1], "what was recorded before the failure is kept"


def test_generated_dist_info_loads_the_plugin_in_a_fresh_process(sgl, tmp_path):
    """What the GPU script relies on: moecap not installed as a distribution there, SGLang's spawned
    scheduler finds the plugin through a generated .dist-info on PYTHONPATH (SGLANG_PLUGINS allows it)."""
    plugin = tmp_path / "plugin"
    sgl.adapter.write_plugin_dist_info(plugin, name="moecap_probe")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["SGLANG_PLUGINS"] = "moecap_probe"  # only the generated entry point may load
    env["MOECAP_TRACE_DIR"] = str(tmp_path / "trace")
    code = textwrap.dedent(
        """
        import multiprocessing as mp

        def child(q):
            from sglang.srt.plugins import load_plugins
            load_plugins()  # what run_scheduler_process does first
            from sglang.srt.model_executor.model_runner import ModelRunner
            from moecap.collect.engines.sglang import adapter as a
            q.put(a.is_installed(ModelRunner))

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")  # SGLang's start method
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q,))
            p.start()
            print("INSTALLED", q.get(timeout=200))
            p.join()
        """
    )
    script = tmp_path / "spawn_probe.py"  # spawn re-imports __main__ from a file
    script.write_text(code)
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert "INSTALLED True" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


@pytest.mark.parametrize("backend", ["deepep"])
def test_all_to_all_backends_write_every_rank(sgl, backend):
    sgl.install()
    sgl.set_recorder()
    r = sgl.runner([torch.tensor([[0, 1]], dtype=torch.int32)])
    r.server_args.moe_a2a_backend = backend
    r.forward(_decode(["a"], [3]))
    rows, _ = sgl.rows()
    assert len(rows) == 1 and sgl.meta.extra["sglang"]["counts_scope"] == "sum_over_ranks"


def test_graph_padded_rows_routed_to_real_experts_are_not_counted(sgl):
    # A decode of 2 requests replayed in a graph of 4 rows, as Qwen2-MoE runs in SGLang 0.5.16: the
    # padded rows are routed to real experts (no -1), and SGLang's gatherer would count them.
    from moecap.collect.engines.sglang import compat

    sgl.install()
    assert compat.CAPTURE_TARGET in sgl.HookRegistry._patched
    sgl.set_recorder()
    decode_ids = torch.tensor([[3, 4], [4, 5], [6, 7], [6, 7]], dtype=torch.int32)
    r = sgl.runner([decode_ids])
    sgl.adapter._before_graph_capture(r)  # what HookRegistry runs before init_cuda_graphs
    r.forward(_decode(["a", "b"], [4, 9]))
    rows, counts = sgl.rows()
    (row,) = rows
    assert row["num_tokens"] == 2
    assert counts[row["step"]][:E] == [0, 0, 0, 1, 2, 1, 0, 0], "only the two real rows"
    for layer in range(L):
        assert sum(counts[row["step"]][layer * E : (layer + 1) * E]) == 2 * K


def test_without_the_capture_hook_padding_is_counted_as_sglang_does(sgl):
    # No live-token scalar (e.g. the hook did not run): the gatherer counts what SGLang gives it.
    sgl.install()
    sgl.set_recorder()
    decode_ids = torch.tensor([[3, 4], [4, 5], [6, 7], [6, 7]], dtype=torch.int32)
    r = sgl.runner([decode_ids])
    r.forward(_decode(["a", "b"], [4, 9]))
    rows, counts = sgl.rows()
    assert counts[rows[0]["step"]][:E] == [0, 0, 0, 1, 2, 1, 2, 2]


def test_steps_only_leaves_the_gatherer_alone(sgl, monkeypatch):
    import importlib

    from moecap.collect.engines.sglang import compat

    monkeypatch.setenv("MOECAP_COUNTS", "0")
    cls = getattr(importlib.import_module(compat.GATHERER_CLASS[0]), compat.GATHERER_CLASS[1])
    sgl.install()
    assert not getattr(cls.on_select_experts, "_moecap_masks_padding", False)
    assert compat.CAPTURE_TARGET not in sgl.HookRegistry._patched


def _rows_so_far(path) -> int:
    """Rows a trace file being written holds now (0 while it is still empty: created, no schema yet)."""
    from moecap.schemas.errors import TraceError
    from moecap.schemas.reader import read_trace_file

    try:
        return read_trace_file(path).table.num_rows
    except TraceError:
        return 0


_IDLE_SCHEDULER = """
import pathlib, sys, time
import pytest, torch
sys.path.insert(0, {tests!r})
from sglang_objects import Sgl, make_batch

mp = pytest.MonkeyPatch()
env = Sgl(mp, pathlib.Path({tmp!r}))
mp.setenv("MOECAP_STATS_DIR", {stats!r})
env.install()  # register() in this process's main thread, as load_plugins() in a scheduler
env.set_recorder()
r = env.runner([torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)])
r.forward(make_batch("EXTEND", ["a", "b"], seq_lens=[1, 1], extend_seq_lens_cpu=[1, 1],
                     extend_prefix_lens_cpu=[0, 0], extend_num_tokens=2))
print("READY", flush=True)
while True:  # idle, waiting for requests, until SGLang's shutdown SIGKILLs it
    time.sleep(0.05)
"""


@pytest.mark.parametrize("close_first", [True, False])
def test_close_request_ends_the_files_before_sglang_kills_the_scheduler(sgl, tmp_path, close_first):
    """SGLang's shutdown SIGKILLs its schedulers; `request_close` (what `run` sends first) makes the
    files end with the end-of-stream marker. Without it the same kill leaves them truncated."""
    import signal
    import time

    from moecap.schemas.reader import read_trace_file

    stats = tmp_path / "stats"
    script = tmp_path / "scheduler.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(_IDLE_SCHEDULER.format(tests=tests, tmp=str(tmp_path), stats=str(stats)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()[-3000:]
        deadline = time.monotonic() + 60
        files: list = []
        while time.monotonic() < deadline:  # the idle flusher writes the row and the stats
            files = sorted((tmp_path / "trace").glob("*.steps.arrow"))
            if files and list(stats.glob("sglang-tracer-*.json")) and _rows_so_far(files[0]):
                break
            time.sleep(0.1)
        assert files, "the scheduler wrote no steps file"
        if close_first:
            final, problems = sgl.adapter.request_close(stats, timeout_s=30)
            assert problems == []
            assert [s["closed"] for s in final if s["recorder"]] == [True]
            assert proc.poll() is None, "closing the files must not stop the scheduler"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    tf = read_trace_file(files[0])
    assert tf.table.num_rows == 1
    assert tf.complete is close_first


_FAKE_LAUNCH_SERVER = """
import os, signal, subprocess, sys, time
# Stands in for `python -m sglang.launch_server`: its scheduler is a child; on SIGINT / SIGTERM it ends
# the way SGLang's server does (kill_process_tree: SIGKILL to the schedulers, no exit handlers run there).
child = subprocess.Popen([sys.executable, {scheduler!r}])
open({pids!r}, "w").write(str(os.getpid()))
def stop(signum, frame):
    open({heard!r}, "w").write(str(signum))
    os.kill(child.pid, signal.SIGKILL)  # (not child.kill(): the main thread holds Popen's wait lock)
    os.waitpid(child.pid, 0)
    os._exit(0)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
child.wait()
sys.exit(1)
"""

_SUPERVISOR = """
import sys
from pathlib import Path
from moecap.collect.engines.sglang import adapter
from moecap.collect.engines.offline import supervise_traced_server
stats = Path({stats!r})
def before_stop():
    return adapter.request_close(stats, 30)[1] if {close!r} else []
rc = supervise_traced_server([sys.executable, {server!r}], dict(__import__("os").environ), engine="SGLang",
                             run_id="r", out_dir=Path("."), warnings=[], before_stop=before_stop)
print("RC", rc, flush=True)
"""


@pytest.mark.parametrize("close", [True, False])
def test_serve_supervisor_closes_the_files_before_the_server_kills_its_scheduler(sgl, tmp_path, close):
    """`moecap-collect serve --engine sglang` runs the server under `supervise_traced_server`: Ctrl-C
    (SIGINT to the terminal's process group) reaches the supervisor only; it asks the recording scheduler
    to close its files, then passes the signal on, and the server SIGKILLs the scheduler as SGLang does.
    The files end with the end-of-stream marker; with a `before_stop` that does nothing they do not."""
    import signal
    import time

    from moecap.schemas.reader import read_trace_file

    stats = tmp_path / "stats"
    tests = os.path.dirname(os.path.abspath(__file__))
    scheduler, server, supervisor = (tmp_path / n for n in ("scheduler.py", "server.py", "supervisor.py"))
    heard = tmp_path / "server-heard"
    scheduler.write_text(_IDLE_SCHEDULER.format(tests=tests, tmp=str(tmp_path), stats=str(stats)))
    server_pid = tmp_path / "server-pid"
    server.write_text(
        _FAKE_LAUNCH_SERVER.format(scheduler=str(scheduler), heard=str(heard), pids=str(server_pid))
    )
    supervisor.write_text(_SUPERVISOR.format(stats=str(stats), close=close, server=str(server)))
    proc = subprocess.Popen(
        [sys.executable, str(supervisor)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, standing in for the terminal's
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()[-3000:]
        deadline = time.monotonic() + 60
        files: list = []
        while time.monotonic() < deadline:  # the idle flusher writes the row and the stats
            files = sorted((tmp_path / "trace").glob("*.steps.arrow"))
            if files and list(stats.glob("sglang-tracer-*.json")) and _rows_so_far(files[0]):
                break
            time.sleep(0.1)
        assert files, "the scheduler wrote no steps file"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if server_pid.exists():  # the server (and its scheduler) run in their own session
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(server_pid.read_text()), signal.SIGKILL)
    assert "RC 0" in out, err[-3000:]
    assert heard.read_text() == str(int(signal.SIGINT))  # the server heard the Ctrl-C, from the supervisor
    assert "closing the trace files first" in err
    tf = read_trace_file(files[0])
    assert tf.table.num_rows == 1
    assert tf.complete is close
