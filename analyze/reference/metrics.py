"""`reference_metrics`: everything MoE-CAP publishes for one run, computed the reference's way.

Error policy (documented in docs/decisions.md):

* Where the reference's `_calculate_continuous_metrics` raises (zero latency, unknown GPU or a
  precision without a FLOPS row -> zero peak, a GPU count of "N/A", a missing record field, a config
  field its formulas need) the reference's runner still publishes the run-level values and a null
  cost. We do the same: the nine continuous values are None, `reason` says what the reference raised
  and why, and the run-level values are computed as usual. Never a traceback.
* Inputs the reference refuses before measuring anything raise: `InputError` for an empty record
  list, a record that is not a mapping / has a wrongly typed field, a `--precision` it does not accept;
  `SpecError` for a model config that is not a mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union, cast

from moecap.analyze.errors import InputError, SpecError

from .arrays import RecordArrays
from .columns import RecordColumns
from .continuous import CONTINUOUS_KEYS, ReferenceCrash, ReferenceHardware, continuous_metrics
from .model import normalize_model_id, reference_family, reference_model_sizes
from .precision import check_cli_precision, reference_effective_precision, reference_precision_bytes
from .run_level import run_level_values
from .tables import reference_peak_bw, reference_peak_flops, resolve_reference_gpu

if TYPE_CHECKING:
    import polars as pl

#: A list of record dicts, a record frame, or the records' numpy columns (`columns.record_columns`,
#: no frame library). polars is imported only for the first two.
Records = Union[Sequence[Mapping[str, Any]], "pl.DataFrame", RecordColumns]


def reference_hardware(gpu: str | None, precision: str) -> ReferenceHardware:
    """Peak bandwidth (TB/s) and table peak FLOPS (TFLOP/s) for a reference GPU key and precision."""
    return ReferenceHardware(
        gpu=gpu,
        peak_bandwidth_tb=reference_peak_bw(gpu) / 1e12,
        peak_flops_tf=reference_peak_flops(gpu, precision) / 1e12,
    )


def _first_record_defaults(records: Records) -> tuple[Any, Any]:
    """(gpu_num, gpu_raw_type) of the first record, the reference's defaults; a null gpu_num counts as
    absent (1)."""
    first: Mapping[str, Any]
    if isinstance(records, RecordColumns):
        first = records.first
    elif _is_frame(records):
        frame = cast("pl.DataFrame", records)
        first = {name: frame.get_column(name)[0] for name in ("gpu_num", "gpu_raw_type") if name in frame}
    else:
        first = cast(Sequence[Mapping[str, Any]], records)[0]
        if not isinstance(first, Mapping):
            raise InputError(f"record 0 is a {type(first).__name__}, not a mapping")
    gpu_num = first.get("gpu_num")
    if gpu_num is None:
        gpu_num = 1
    elif isinstance(gpu_num, str):
        gpu_num = _parse_number(gpu_num)
    return gpu_num, first.get("gpu_raw_type")


def _record_arrays(records: Records) -> RecordArrays:
    """The arrays the formulas read: from the numpy columns as they are, else through the frame."""
    if isinstance(records, RecordColumns):
        return RecordArrays(records)
    from .arrays import record_arrays
    from .records import normalize_frame, records_to_frame

    if _is_frame(records):
        return record_arrays(normalize_frame(cast("pl.DataFrame", records)))
    rows = cast(Sequence[Mapping[str, Any]], records)
    return record_arrays(normalize_frame(records_to_frame(rows, gpu_columns=False)))


def _is_frame(records: Records) -> bool:
    """A polars DataFrame (told without importing polars)."""
    return type(records).__module__.startswith("polars")


def _parse_number(text: str) -> Any:
    """A number written as text in a String gpu_num column ("8"); anything else stays text ("N/A")."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            continue
    return text


def reference_metrics(
    records: Records,
    *,
    model_config: Mapping[str, Any],
    model_name: str,
    gpu: str | None = None,
    num_gpus: int | None = None,
    precision: str | None = None,
    num_requests: int | None = None,
    total_time_s: float | None = None,
) -> dict[str, Any]:
    """MoE-CAP's published metrics for one run, reproduced exactly (metrics.md sections 1-6).

    Args:
        records: per-pass records (list of dicts as in `batch_data.json`, a frame as documented in
            `records`, or their numpy columns from `columns.record_columns`).
        model_config: the model's config.json as a dict.
        model_name: HF id (``org/model``) or local path; family dispatch uses its case-sensitive substrings.
        gpu: reference GPU key (``NVIDIA-A100-SXM4-80GB``) or moecap GPU name (``H100-SXM-80GB``);
            default: the first record's `gpu_raw_type`.
        num_gpus: GPU count N; default: the first record's `gpu_num` (1 if absent).
        precision: the reference's `--precision` flag (default ``bfloat16``; the checkpoint's
            quantization decides unless a non-bf16 value is given).
        num_requests: client requests sent (warm-up trimming, e2e_s, request_per_s).
        total_time_s: benchmark makespan, s (e2e_s, request_per_s, cost).

    Returns a dict with
        continuous values (None when `reason` is set): prefill_smbu, prefill_smfu, decoding_smbu,
        decoding_smfu (fractions 0..1), kv_size (KV elements / 1e6, no bytes factor),
        decoding_throughput (mean requests/s per step), prefill_tp (mean tokens/s), ttft, tpot (mean s);
        run-level values: cost (USD or None), e2e_s (s), request_per_s, server_request_ttft,
        published_ttft, prefill_pass_latency_s, published_tpot (s), prefill_forwarded_tokens (tokens),
        prefill_step_elapsed_s (s), avg_expert_activation_prefill / _decode (experts),
        prefill_avg_batch_size / decode_avg_batch_size (requests);
        context: reason (None, or what the reference raised and why), gpu_raw_type, num_gpus,
        precision (the effective precision string), precision_bytes, model_family,
        chunked_prefill_accounting (None when `reason` is set).
    """
    if not isinstance(model_config, Mapping):
        raise SpecError(f"model config must be a mapping (config.json), got {type(model_config).__name__}")
    check_cli_precision(precision)
    if len(records) == 0:
        raise InputError("no records: expected at least one forward-pass record")
    first_gpu_num, first_gpu = _first_record_defaults(records)
    n_gpus: Any = first_gpu_num if num_gpus is None else num_gpus
    gpu_key = resolve_reference_gpu(first_gpu if gpu is None else gpu)

    used_dtype = reference_effective_precision(model_config, precision)
    precision_bytes = reference_precision_bytes(used_dtype)
    hw = reference_hardware(gpu_key, used_dtype)

    arrays = _record_arrays(records)

    continuous: dict[str, Any] | None
    reason: str | None = None
    try:
        sizes = reference_model_sizes(model_config, model_name)
        continuous = continuous_metrics(arrays, sizes, hw, n_gpus, precision_bytes)
    except (SpecError, ReferenceCrash) as exc:
        continuous = None
        reason = f"the reference raises here: {exc}"

    result: dict[str, Any] = {key: (continuous[key] if continuous else None) for key in CONTINUOUS_KEYS}
    result.update(
        run_level_values(
            arrays,
            continuous=continuous,
            gpu=gpu_key,
            num_gpus=n_gpus,
            num_requests=num_requests,
            total_time_s=total_time_s,
        )
    )
    result.update(
        {
            "reason": reason,
            "gpu_raw_type": gpu_key,
            "num_gpus": n_gpus,
            "precision": used_dtype,
            "precision_bytes": precision_bytes,
            "model_family": reference_family(normalize_model_id(model_name)),
            "chunked_prefill_accounting": continuous["chunked_prefill_accounting"] if continuous else None,
        }
    )
    return result
