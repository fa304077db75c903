"""Ray orchestration of a fleet analysis: one Ray task per run, results gathered as they finish.

Ray only schedules: each task is `task.analyze_group` (the local pipeline on one run's files) and
writes its own rows into the dataset, so nothing but small result records crosses the cluster.
Tasks are retried on worker or node failure (`max_retries`); a retry rewrites the same files, and a
run counts as done only once its manifest is written, so nothing is counted twice. Bad input is
never an exception: a run whose files cannot be used comes back with its errors and the others go on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .discover import discover, pending
from .task import RunGroup, TaskResult, analyze_group


@dataclass
class FleetReport:
    """What a fleet analysis did."""

    dataset: str
    analysed: list[TaskResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Run ids whose manifest already listed the same inputs (incremental re-run)."""
    failed: list[TaskResult] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        """One line per unusable file or run (failed runs and files left out of analysed runs)."""
        return [e for r in (*self.failed, *self.analysed) for e in r.errors]


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError(
            "fleet analysis runs on Ray, which is not installed: pip install 'moecap[fleet]'"
        ) from None
    return ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to the cluster at `address` ("auto": the running one), or start a local one."""
    ray = _ray()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    return ray


def run_fleet(
    inputs: list[str],
    dataset: str,
    options: Any = None,
    *,
    cost_settings: Any = None,
    address: str | None = None,
    num_cpus: int | None = None,
    max_retries: int = 3,
    incremental: bool = True,
    task: Callable[..., TaskResult] = analyze_group,
    progress: Callable[[TaskResult], None] | None = None,
    memory_per_task: int | None = None,
) -> FleetReport:
    """Analyse every run under `inputs` on Ray and write the dataset at `dataset` (URI or path).

    `task` is the per-run function (default `analyze_group`); `memory_per_task` (bytes) lets Ray
    pack tasks by memory as well as CPUs."""
    if not dataset:
        raise InputError("--dataset: expected a local path or a URI to write the fleet dataset to")
    groups = discover(inputs)
    report = FleetReport(dataset=dataset)
    todo = groups
    if incremental:
        todo, done = pending(groups, dataset)
        report.skipped = [g.run_id for g in done]
    if not todo:
        return report
    ray = ensure_ray(address, num_cpus)
    # Retried: a dead worker (always) and storage errors (OSError: a throttled or dropped request while
    # writing); a bug or bad input is not retried (bad input never raises: it comes back as errors).
    resources: dict[str, Any] = {"num_cpus": 1, "max_retries": max_retries, "retry_exceptions": [OSError]}
    if memory_per_task:
        resources["memory"] = memory_per_task
    remote = ray.remote(**resources)(task)
    refs = {remote.remote(g, dataset, options, cost_settings): g for g in todo}
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=min(len(waiting), 64), timeout=None)
        for ref in ready:
            group = refs[ref]
            result = _result(ray, ref, group)
            (report.analysed if result.ok else report.failed).append(result)
            if progress:
                progress(result)
    return report


def _result(ray: Any, ref: Any, group: RunGroup) -> TaskResult:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        # Retries exhausted (the worker kept dying) or a bug in the task: this run fails, the rest go on.
        line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return TaskResult(run_id=group.run_id, ok=False, errors=[f"run {group.run_id}: task failed: {line}"])
