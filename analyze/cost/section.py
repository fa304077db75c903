"""The `cost` section of a run in metrics.json: one call from the pipeline.

Two scopes, each charged for the time the run's GPUs were held:
  * window: the analysis window of the steps (the steady state by default); its tokens are the
    steps' tokens (computed) and logit rows (output), the same figures as the window throughput.
  * run: the requests' makespan (first arrival to last completion); tokens are the completed
    requests' prompt + output tokens; the per-request cost comes from this scope.
The headline $/1M tokens is the window's (or the run's, when the steps cannot be analysed).
Energy is measured from the run's `gpu_samples` over each scope's interval where present.
"""

from __future__ import annotations

from typing import Any

from ..analysis import Options, RunContext
from ..load import TraceDB
from .constants import CostSettings, load_cost_settings
from .energy import gpu_energy
from .model import Work, estimate_cost
from .options import active_cost_settings


def settings_for(options: Options) -> CostSettings:
    """Cost settings for a pipeline run: those of an enclosing `use_cost_settings` (a command's cost
    flags), else the YAML named by $MOECAP_COST_OVERRIDES on top of the bundled constants."""
    active = active_cost_settings()
    if active is not None:
        return active
    return load_cost_settings(
        getattr(options, "cost_overrides", None),
        flags=getattr(options, "cost_flags", None),
        gpu_overrides=options.gpu_overrides,
        use_env=True,
    )


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
    where: str,
    steps_doc: dict[str, Any],
    requests_doc: dict[str, Any],
    settings: CostSettings,
) -> dict[str, Any]:
    """metrics.json `cost` for one run (see the module doc). Never raises for a missing price."""
    if ctx.gpu is None:
        return {"error": f"no GPU spec ({ctx.gpu_error}); pass --gpu", "warnings": []}
    rid = ctx.run.run_id.replace("'", "''")
    samples = db.con.sql(
        f"SELECT t_ns, gpu_uuid, power_w, energy_mj FROM gpu_samples WHERE run_id = '{rid}' ORDER BY t_ns"
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
    if everything and everything.get("wall_s"):
        t0, t1 = db.con.sql(
            f"SELECT min(t_start_ns), max(t_end_ns) FROM step_metrics WHERE run_id = '{rid}' "
            f"AND NOT is_draft AND ({where}) AND time_s > 0"
        ).fetchall()[0]
        work = Work(
            duration_s=(t1 - t0) / 1e9,
            output_tokens=float(everything.get("output_tokens") or 0),
            total_tokens=float(everything.get("tokens") or 0),
            scope="window: the analysis window's steps (tokens computed; output = logit rows)",
        )
        scopes["window"] = estimate_cost(ctx.gpu, ctx.num_gpus, work, energy_over(t0, t1), settings)
    if requests_doc.get("makespan_s"):
        t0, t1 = db.con.sql(
            "SELECT min(arrival_ns), max(finish_ns) FILTER (WHERE error IS NULL AND first_token_ns IS NOT NULL) "
            f"FROM requests WHERE run_id = '{rid}'"
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
