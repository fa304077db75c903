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
from collections.abc import Callable, Iterable, Sequence
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


def parse_engine_flags(
    parser: Any, model_flag: str, argv: Sequence[str], what: str, fields: Iterable[str] | None = None
) -> dict[str, Any]:
    """`argv` (an engine's own CLI flags) parsed by the engine's own argparse `parser` (which requires
    `model_flag`), as the fields whose values differ from the parser's defaults (only `fields` when
    given; never the model). argparse's usage dump is kept off stderr: a flag the engine rejects becomes
    one `CollectError` line naming the flags and argparse's reason."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            ns = parser.parse_args([model_flag, "placeholder", *argv])
            defaults = parser.parse_args([model_flag, "placeholder"])
    except (SystemExit, Exception) as exc:
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        reason = lines[-1].split("error: ", 1)[-1] if lines else str(exc) or type(exc).__name__
        raise CollectError(f"cannot parse {what} flags {shlex.join(argv)!r}: {reason}") from None
    keep = set(fields) if fields is not None else set(vars(ns))
    keep.discard(model_flag.lstrip("-").replace("-", "_"))
    return {k: v for k, v in vars(ns).items() if k in keep and v != getattr(defaults, k, None)}


def has_flag(args: Sequence[str], flag: str) -> bool:
    """`flag` is among `args` (`--flag value` or `--flag=value`)."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def plugin_installed(group: str, value: str) -> bool:
    """True when an engine's plugin loader will find moecap's entry point `value` in `group` (moecap
    installed, editable or not, or a `.dist-info` on the path)."""
    import importlib.metadata

    return any(ep.value == value for ep in importlib.metadata.entry_points(group=group))


@dataclass(frozen=True)
class EnginePlugin:
    """How an engine takes moecap's tracer into its processes, the part vLLM's and SGLang's runners share:
    the plugin entry point (`group`, `entry_point`), the engine's plugin allow-list variable
    (`allow_list` = (variable, our plugin's name)) and the adapter's release check."""

    label: str
    """The engine's name in messages ("vLLM")."""
    extra: str
    """moecap's pip extra for it."""
    group: str
    entry_point: str
    allow_list: tuple[str, str]
    check_version: Callable[[bool], str | None]
    """The adapter's release check: a warning, or a `CollectError` when strict."""

    def installed(self) -> bool:
        """True when the engine's plugin loader will find moecap's entry point."""
        return plugin_installed(self.group, self.entry_point)

    def preflight(self, strict: bool, *, trace: bool = True) -> list[str]:
        """The engine's release and, when tracing, moecap's entry point (a `CollectError` line when missing:
        the engine's processes would not load the tracer). Returns the warnings."""
        warning = self.check_version(strict)
        if trace and not self.installed():
            raise CollectError(
                f"moecap's {self.group} entry point is not installed, so {self.label}'s engine processes would not "
                f"load the tracer: install moecap into this environment (pip install -e . or pip install "
                f"'moecap[{self.extra}]')"
            )
        return [warning] if warning else []

    def env(self, out: Any, run_id: str, **tracing: Any) -> dict[str, str]:
        """The variables that turn the plugin on in every engine process (they inherit the environment);
        `tracing`: `tracing_env.tracer_environment`'s options (counts, model_id, workload, strict, stats_dir)."""
        from .tracing_env import tracer_environment

        return tracer_environment(out, run_id, plugin_allow_list=self.allow_list, **tracing)

    def server(
        self,
        engine: str,
        model: str,
        engine_argv: Sequence[str],
        *,
        out: str,
        run_id: str | None = None,
        counts: bool = True,
        strict_engine: bool = False,
        random_weights: bool = False,
        stats_dir: str | None = None,
    ) -> TracedServer:
        """What `moecap-collect serve --engine ENGINE` starts the engine's server with: its plan
        (`plan_server`), the preflight's warnings, and this process's environment plus tracing."""
        plan = plan_server(engine, model, engine_argv, out=out, run_id=run_id, random_weights=random_weights)
        warnings = self.preflight(strict_engine)
        env = dict(os.environ)
        env.update(
            self.env(
                plan.out_dir, plan.run_id, counts=counts, model_id=plan.model_id, workload={"driver": "external"},
                strict=strict_engine, stats_dir=stats_dir,
            )
        )  # fmt: skip
        return TracedServer(plan, warnings, env, counts)


@dataclass
class ServePlan:
    """What a traced server needs before it starts: where, which run, which model argument, which flags."""

    out_dir: Path
    run_id: str
    model_id: str
    target: str
    """The model argument for the engine (a scratch folder holding a lone config.json's copy)."""
    args: list[str]


@dataclass
class TracedServer:
    """A server about to start with tracing on (`EnginePlugin.server`)."""

    plan: ServePlan
    warnings: list[str]
    env: dict[str, str]
    counts: bool


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
