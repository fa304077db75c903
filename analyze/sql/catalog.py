"""What each SQL view means: grain, source and every column's unit and meaning.

Column names and types are not written here: `docs/sql.md` takes them from DuckDB (`DESCRIBE`) over
views built from their definitions, and takes the meaning of each column from this catalog; a column
the views have but the catalog lacks (or the reverse) fails the docs test. Trace-table columns take
their unit and meaning from the trace schema itself (`moecap.schemas.TABLES`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moecap.schemas import TABLES


@dataclass(frozen=True)
class ColumnDoc:
    name: str
    unit: str
    description: str


@dataclass(frozen=True)
class ViewDoc:
    name: str
    grain: str
    """What one row is."""
    description: str
    defined_in: str
    """Module whose code defines the view."""
    columns: tuple[ColumnDoc, ...]
    derived_sql: str | None = None
    """The view's SQL, for views defined in this package's `sql/views.py` (rendered in the docs)."""

    def column(self, name: str) -> ColumnDoc | None:
        return next((c for c in self.columns if c.name == name), None)


def _c(name: str, unit: str, description: str) -> ColumnDoc:
    return ColumnDoc(name, unit, description)


_IDENTITY = (
    _c("run_id", "", "Run id (`moecap.run.run_id`); joins every view."),
    _c("dp", "", "Data-parallel rank of the process that recorded the row (client-side tables: 0)."),
    _c("pp", "", "Pipeline-parallel rank (stage) of the recording process."),
    _c("tp", "", "Tensor-parallel rank of the recording process (only the lowest TP rank's rows are kept)."),
    _c("ep", "", "Expert-parallel rank of the recording process."),
)


def _trace_columns(kind: str) -> tuple[ColumnDoc, ...]:
    cols = [ColumnDoc(c.name, c.unit, c.description) for c in TABLES[kind]]
    if kind == "steps":
        i = next(i for i, c in enumerate(cols) if c.name == "phase")
        cols[i] = _c(
            "phase", "", "prefill | decode | mixed | idle | verify (the trace's dictionary, as text)."
        )
    return (*_IDENTITY, *cols)


_STEP_METRICS_COLUMNS = (
    *_IDENTITY,
    _c("step", "", "The engine's step key (joins `steps.step` of the same run, dp, pp, tp)."),
    _c("phase", "", "prefill | decode | mixed | idle | verify."),
    _c("is_draft", "", "True for a speculative-decoding draft pass (left out of every run-level metric)."),
    _c("num_reqs", "requests", "Requests in the batch."),
    _c("num_tokens", "tokens", "Tokens computed this step."),
    _c("t_start_ns", "ns (host monotonic)", "Host time the step was launched."),
    _c("t_end_ns", "ns (host monotonic)", "Host time the step's launch call returned."),
    _c(
        "span_start_ns",
        "ns (host monotonic)",
        "Start of the step on the GPU timeline: gpu_start_ns where recorded, else t_start_ns.",
    ),
    _c(
        "span_end_ns",
        "ns (host monotonic)",
        "End of the step on the GPU timeline: gpu_end_ns, else t_end_ns.",
    ),
    _c(
        "time_s",
        "s",
        "Step duration the metrics use: the GPU span (gpu_end_ns − gpu_start_ns) where recorded, "
        "else the host span.",
    ),
    _c("time_source", "", "`gpu` or `host`: which span time_s is."),
    _c("gpus", "GPUs", "GPUs this row's step stands for (its rank's GPUs, or its stage's TP degree)."),
    _c(
        "active_experts",
        "experts",
        "Experts with ≥ 1 token in this step, summed over the file's MoE layers; NaN without counts.",
    ),
    _c(
        "bytes_weights",
        "bytes",
        "Weight bytes read: bytes_static_weights + bytes_routed_experts (docs/metrics.md §2).",
    ),
    _c("bytes_routed_experts", "bytes", "active_experts × the bytes of one routed expert."),
    _c(
        "bytes_static_weights",
        "bytes",
        "Attention, router, shared-expert, dense-FFN and norm weights of the covered layers, the LM head "
        "when the step samples, and the embedding rows gathered.",
    ),
    _c("bytes_kv_read", "bytes", "KV cache read: cached tokens × KV bytes per token, per attention window."),
    _c("bytes_kv_write", "bytes", "KV cache written: num_tokens × KV bytes per token."),
    _c("bytes_total", "bytes", "bytes_weights + bytes_kv_read + bytes_kv_write: the S-MBU numerator."),
    _c("flops_linear", "FLOP", "2 × activated linear parameters × tokens (multiply-add = 2 FLOPs)."),
    _c("flops_lm_head", "FLOP", "2 × vocab × hidden × logit_rows."),
    _c("flops_attention", "FLOP", "Attention scores and weighted values over each query's keys."),
    _c("flops_total", "FLOP", "flops_linear + flops_lm_head + flops_attention: the S-MFU numerator."),
    _c(
        "logit_rows", "rows", "Logit rows sampled (Σ req_num_logits; num_reqs where the engine does not say)."
    ),
    _c("logits_known", "", "Whether logit_rows comes from req_num_logits."),
    _c(
        "context_tokens",
        "tokens",
        "Σ over requests of (prefix length + new tokens): the KV context attended.",
    ),
    _c(
        "s_mbu",
        "fraction",
        "Per-step S-MBU: bytes_total / (gpu_bandwidth × time_s × gpus); null for a step that computed no "
        "token or has no duration.",
    ),
    _c("s_mfu", "fraction", "Per-step S-MFU: flops_total / (gpu_peak_flops × time_s × gpus); null as s_mbu."),
    _c(
        "gpu_bandwidth",
        "bytes/s",
        "Memory bandwidth of the GPU the metrics are computed for (trace or --gpu).",
    ),
    _c(
        "gpu_peak_flops",
        "FLOP/s",
        "Dense peak FLOP/s of that GPU at the routed experts' activation dtype.",
    ),
    _c(
        "host_gap_s",
        "s",
        "GPU idle time until the next step's GPU work starts: max(next step's span_start_ns − span_end_ns, 0); "
        "0 for the last step, and under asynchronous scheduling (next step launched before this one ends).",
    ),
    _c("wall_s", "s", "time_s + host_gap_s: the step's share of the run's timeline."),
)

_REQUEST_STEPS_COLUMNS = (
    _c("run_id", "", "Run id."),
    _c("engine_req_id", "", "The engine's request id (an element of steps.req_ids)."),
    _c("dp", "", "Data-parallel rank that ran the request."),
    _c("steps", "steps", "Steps (pipeline stage 0, no draft passes) that computed tokens of the request."),
    _c("prefill_steps", "steps", "Of those, steps before the request's first sampled token (prompt chunks)."),
    _c(
        "decode_steps",
        "steps",
        "Steps after the request had sampled a token (without req_num_logits: one new token on a "
        "non-empty cache).",
    ),
    _c("first_step", "", "First step key of the request."),
    _c("last_step", "", "Last step key of the request."),
    _c(
        "computed_tokens", "tokens", "Σ of the request's req_new_tokens (prompt − prefix hits + outputs − 1)."
    ),
    _c("batch_reqs_mean", "requests", "Mean num_reqs of the request's steps."),
    _c("decode_batch_reqs_mean", "requests", "Mean num_reqs of its decode steps: its decode batch size."),
    _c("decode_batch_tokens_mean", "tokens", "Mean num_tokens of its decode steps."),
    _c("max_context_tokens", "tokens", "Largest prefix length + new tokens of the request in a step."),
)

_REQUEST_METRICS_COLUMNS = (
    _c("run_id", "", "Run id."),
    _c("req_id", "", "The driver's request id."),
    _c(
        "engine_req_id",
        "",
        "The id the engine's steps use: requests.engine_req_id where recorded, else req_id (the driver "
        "sends its id to the engine). Joins request_steps.",
    ),
    _c("sample_id", "", "Dataset sample id (joins outputs.sample_id)."),
    _c("ok", "", "No error and a first token arrived: the requests every latency metric counts."),
    _c("arrival_ns", "ns (client monotonic)", "When the client sent the request."),
    _c("first_token_ns", "ns (client monotonic)", "When the first token arrived."),
    _c("finish_ns", "ns (client monotonic)", "When the response ended."),
    _c("prompt_tokens", "tokens", "Prompt length."),
    _c("output_tokens", "tokens", "Generated tokens."),
    _c("cached_prompt_tokens", "tokens", "Prompt tokens served from the prefix cache."),
    _c("ttft_s", "s", "Time to first token: (first_token_ns − arrival_ns) / 1e9."),
    _c("e2e_s", "s", "End-to-end latency: (finish_ns − arrival_ns) / 1e9."),
    _c("decode_s", "s", "e2e_s − ttft_s."),
    _c("tpot_s", "s", "Time per output token: decode_s / (output_tokens − 1); null for one output token."),
    _c("decode_tokens_per_s", "tokens/s", "(output_tokens − 1) / decode_s: the request's decode speed."),
    _c("itl_tokens", "tokens", "Tokens in streamed chunks after the first (the ITL samples of the request)."),
    _c("itl_mean_s", "s", "Σ chunk gaps / itl_tokens: mean inter-token latency (docs/metrics.md §11)."),
    _c("itl_max_s", "s", "Largest chunk gap ÷ tokens in that chunk: the request's worst stall per token."),
    _c("queue_s", "s", "Queue time in the engine before the first scheduled step, where the engine says."),
    _c("preemptions", "", "Times the engine preempted the request, where it says."),
    _c("finish_reason", "", "stop | length | abort | error … as the engine reports it."),
    _c("error", "", "Error text of a failed request; null when it succeeded."),
    _c("retries", "", "Retries the client made."),
)

VIEWS: dict[str, ViewDoc] = {}


def _add(view: ViewDoc) -> None:
    VIEWS[view.name] = view


def _build() -> None:
    from ..metrics.steps import SUMMARY_COLUMNS, WINDOW_STEPS_SQL
    from . import views as derived

    # Generated from metrics/steps.py: run_metrics' columns are the layer's, with units and meanings.
    run_metrics_columns = tuple(
        _c(name, unit, meaning) for name, _, unit, meaning in (*derived.RUN_INFO_COLUMNS, *SUMMARY_COLUMNS)
    )

    _add(
        ViewDoc(
            "runs",
            "one run",
            "What each run is: model, engine, GPU, parallelism, workload and the full run metadata.",
            "moecap.analyze.load",
            (
                _c("run_id", "", "Run id."),
                _c("model_id", "", "Model id (HF name or path)."),
                _c("engine", "", "Serving engine (vllm, sglang, hf, …)."),
                _c("engine_version", "", "Engine version."),
                _c("gpu_name", "", "GPU name as the trace records it."),
                _c("num_gpus", "GPUs", "Distinct GPUs of the run (UUIDs over all its files)."),
                _c("tp", "", "Tensor-parallel degree."),
                _c("pp", "", "Pipeline-parallel degree."),
                _c("dp", "", "Data-parallel degree."),
                _c("ep", "", "Expert-parallel degree."),
                _c("dataset", "", "Workload dataset."),
                _c("batch_size", "requests", "Target concurrency (workload batch_size or concurrency)."),
                _c("num_experts", "experts", "Routed experts per MoE layer."),
                _c("top_k", "experts", "Experts each token is routed to."),
                _c("num_moe_layers", "layers", "MoE layers of the model."),
                _c(
                    "counts_available",
                    "",
                    "The run recorded per-step expert counts (an experts file loaded).",
                ),
                _c("random_weights", "", "The model ran with random weights (performance-only run)."),
                _c("created_at", "ISO 8601", "When the run was recorded."),
                _c("files", "files", "Trace files loaded for the run."),
                _c("metadata_json", "JSON", "The run metadata (`moecap.run`) of its first engine-side file."),
            ),
        )
    )
    _add(
        ViewDoc(
            "moe_layers",
            "one MoE layer of a run",
            "Maps the position of a layer in the expert-count vectors to its decoder-layer index.",
            "moecap.analyze.load",
            (
                _c("run_id", "", "Run id."),
                _c("moe_layer", "", "Index among the run's MoE layers (position in experts.counts)."),
                _c("layer", "", "Decoder-layer index."),
            ),
        )
    )
    for kind, grain, text in (
        ("steps", "one engine forward pass of one recording process", "The trace's steps table."),
        (
            "experts",
            "one step of one recording process",
            "Raw expert counts, flat and layer-major; query `expert_tokens` for the long form.",
        ),
        ("requests", "one request", "The workload driver's requests table (client clock)."),
        ("outputs", "one request", "Prompt, output and reference texts."),
        ("gpu_samples", "one sample of one GPU", "NVML samples: power, energy, clocks, memory, utilisation."),
    ):
        _add(
            ViewDoc(
                kind,
                grain,
                text + " Trace columns as in docs/trace-format.md.",
                "moecap.analyze.load",
                _trace_columns(kind),
            )
        )
    _add(
        ViewDoc(
            "expert_tokens",
            "one (step, MoE layer, expert)",
            "Expert counts in long form, computed when queried: filters on run_id, ranks and step are "
            "pushed into the Parquet scan before the counts are unnested. For whole-run totals "
            "`expert_totals` is far cheaper.",
            "moecap.analyze.load",
            (
                *_IDENTITY,
                _c("step", "", "Step key (joins steps.step of the same run, dp, pp, tp)."),
                _c("layer", "", "Decoder-layer index of the MoE layer."),
                _c("expert", "", "Expert id (0 … num_experts − 1) in the trace's id space."),
                _c("tokens", "tokens", "Tokens routed to the expert in the step (once per top-k choice)."),
            ),
        )
    )
    _add(
        ViewDoc(
            "expert_step_stats",
            "one step of one recording process",
            "Per-step expert statistics (metrics/experts.py `step_statistics`), computed from the counts "
            "while the trace is converted.",
            "moecap.analyze.load",
            (
                *_IDENTITY,
                _c("step", "", "Step key."),
                _c("active_experts", "experts", "Experts with ≥ 1 token, summed over the file's MoE layers."),
                _c("routed_tokens", "tokens", "Σ counts over layers and experts (tokens × top_k × layers)."),
                _c(
                    "imbalance_mean",
                    "ratio",
                    "Mean over MoE layers of max expert load / mean expert load (layers with tokens); "
                    "NaN for a step that routed no token.",
                ),
                _c(
                    "imbalance_max",
                    "ratio",
                    "Largest per-layer max/mean load in the step; NaN as imbalance_mean.",
                ),
                _c("layer_tokens_min", "tokens", "Fewest tokens routed in any one MoE layer."),
                _c("layer_tokens_max", "tokens", "Most tokens routed in any one MoE layer."),
            ),
        )
    )
    _add(
        ViewDoc(
            "expert_totals",
            "one (phase, MoE layer, expert) of one recording process",
            "Expert counts summed over the steps of each phase (dead experts included as zeros).",
            "moecap.analyze.load",
            (
                *_IDENTITY,
                _c("phase", "", "Phase of the steps summed (`unknown` for counts without a matching step)."),
                _c("moe_layer", "", "Index among the file's MoE layers."),
                _c("layer", "", "Decoder-layer index."),
                _c("expert", "", "Expert id."),
                _c("tokens", "tokens", "Tokens routed to the expert over the phase's steps."),
                _c("active_steps", "steps", "Steps in which the expert received ≥ 1 token."),
            ),
        )
    )
    _add(
        ViewDoc(
            "step_metrics",
            "one step of one recording process (lowest TP rank)",
            "Per-step bytes moved, FLOPs, time accounting and S-MBU / S-MFU of the default (moecap) "
            "formula, on the trace's GPU or the one given with `--gpu` / `Options(gpu=...)`.",
            "moecap.analyze.analysis",
            _STEP_METRICS_COLUMNS,
        )
    )
    _add(
        ViewDoc(
            "run_settings",
            "one run",
            "What the step views read per run besides the steps: the GPU the metrics are computed for, "
            "its bandwidth and peak, GPU count, last pipeline stage and MoE layers.",
            "moecap.analyze.analysis",
            (
                _c("run_id", "", "Run id."),
                _c("model_id", "", "Model id of the run."),
                _c("gpu", "", "GPU the metrics are computed for (resolved name; --gpu when re-targeted)."),
                _c("retargeted", "", "True when analysed as another GPU than the trace's (`--gpu`)."),
                _c("batch_size", "requests", "Target concurrency of the workload (null when not stated)."),
                _c("gpu_bandwidth", "bytes/s", "Memory bandwidth of that GPU."),
                _c("gpu_peak_flops", "FLOP/s", "Dense peak FLOP/s of that GPU at peak_dtype."),
                _c("peak_dtype", "", "The routed experts' activation dtype the peak is taken at."),
                _c("num_gpus", "GPUs", "GPUs of the run (distinct UUIDs)."),
                _c("last_pp", "", "Last pipeline stage (its steps carry the logit rows)."),
                _c("num_moe_layers", "layers", "MoE layers of the model."),
            ),
        )
    )
    _add(
        ViewDoc(
            "run_windows",
            "one run",
            "Each run's resolved metrics window (`--window`); a step is in it when "
            "`moecap.analyze.metrics.window.IN_WINDOW_SQL` holds.",
            "moecap.analyze.metrics.window",
            (
                _c("run_id", "", "Run id."),
                _c("kind", "", "all | steady | steps | time (steady falls back to all, and says why)."),
                _c("first_step", "", "steps: first step key (inclusive)."),
                _c("last_step", "", "steps: last step key (inclusive)."),
                _c("t0_ns", "ns", "time: first step start allowed (host clock)."),
                _c("t1_ns", "ns", "time: last step start allowed (host clock)."),
                _c("min_requests", "requests", "steady: num_reqs a step must reach."),
                _c("description", "", "The window in words."),
            ),
        )
    )
    _add(
        ViewDoc(
            "window_steps",
            "one step inside its run's metrics window",
            "The `step_metrics` rows every run-level step metric is computed over: no draft passes, "
            "time_s > 0, inside the window (default: steady state; `--window`). "
            "Σ bytes_total / (gpu_bandwidth × Σ time_s × gpus) over it is the run's S-MBU. "
            "Columns as `step_metrics`.",
            "moecap.analyze.sql.views",
            _STEP_METRICS_COLUMNS,
            derived_sql=WINDOW_STEPS_SQL.strip(),
        )
    )
    _add(
        ViewDoc(
            "request_steps",
            "one request that appears in the steps",
            "What the engine's steps say about each request: how many steps, its decode batch size.",
            "moecap.analyze.sql.views",
            _REQUEST_STEPS_COLUMNS,
            derived_sql=derived.REQUEST_STEPS_SQL.strip(),
        )
    )
    _add(
        ViewDoc(
            "request_metrics",
            "one request",
            "Per-request latency of the default formula (TTFT, TPOT, E2E, ITL; client clock). Averages "
            "over `ok` rows are the request metrics of metrics.json. Join `request_steps` "
            "`USING (run_id, engine_req_id)` for the batch each request ran in.",
            "moecap.analyze.metrics.requests",
            _REQUEST_METRICS_COLUMNS,
        )
    )
    _add(
        ViewDoc(
            "run_metrics",
            "one (run, phase); phase `all` covers every phase",
            "The scalar step metrics of metrics.json (`runs[*].metrics.steps[phase]`), computed by the "
            "same SQL (moecap.analyze.metrics.steps), for comparing runs in SQL.",
            "moecap.analyze.sql.views",
            run_metrics_columns,
            derived_sql=derived.RUN_METRICS_SQL.strip(),
        )
    )


_build()
