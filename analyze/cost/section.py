"""The `cost` section of a run in metrics.json: one call from the pipeline.

Two scopes, each charged for the time the run's GPUs were held:
  * window: the analysis window of the steps (the steady state by default), charged for its busy
    time `window_s`; its tokens are the steps' tokens (computed) and logit rows (output): the same
    figures as the window throughput (metrics/steps.py).
  * run: the requests' makespan (first arrival to last completion); tokens are the completed
    requests' prompt + output tokens; the per-request cost comes from this scope.
The headline $/1M tokens is the window's (or the run's, when the steps cannot be analysed).
Energy is measured from the run's `gpu_samples` over each scope's interval where present.
"""

from __future__ import annotations

from typing import Any

from ..analysis import RunContext, Settings
from ..load import TraceDB
from ..specs import GpuSpec
from .constants import CostSettings, load_cost_settings
from .energy import EnergyResult, GpuEnergyReading, gpu_energy
from .model import Work, estimate_cost


def settings_for(settings: Settings) -> CostSettings:
    """Cost settings of an analysis: `settings.cost` (a command's cost flags), else the YAML named
    by $MOECAP_COST_OVERRIDES on top of the bundled constants."""
    if settings.cost is not None:
        return settings.cost
    return load_cost_settings(None, gpu_overrides=settings.gpu_overrides, use_env=True)


WINDOW_SCOPE = (
    "window: the analysis window's steps over their busy time (tokens computed; output = logit rows)"
)


def energy_at_power(
    duration_s: float, num_gpus: int, mean_power_w_per_gpu: float | None, source: str
) -> EnergyResult:
    """Energy of `num_gpus` GPUs drawing `mean_power_w_per_gpu` for `duration_s` (None: unknown)."""
    if mean_power_w_per_gpu is None:
        return EnergyResult(duration_s, None, "unknown", [])
    joules = mean_power_w_per_gpu * duration_s
    return EnergyResult(
        duration_s,
        joules * num_gpus,
        source,
        [GpuEnergyReading(f"gpu{i}", joules, source, 0.0, 0) for i in range(num_gpus)],
    )


def energy_for_duration(energy: EnergyResult, duration_s: float) -> EnergyResult:
    """`energy` (measured over an interval) at the same mean power for `duration_s`: each GPU's
    joules scaled by duration_s / the interval's duration."""
    if energy.duration_s <= 0:
        return energy_at_power(duration_s, len(energy.gpus) or 1, None, "unknown")
    f = duration_s / energy.duration_s
    gpus = [
        GpuEnergyReading(
            g.gpu_uuid, None if g.joules is None else g.joules * f, g.method, g.coverage, g.samples
        )
        for g in energy.gpus
    ]
    return EnergyResult(duration_s, None if energy.joules is None else energy.joules * f, energy.source, gpus)


def window_cost(
    gpu: GpuSpec, num_gpus: int, window: dict[str, Any], energy: EnergyResult, settings: CostSettings
) -> dict[str, Any]:
    """The cost document of a window (metrics/steps.py `all` row: window_s, tokens, output_tokens):
    the GPUs held for the window's busy time. The one definition the pipeline and `whatif` use."""
    work = Work(
        duration_s=float(window["window_s"]),
        output_tokens=float(window.get("output_tokens") or 0),
        total_tokens=float(window.get("tokens") or 0),
        scope=WINDOW_SCOPE,
    )
    return estimate_cost(gpu, num_gpus, work, energy, settings)


def run_gpu_uuids(ctx: RunContext) -> list[str]:
    """The distinct GPU UUIDs a run's files say it used (empty when none is recorded)."""
    uuids: list[str] = []
    for f in ctx.run.files:
        uuids.extend(u for u in f.run.rank.gpu_uuids if u)
        uuids.extend(g.uuid for g in f.run.gpus if g.uuid)
    return list(dict.fromkeys(uuids))


def cost_section(
    db: TraceDB,
    ctx: RunContext,
    steps_doc: dict[str, Any],
    requests_doc: dict[str, Any],
    settings: CostSettings,
) -> dict[str, Any]:
    """metrics.json `cost` for one run (see the module doc). Never raises for a missing price."""
    if ctx.gpu is None:
        return {"error": f"no GPU spec ({ctx.gpu_error}); pass --gpu", "warnings": []}
    rid = ctx.run.run_id
    samples = db.con.sql(
        "SELECT t_ns, gpu_uuid, power_w, energy_mj FROM gpu_samples WHERE run_id = ? ORDER BY t_ns",
        params=[rid],
    ).pl()
    # Only the run's GPUs count (a host sampler may see more); unknown UUIDs: whatever was sampled.
    gpu_uuids = run_gpu_uuids(ctx) or None

    def energy_over(t0: float, t1: float):
        return gpu_energy(
            samples,
            t0,
            t1,
            gpu_uuids=gpu_uuids,
            num_gpus=ctx.num_gpus,
            tdp_w=ctx.gpu.tdp_w if ctx.gpu else None,
        )

    scopes: dict[str, Any] = {}
    everything = steps_doc.get("all")
    if everything and everything.get("window_s"):
        # The power drawn over the window's span, for the window's busy time (its stretches).
        t0, t1 = db.con.sql(
            "SELECT min(t_start_ns), max(t_end_ns) FROM window_steps WHERE run_id = ?", params=[rid]
        ).fetchall()[0]
        energy = energy_for_duration(energy_over(t0, t1), everything["window_s"])
        scopes["window"] = window_cost(ctx.gpu, ctx.num_gpus, everything, energy, settings)
    if requests_doc.get("makespan_s"):
        t0, t1 = db.con.sql(
            "SELECT min(arrival_ns), max(finish_ns) FILTER (WHERE error IS NULL AND first_token_ns IS NOT NULL) "
            "FROM requests WHERE run_id = ?",
            params=[rid],
        ).fetchall()[0]
        work = Work(
            duration_s=(t1 - t0) / 1e9,
            output_tokens=float(requests_doc.get("output_tokens") or 0),
            total_tokens=float(
                (requests_doc.get("output_tokens") or 0) + (requests_doc.get("prompt_tokens") or 0)
            ),
            requests=int(requests_doc.get("succeeded") or 0),
            scope="run: first request arrival to last completion (completed requests' prompt + output tokens)",
        )
        scopes["run"] = estimate_cost(ctx.gpu, ctx.num_gpus, work, energy_over(t0, t1), settings)
    if not scopes:
        return {"error": "no steps window and no completed requests to charge", "warnings": []}
    head_name = "window" if "window" in scopes else "run"
    head = scopes[head_name]
    constants = head.pop("constants")
    for s in scopes.values():
        s.pop("constants", None)
    doc: dict[str, Any] = {
        "model": settings.model,
        "headline_scope": head_name,
        "gpu": ctx.gpu.name,
        "num_gpus": ctx.num_gpus,
        "usd_per_1m_output_tokens": head.get("usd_per_1m_output_tokens"),
        "usd_per_1m_total_tokens": head.get("usd_per_1m_total_tokens"),
        "band_usd_per_1m_output_tokens": head.get("band_usd_per_1m_output_tokens"),
        "usd_per_request": scopes["run"].get("usd_per_request") if "run" in scopes else None,
        "energy": head["energy"],
        "scopes": scopes,
        "constants": constants,
        "settings": {"layers": list(settings.layers)},
        "warnings": list(dict.fromkeys(w for s in scopes.values() for w in s["warnings"])),
        "notes": list(dict.fromkeys(n for s in scopes.values() for n in s["notes"])),
    }
    if "error" in head:
        doc["error"] = head["error"]
    return doc
