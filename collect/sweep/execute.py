"""Running a sweep: each point one run, one engine start per engine config, resumable, safe to stop.

    outcome = run_sweep(expand(spec), Path("sweep-out/"), name="qwen-h100")

Per point: its earlier unfinished attempts' files are set aside (`incomplete/`), a new run id is
written to the state *before* the engine records anything, the session warms up and records the
point, and the state says `done` (with the point's file names) only after every file is closed. A
failing point is recorded `failed` with its reason and the sweep goes on (or stops: `fail_fast`);
Ctrl-C or SIGTERM closes the current point's files, marks it `interrupted` and stops, keeping every
finished point. Points already recorded (state `done`, all files closed) are skipped.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import CollectError
from ..writers import prepare_out_dir
from .matrix import Point, group_by_config
from .session import EngineSession, PointInterrupted, open_session
from .state import SweepState


@dataclass
class SweepOutcome:
    """What one invocation did, by point key."""

    total: int
    skipped: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: str | None = None
    """Key of the point that was running at Ctrl-C / SIGTERM."""
    not_run: list[str] = field(default_factory=list)
    """Points left for a later run (after an interrupt or `fail_fast`)."""
    stopped: bool = False
    """Ctrl-C / SIGTERM stopped the sweep (during a point: `interrupted` names it)."""

    @property
    def complete(self) -> bool:
        return not self.failed and not self.stopped and not self.not_run


def new_point_run_id(point: Point) -> str:
    """<UTC stamp>-<engine>-<point slug>-<4 hex>: sorts by time (as every moecap run id) and names the point."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{point.config.engine}-{point.slug}-{secrets.token_hex(2)}"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread while the block runs (one stop path)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(
    points: Sequence[Point],
    out: Path,
    *,
    name: str = "sweep",
    fail_fast: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    session_factory: Callable[[str], EngineSession] = open_session,
) -> SweepOutcome:
    """Record every point of `points` not yet recorded in `out`; see the module docstring."""
    out = prepare_out_dir(out)
    with sweep_lock(out):
        return _run_locked(points, out, name, fail_fast, log, session_factory)


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold `out/.sweep.lock` exclusively while a sweep runs: two sweeps writing one folder would
    record points twice and overwrite each other's state. The kernel drops the lock when the holder
    dies, so a killed sweep never leaves a stale lock behind."""
    import fcntl

    with open(out / ".sweep.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise CollectError(
                f"{out}: another sweep ({holder}) is recording into this folder; wait for it or stop it first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_locked(
    points: Sequence[Point],
    out: Path,
    name: str,
    fail_fast: bool,
    log: Callable[[str], None],
    session_factory: Callable[[str], EngineSession],
) -> SweepOutcome:
    state = SweepState.load(out)
    for p in points:
        state.entry(p)
    state.save()
    outcome = SweepOutcome(total=len(points))
    todo = []
    for p in points:
        if state.is_recorded(p):
            outcome.skipped.append(p.key)
        else:
            todo.append(p)
    if outcome.skipped:
        log(f"sweep: {len(outcome.skipped)} of {len(points)} point(s) already recorded, skipped")
    position = {p.key: i for i, p in enumerate(points, start=1)}
    with sigterm_as_interrupt():
        try:
            for config, group in group_by_config(todo):
                if _run_group(config, group, out, state, outcome, name, fail_fast, log, position,
                              session_factory):  # fmt: skip
                    break
        except KeyboardInterrupt:
            outcome.stopped = True
    done = set(outcome.skipped) | set(outcome.recorded) | set(outcome.failed)
    if outcome.interrupted:
        done.add(outcome.interrupted)
    outcome.not_run = [p.key for p in todo if p.key not in done]
    return outcome


def _run_group(
    config: Any,
    group: list[Point],
    out: Path,
    state: SweepState,
    outcome: SweepOutcome,
    name: str,
    fail_fast: bool,
    log: Callable[[str], None],
    position: dict[str, int],
    session_factory: Callable[[str], EngineSession],
) -> bool:
    """Run the points of one engine config on one session; True when the sweep must stop."""
    session: EngineSession | None = None
    start_error: str | None = None
    total = outcome.total
    try:
        for p in group:
            tag = f"[{position[p.key]}/{total}] {p.slug}"
            state.set_aside(p)
            run_id = new_point_run_id(p)
            state.begin(p, run_id)
            try:
                if start_error is not None:
                    raise CollectError(start_error)
                if session is None:
                    session = _start(config, out, session_factory, log)
                result = session.run_point(p, run_id, {"sweep": p.sweep_metadata(name)})
            except _StartFailed as exc:
                start_error = f"engine start failed: {exc}"
                _failed(state, outcome, p, start_error, tag, log)
                if fail_fast:
                    return True
                continue
            except (PointInterrupted, KeyboardInterrupt):
                state.finish(p, "interrupted", reason="interrupted (Ctrl-C / SIGTERM); files closed")
                outcome.interrupted = p.key
                log(f"{tag}: interrupted; finished points are kept, re-run the same command to resume")
                raise KeyboardInterrupt from None
            except CollectError as exc:
                _failed(state, outcome, p, str(exc), tag, log)
                if fail_fast:
                    return True
                continue
            except Exception as exc:  # the engine itself broke: restart it for the next point
                _failed(state, outcome, p, f"{type(exc).__name__}: {exc}", tag, log)
                if session is not None:
                    with contextlib.suppress(Exception):
                        session.stop()
                    session = None
                if fail_fast:
                    return True
                continue
            state.finish(p, "done", summary=result.summary())
            outcome.recorded.append(p.key)
            started = result.extra.get("engine_start_s")
            log(
                f"{tag}: recorded {run_id} — {result.requests} requests, {result.output_tokens} output tokens, "
                f"{result.steps} steps in {result.wall_s:.1f} s ({result.tokens_per_s:.1f} tok/s)"
                + (f"; engine start {started:.1f} s" if isinstance(started, (int, float)) else "")
            )
    finally:
        if session is not None:
            session.stop()
    return False


class _StartFailed(Exception):
    """The engine of a config did not start (every point of the config fails with this reason)."""


def _start(
    config: Any, out: Path, session_factory: Callable[[str], EngineSession], log: Callable[[str], None]
) -> EngineSession:
    log(f"sweep: starting {config.label()}")
    t0 = time.monotonic()
    session = session_factory(config.engine)
    try:
        session.start(config, out)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            session.stop()
        raise
    except Exception as exc:
        with contextlib.suppress(Exception):
            session.stop()
        text = str(exc).strip().splitlines()
        raise _StartFailed(text[0] if text else type(exc).__name__) from None
    if getattr(session, "engine_per_point", False):
        log(f"sweep: {config.engine} starts one engine per point, as `run` does (docs/sweep.md)")
    else:
        log(f"sweep: engine ready in {time.monotonic() - t0:.1f} s")
    return session


def _failed(
    state: SweepState, outcome: SweepOutcome, p: Point, reason: str, tag: str, log: Callable[[str], None]
) -> None:
    reason = reason.strip().splitlines()[0] if reason.strip() else "failed"
    state.finish(p, "failed", reason=reason)
    outcome.failed[p.key] = reason
    log(f"{tag}: FAILED: {reason}")


# ---------------------------------------------------------------------------------------------------
# The table at the end: the analyzer's, run as a program (the collector never imports the analyzer)
# ---------------------------------------------------------------------------------------------------
def analyzer_program() -> str | None:
    """The `moecap-analyze` console script beside this interpreter or on PATH, or None."""
    here = Path(sys.executable).parent
    return shutil.which("moecap-analyze", path=os.pathsep.join([str(here), os.environ.get("PATH", "")]))


def table_command(out: Path, analyze_args: str = "") -> list[str]:
    """The command that prints the sweep's matrix table in MoE-CAP's layout."""
    return ["moecap-analyze", "leaderboard", str(out), "--layout", "moecap", *shlex.split(analyze_args)]


def show_table(out: Path, analyze_args: str = "", *, log: Callable[[str], None]) -> int:
    """Print the table by running the analyzer (or, where it is not installed, the command to run)."""
    cmd = table_command(out, analyze_args)
    program = analyzer_program()
    if program is None:
        log("sweep: the analyzer is not installed here; on a machine with moecap[analyze], run:")
        log("  " + shlex.join(cmd))
        return 0
    log("sweep: " + shlex.join(cmd))
    return subprocess.run([program, *cmd[1:]], check=False).returncode
