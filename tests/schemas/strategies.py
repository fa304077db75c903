"""Hypothesis strategies producing valid rows of each trace table."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import strategies as st

from moecap.schemas import PHASES, TABLES

_INT_BOUNDS = {
    pa.int16(): (-(2**15), 2**15 - 1),
    pa.int32(): (-(2**31), 2**31 - 1),
    pa.int64(): (-(2**63), 2**63 - 1),
    pa.int8(): (-128, 127),
}


def _value(type_: pa.DataType, name: str) -> st.SearchStrategy:
    if name == "phase":
        return st.sampled_from(PHASES)
    if type_ in _INT_BOUNDS:
        lo, hi = _INT_BOUNDS[type_]
        return st.integers(lo, hi)
    if pa.types.is_boolean(type_):
        return st.booleans()
    if pa.types.is_float32(type_):
        return st.floats(width=32, allow_nan=False)
    if pa.types.is_string(type_):
        return st.text(max_size=20)
    if pa.types.is_list(type_):
        return st.lists(_value(type_.value_type, ""), max_size=6)
    raise AssertionError(f"no strategy for {type_}")


def rows(table: str) -> st.SearchStrategy[dict]:
    """One valid row of `table` (nullable columns sometimes None)."""
    fields = {}
    for c in TABLES[table]:
        v = _value(c.type, c.name)
        fields[c.name] = st.one_of(st.none(), v) if c.nullable else v
    return st.fixed_dictionaries(fields)
