"""MoE-CAP per-step records (`batch_data.json`): loading, and the polars frame the formulas run on.

A record is one forward pass as the reference's server-side recorder writes it. The frame has one
row per record with these columns (all optional except where a formula needs them; extra keys in the
records are ignored):

=================  =====================================  ===============================================
column             dtype                                  meaning
=================  =====================================  ===============================================
forward_mode       String                                 "prefill" (any extend pass), "decode"; vLLM also
                                                          "mixed", the client fallback "decoding"
batch_size         Float64                                requests in the pass
seq_lens_sum       Float64                                context tokens of the pass (cached + new, summed
                                                          over the batch), tokens
latency            Float64                                synchronised wall time of the forward call, s
ttft               Float64                                pass duration in file-shape traces without
                                                          `latency`, s (run-level values only)
expert_activation  Float64                                distinct experts hit, averaged over layers;
                                                          null or < 0 = invalid (record skipped)
gpu_num            Int64 (String if a record has "N/A")   GPUs of the server process (tp x pp)
gpu_raw_type       String                                 reference GPU key, e.g. NVIDIA-H100-HBM3-80GB
per_req_info       List(Struct)                           prefill only: one entry per request in the pass,
                                                          fields below
scheduled_tokens   Float64                                tokens the pass actually ran (cached excluded)
=================  =====================================  ===============================================

`per_req_info` entries: `req_id` (String; ids are compared by their string form), `req_id_present`
(Boolean: the entry had a `req_id` key, even with a null value - the reference then keys the request
by that null instead of by `req_pool_idx`; null means "present iff req_id is not null"),
`req_pool_idx` (Int64), `extend_len` (Int64, new tokens of this chunk), `total_len` (Int64, tokens of
the request so far), `is_last_chunk` (Boolean).

Null and absent are the same in a frame. Where the reference tells them apart we follow "absent",
except for `req_id` (kept exact through `req_id_present`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from moecap.analyze.errors import InputError

from .record_file import load_reference_records  # noqa: F401 - its former home; still imported from here

PER_REQ_INFO_FIELDS: dict[str, pl.DataType] = {
    "req_id": pl.String(),
    "req_id_present": pl.Boolean(),
    "req_pool_idx": pl.Int64(),
    "extend_len": pl.Int64(),
    "total_len": pl.Int64(),
    "is_last_chunk": pl.Boolean(),
}

RECORD_SCHEMA: dict[str, pl.DataType] = {
    "forward_mode": pl.String(),
    "batch_size": pl.Float64(),
    "seq_lens_sum": pl.Float64(),
    "latency": pl.Float64(),
    "ttft": pl.Float64(),
    "expert_activation": pl.Float64(),
    "gpu_num": pl.Int64(),
    "gpu_raw_type": pl.String(),
    "per_req_info": pl.List(pl.Struct(PER_REQ_INFO_FIELDS)),
    "scheduled_tokens": pl.Float64(),
}

#: How the column decoder reads each metric field: numbers as Float64 (a JSON bool reads as 1/0, as the
#: frame built from Python objects does), integers as their text (checked by an exact cast: a float,
#: a bool or an integer beyond int64 fails it), strings as String. A value of another JSON type fails
#: the read.
_DECODE_ENTRY = {
    "req_id": pl.String(),
    "req_pool_idx": pl.String(),
    "extend_len": pl.String(),
    "total_len": pl.String(),
    "is_last_chunk": pl.Boolean(),
}
_DECODE_SCHEMA: dict[str, pl.DataType] = {
    "forward_mode": pl.String(),
    "batch_size": pl.Float64(),
    "seq_lens_sum": pl.Float64(),
    "latency": pl.Float64(),
    "ttft": pl.Float64(),
    "expert_activation": pl.Float64(),
    "per_req_info": pl.List(pl.Struct(_DECODE_ENTRY)),
    "scheduled_tokens": pl.Float64(),
}


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_SCALAR = r"^(-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|true|false)$"


def load_reference_frame(path: str | Path) -> pl.DataFrame | None:
    """A JSON-list `batch_data.json` decoded straight into the record frame (RECORD_SCHEMA, the first
    record's `gpu_num` / `gpu_raw_type` as the GPU columns), with polars' JSON reader: no Python object
    per record, ~2x cheaper than `json` + `records_to_frame`. The same frame as
    `records_to_frame(load_reference_records(path))`, or None where it might not be: any other file
    shape (JSON Lines, ``{"records": ...}``, a byte-order mark, an escape sequence, NaN/Infinity), a
    value the reader refuses, an integer field that is not an exact integer, a null `req_id` (absent and
    null differ there), a `forward_mode` or `req_id` that reads as a JSON number or bool (it may have
    been one), first-record GPU fields of another type. The caller then reads it with
    `load_reference_records`, which also gives the errors. A record that writes one key twice is
    read with the first value here, the last by `json` (see docs/decisions.md, 2026-12-06)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    start = data[:64].lstrip(b" \t\n\r")  # JSON's whitespace, as json.loads skips it
    # JSON escapes (\uXXXX in keys or strings) are left to Python's json: it decodes them in keys too.
    if not start.startswith(b"[") or b"\\u" in data:
        return None
    try:
        frame = pl.read_json(data, schema=_DECODE_SCHEMA)
        first = _first_record(data)
        if frame.height == 0 or first is None:
            return None
        info = pl.col("per_req_info")
        entries = frame.get_column("per_req_info").explode(empty_as_null=False).drop_nulls()
        if entries.len() != frame.get_column("per_req_info").list.len().sum():
            return None  # a null entry
        if entries.struct.field("req_id").null_count():
            return None  # a null or absent req_id: the reference tells them apart; json does too
        # A number or bool where text belongs is written as text by both readers, but not always the
        # same text (1e+20, -0.0), and json's frame refuses integers beyond int64: left to json.
        for text in (frame.get_column("forward_mode"), entries.struct.field("req_id")):
            if text.str.contains(_JSON_SCALAR).any():
                return None
        int_fields = [
            pl.element().struct.field(name).cast(pl.Int64, strict=True)
            for name in ("req_pool_idx", "extend_len", "total_len")
        ]
        frame = frame.with_columns(
            info.list.eval(
                pl.struct(
                    pl.element().struct.field("req_id"),
                    pl.element().struct.field("req_id").is_not_null().alias("req_id_present"),
                    *int_fields,
                    pl.element().struct.field("is_last_chunk"),
                )
            ),
            _gpu_column("gpu_num", first.get("gpu_num"), pl.Int64()),
            _gpu_column("gpu_raw_type", first.get("gpu_raw_type"), pl.String()),
        )
    except (Exception, pl.exceptions.PanicException):  # whatever the reader refuses: json decides
        return None
    return frame.select(list(RECORD_SCHEMA))


def _first_record(data: bytes) -> dict[str, Any] | None:
    """The first record decoded by Python's json (its GPU fields are the reference's defaults), from the
    file's first 64 kB where it fits there (a prefix that decodes to a whole object holds that object).
    Called after polars' reader accepted the bytes, so they are valid UTF-8: ignoring errors only drops
    a character cut at the prefix's end."""
    for size in (1 << 16, len(data)):
        text = data[:size].decode("utf-8", errors="ignore")
        try:
            at = _JSON_SPACE.match(text, text.index("[") + 1).end()  # type: ignore[union-attr]
            first, _ = json.JSONDecoder().raw_decode(text, at)
        except (json.JSONDecodeError, ValueError, RecursionError):
            if size >= len(data):
                return None
            continue
        return first if type(first) is dict else None
    return None


def _gpu_column(name: str, value: Any, dtype: pl.DataType) -> pl.Expr:
    """The first record's GPU field as a constant column of its documented type (Int64 or, for "N/A",
    String for gpu_num; String for gpu_raw_type); a value of another type is refused (ValueError)."""
    if value is None:
        return pl.lit(None, dtype).alias(name)
    if isinstance(value, str) or (
        isinstance(value, int) and not isinstance(value, bool) and dtype == pl.Int64()
    ):
        return pl.lit(value, pl.String() if isinstance(value, str) else dtype).alias(name)
    raise ValueError(f"{name} {value!r}")


def records_to_frame(records: Sequence[Mapping[str, Any]], *, gpu_columns: bool = True) -> pl.DataFrame:
    """The records as a frame with the documented columns (RECORD_SCHEMA), one row per record.

    `gpu_columns=False` leaves out `gpu_num` / `gpu_raw_type` (the metrics read them from the first
    record only). Raises InputError when a field has a value of the wrong type.
    """
    schema = dict(RECORD_SCHEMA)
    if not gpu_columns:
        del schema["gpu_num"], schema["gpu_raw_type"]
    source_schema = dict(schema)
    # The source dicts carry no req_id_present; it is added below.
    source_schema["per_req_info"] = pl.List(
        pl.Struct({k: v for k, v in PER_REQ_INFO_FIELDS.items() if k != "req_id_present"})
    )
    try:
        frame = _build(records, source_schema)
    except InputError:
        if not gpu_columns:
            raise
        # The client-only fallback of the reference writes gpu_num "N/A".
        source_schema["gpu_num"] = pl.String()
        frame = _build(records, source_schema)
    return _add_req_id_present(frame, records)


def _build(records: Sequence[Mapping[str, Any]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    try:
        return pl.DataFrame(records, schema=schema, strict=False)
    except (pl.exceptions.PolarsError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise InputError(f"records do not fit the reference record columns: {first}") from None


def _add_req_id_present(frame: pl.DataFrame, records: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """Add `per_req_info[].req_id_present`. Only entries whose req_id is null are ambiguous (absent key or
    explicit null); for those, and only those, the source dicts are consulted."""
    info = pl.col("per_req_info")
    # Rebuilt field by field in the documented order: polars 2 casts structs only between equal field
    # orders, and with_fields would append req_id_present last.
    entry = pl.element().struct
    frame = frame.with_columns(
        info.list.eval(
            pl.struct(
                [
                    entry.field("req_id").is_not_null().alias(name)
                    if name == "req_id_present"
                    else entry.field(name).cast(dtype)
                    for name, dtype in PER_REQ_INFO_FIELDS.items()
                ]
            )
        )
    )
    entries = (
        frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"), info)
        .filter(info.list.len() > 0)
        .explode("per_req_info")
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("_row").alias("_pos"))
    )
    ambiguous = entries.filter(info.struct.field("req_id").is_null())
    rows, positions = ambiguous["_row"].to_list(), ambiguous["_pos"].to_list()
    present = []
    for r, q in zip(rows, positions, strict=True):
        entry = records[r]["per_req_info"][q]
        if not isinstance(entry, Mapping):
            raise InputError(
                f"record {r}: per_req_info[{q}] is {'null' if entry is None else type(entry).__name__}, "
                "not an object with req_id, extend_len, total_len"
            )
        present.append("req_id" in entry)
    if not any(present):
        return frame.with_columns(info.cast(RECORD_SCHEMA["per_req_info"]))
    flags = pl.DataFrame({"_row": rows, "_pos": positions, "_null_present": present})
    rebuilt = (
        entries.join(flags, on=["_row", "_pos"], how="left")
        .with_columns(
            info.struct.with_fields(
                (pl.field("req_id_present") | pl.col("_null_present").fill_null(False)).alias(
                    "req_id_present"
                )
            )
        )
        .group_by("_row", maintain_order=True)
        .agg(info.alias("_info"))
    )
    return (
        frame.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"))
        .join(rebuilt, on="_row", how="left", maintain_order="left")
        .with_columns(pl.coalesce("_info", info).cast(RECORD_SCHEMA["per_req_info"]).alias("per_req_info"))
        .drop("_row", "_info")
    )


#: Columns the formulas read (a subset of RECORD_SCHEMA).
METRIC_COLUMNS = (
    "forward_mode",
    "batch_size",
    "seq_lens_sum",
    "latency",
    "ttft",
    "expert_activation",
    "per_req_info",
    "scheduled_tokens",
)


def normalize_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """The metric columns of `frame` with the documented dtypes; missing columns (and missing
    per_req_info fields) are added as nulls. Raises InputError when a column cannot be cast.

    Column by column, eagerly: a column that already has its dtype is passed through as is (no copy),
    and no query plan is built for the usual frame (a lazy select costs more than the rest of a
    1e5-record reference computation's bookkeeping).
    """
    schema = frame.schema
    missing = [name for name in METRIC_COLUMNS if name not in schema]
    if missing:
        # Null literals: polars keeps them as one broadcast value instead of a column of nulls.
        frame = frame.with_columns(pl.lit(None, RECORD_SCHEMA[name]).alias(name) for name in missing)
        schema = frame.schema
    columns = []
    try:
        for name in METRIC_COLUMNS:
            dtype = RECORD_SCHEMA[name]
            if name == "per_req_info" and schema[name] != dtype:
                columns.append(
                    frame.select(_complete_entries(schema[name]).cast(dtype).alias(name)).to_series()
                )
            else:
                column = frame.get_column(name)
                columns.append(column if schema[name] == dtype else column.cast(dtype))
    except pl.exceptions.PolarsError as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise InputError(f"record frame does not fit the reference record columns: {first}") from None
    return pl.DataFrame(columns)


def _complete_entries(dtype: pl.DataType) -> pl.Expr:
    """per_req_info rebuilt field by field (by name) with the documented fields and dtypes; fields a
    hand-built frame lacks become nulls."""
    info = pl.col("per_req_info")
    target = RECORD_SCHEMA["per_req_info"]
    if dtype == target:
        return info
    inner = getattr(dtype, "inner", None)
    if not isinstance(inner, pl.Struct):
        return info
    have = {f.name for f in inner.fields}
    fields = [
        pl.element().struct.field(name).cast(t) if name in have else pl.lit(None, t).alias(name)
        for name, t in PER_REQ_INFO_FIELDS.items()
    ]
    return info.list.eval(pl.struct(fields))


def frame_to_records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """The frame back as reference records: null fields are left out (absent), `req_id_present` decides
    whether a null `req_id` is written. Not used by the formulas; for exporting reduced traces."""
    out: list[dict[str, Any]] = []
    for row in frame.to_dicts():
        rec = {k: v for k, v in row.items() if v is not None and k != "per_req_info"}
        if isinstance(rec.get("gpu_num"), str) and rec["gpu_num"].isdigit():
            rec["gpu_num"] = int(rec["gpu_num"])
        for k in ("batch_size", "seq_lens_sum", "scheduled_tokens"):
            v = rec.get(k)
            if isinstance(v, float) and v.is_integer():
                rec[k] = int(v)
        entries = row.get("per_req_info")
        if entries is not None:
            rec["per_req_info"] = [_entry_to_dict(e) for e in entries]
        out.append(rec)
    return out


def _entry_to_dict(entry: Mapping[str, Any]) -> dict[str, Any]:
    present = entry.get("req_id_present")
    if present is None:
        present = entry.get("req_id") is not None
    d = {k: v for k, v in entry.items() if v is not None and k != "req_id_present"}
    if present and "req_id" not in d:
        d["req_id"] = None
    return d
