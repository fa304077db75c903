"""What the engine runners share (vLLM's and SGLang's `runner.py`, `base.OfflineSession`): the model argument
(a hub id, a folder, or a lone config.json for random weights), the tokenizer, the GPU telemetry sampler
that runs while the workload does, the engine's own flag parser kept to one error line, and the traced
server (exec'd or supervised). Engine-neutral: no engine is imported here. The workload side (prompts,
warm-up, the client record of a request and its rows) is `collect/workload.py`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecap.schemas import RunMetadata, new_run_id, trace_file_name

from ..errors import CollectError


def model_id_of(model: str) -> str:
    path = Path(model)
    stem = (
        path.parent.name
        if path.name == "config.json"
        else (path.stem if path.suffix == ".json" else path.name)
    )
    if path.exists():
        return stem.replace("__", "/", 1) if "__" in stem else stem
    return model


def model_dir(model: str, random_weights: bool, scratch: Path) -> str:
    """What an engine's model argument needs: a directory holding config.json (a lone config.json is
    copied into `scratch`), or the hub id as given."""
    path = Path(model)
    if path.is_file():
        if not random_weights:
            raise CollectError(f"--model {model!r} is a config.json without weights: pass --random-weights")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CollectError(f"--model {model!r}: not a readable config.json ({exc})") from None
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "config.json").write_text(json.dumps(config))
        return str(scratch)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CollectError(f"--model {model!r}: a directory without config.json")
        return str(path)
    return model


def read_config(model: str) -> dict[str, Any]:
    path = Path(model) / "config.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
    return {}


def load_tokenizer(source: str | None) -> Any | None:
    if source is None:
        return None
    path = Path(source)
    if path.is_dir() and not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise CollectError(f"--tokenizer {source!r}: cannot load ({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def gpu_sampler(out: Path, meta: RunMetadata, interval_s: float | None) -> Any:
    """An NVML sampler writing the run's `gpu_samples` file for the duration of the block; absent (no
    file) without NVML or when `interval_s` is falsy."""
    if not interval_s:
        yield None
        return
    from ..telemetry import GpuSampler

    sampler = GpuSampler(out / trace_file_name(meta, "gpu_samples"), meta, interval_s=interval_s)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


def exec_traced_server(
    argv: list[str],
    env: dict[str, str],
    *,
    engine: str,
    run_id: str,
    out_dir: Path,
    warnings: Sequence[str],
    exec_fn: Callable[[str, list[str], dict[str, str]], Any] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Print the run id and warnings, then replace this process by the engine's server (`exec_fn`
    stands in for `os.execvpe` in tests; then the argv and env are returned)."""
    for w in warnings:
        print(f"moecap-collect: warning: {w}", file=sys.stderr)
    print(
        f"moecap-collect: run {run_id}: tracing {engine} into {out_dir}/ ({shlex.join(argv[2:])})",
        file=sys.stderr,
    )
    sys.stderr.flush()
    (exec_fn or os.execvpe)(argv[0], argv, env)
    return argv, env


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals a supervised server is stopped with (Ctrl-C, `kill`, a closed terminal)."""


def supervise_traced_server(
    argv: list[str],
    env: dict[str, str],
    *,
    engine: str,
    run_id: str,
    out_dir: Path,
    warnings: Sequence[str],
    before_stop: Callable[[], Sequence[str]],
) -> int:
    """Run the engine's server as a child and return its exit status; a stop signal to this process
    first runs `before_stop()` (e.g. ask the engine's workers to close their trace files, returning one
    warning line per problem), then reaches the server. For engines whose shutdown SIGKILLs the workers
    that hold the trace files open.

    The server runs in its own session, so a terminal's Ctrl-C reaches this process only and the
    server hears it after `before_stop`; a second stop signal is passed on at once."""
    for w in warnings:
        print(f"moecap-collect: warning: {w}", file=sys.stderr)
    child = subprocess.Popen(argv, env=env, start_new_session=True)
    print(
        f"moecap-collect: run {run_id}: tracing {engine} (server pid {child.pid}) into {out_dir}/ "
        f"({shlex.join(argv[2:])})",
        file=sys.stderr,
    )
    sys.stderr.flush()
    stopping: list[int] = []

    def on_stop(signum: int, frame: Any) -> None:
        first = not stopping
        stopping.append(signum)
        if first:
            print(f"moecap-collect: stopping {engine}: closing the trace files first", file=sys.stderr)
            for line in before_stop():
                print(f"moecap-collect: warning: {line}", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {s: signal.signal(s, on_stop) for s in STOP_SIGNALS}
    try:
        return child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if child.poll() is None:  # this process is leaving on an exception: do not orphan the server
            child.terminate()


def parse_engine_flags(parse: Callable[[], Any], what: str, argv: Sequence[str]) -> Any:
    """`parse()` (an engine's argparse over `argv`) with argparse's usage dump kept off stderr: a flag
    the engine rejects becomes one `CollectError` line naming the flags and argparse's reason."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse()
    except (SystemExit, Exception) as exc:
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        reason = lines[-1].split("error: ", 1)[-1] if lines else str(exc) or type(exc).__name__
        raise CollectError(f"cannot parse {what} flags {shlex.join(argv)!r}: {reason}") from None


def has_flag(args: Sequence[str], flag: str) -> bool:
    """`flag` is among `args` (`--flag value` or `--flag=value`)."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def plugin_installed(group: str, value: str) -> bool:
    """True when an engine's plugin loader will find moecap's entry point `value` in `group` (moecap
    installed, editable or not, or a `.dist-info` on the path)."""
    import importlib.metadata

    return any(ep.value == value for ep in importlib.metadata.entry_points(group=group))


def engine_preflight(
    check_version: Callable[[bool], str | None],
    strict: bool,
    *,
    trace: bool,
    group: str,
    value: str,
    label: str,
    extra: str,
) -> list[str]:
    """The engine's release (`check_version`: a warning, or a `CollectError` when `strict`) and, when
    tracing, moecap's entry point (a `CollectError` line when missing: the engine's processes would not
    load the tracer). Returns the warnings."""
    warning = check_version(strict)
    if trace and not plugin_installed(group, value):
        raise CollectError(
            f"moecap's {group} entry point is not installed, so {label}'s engine processes would not load the "
            f"tracer: install moecap into this environment (pip install -e . or pip install 'moecap[{extra}]')"
        )
    return [warning] if warning else []


@dataclass
class ServePlan:
    """What a traced server needs before it starts: where, which run, which model argument, which flags."""

    out_dir: Path
    run_id: str
    model_id: str
    target: str
    """The model argument for the engine (a scratch folder holding a lone config.json's copy)."""
    args: list[str]


def plan_server(
    engine: str, model: str, engine_argv: Sequence[str], *, out: str, run_id: str | None, random_weights: bool
) -> ServePlan:
    """The out folder (created, writable), the run id, and, for random weights, the model folder plus
    `--load-format dummy` and `--served-model-name <model id>` (not the scratch folder's path) unless given."""
    from ..writers import prepare_out_dir

    out_dir = prepare_out_dir(out)
    model_id = model_id_of(model)
    run_id = run_id or new_run_id(engine, model_id)
    args = list(engine_argv)
    target = model
    if random_weights:
        target = model_dir(model, True, Path(tempfile.mkdtemp(prefix=f"moecap-{engine}-model-")))
        if not has_flag(args, "--load-format"):
            args += ["--load-format", "dummy"]
        if not has_flag(args, "--served-model-name"):
            args += ["--served-model-name", model_id]
    return ServePlan(out_dir, run_id, model_id, target, args)
