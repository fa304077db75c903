"""The device-side code: the in-graph capture copy and the out-of-graph count (torch only; runs in the
main venv too)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

torch = pytest.importorskip("torch")

from moecap.collect.engines.vllm.adapter import (  # noqa: E402
    CountPlan,
    copy_topk_rows,
    count_rows_on_host,
    count_topk_rows,
    restore_local_rows,
)

L, E, K, CAP = 3, 6, 2, 32


def buffers():
    buf = torch.full((CAP, L, K), -1, dtype=torch.int32)
    counts = torch.zeros((L, E + 2), dtype=torch.int32)
    return buf, counts, CountPlan.make(L, E, K, CAP, torch.device("cpu"))


def reference(ids_per_layer: list[torch.Tensor], n: int) -> torch.Tensor:
    """Counts by a plain loop over the real rows (what the buffer scheme must reproduce)."""
    out = torch.zeros((L, E), dtype=torch.int64)
    for layer, ids in enumerate(ids_per_layer):
        for row in ids[:n].tolist():
            for expert in row:
                if 0 <= expert < E:
                    out[layer, expert] += 1
    return out


def test_counts_only_real_rows_and_every_top_k_choice():
    gen = torch.Generator().manual_seed(1)
    n_real, padded = 9, 16
    ids = [torch.randint(0, E, (padded, K), generator=gen, dtype=torch.int32) for _ in range(L)]
    ids[0][2] = torch.tensor([4, 4], dtype=torch.int32)  # a duplicated top-k id counts twice
    for layer in range(L):
        ids[layer][n_real:] = 5  # padding junk: all on expert 5, which must not show
    buf, counts, plan = buffers()
    for slot, x in enumerate(ids):
        copy_topk_rows(buf, slot, x)
    count_topk_rows(counts, buf, n_real, plan)
    assert torch.equal(counts[:, 1 : E + 1].long(), reference(ids, n_real))
    assert int(counts[:, 0].sum()) == 0 and int(counts[:, E + 1].sum()) == 0
    assert int(counts[0, 1 + 4]) >= 2
    assert counts[:, 1 : E + 1].sum(1).tolist() == [n_real * K] * L


def test_ids_outside_the_expert_range_go_to_the_side_columns():
    # Column 0: ids below 0 (an unused top-k column); 1..E: experts 0..E-1; E + 1: ids of E and above.
    buf, counts, plan = buffers()
    copy_topk_rows(buf, 0, torch.tensor([[0, -1], [E, 3], [E + 7, 1]], dtype=torch.int32))
    copy_topk_rows(buf, 1, torch.tensor([[1, 1], [1, 1], [2, 2]], dtype=torch.int32))
    copy_topk_rows(buf, 2, torch.tensor([[5], [5], [5]], dtype=torch.int32))  # top-1 layer: column 1 stays -1
    count_topk_rows(counts, buf, 3, plan)
    assert counts[0].tolist() == [1, 1, 1, 0, 1, 0, 0, 2]
    assert counts[1].tolist() == [0, 0, 4, 2, 0, 0, 0, 0]
    assert counts[2].tolist() == [3, 0, 0, 0, 0, 0, 3, 0]


def test_copy_never_writes_past_the_buffer_and_respects_the_offset():
    buf, _, _ = buffers()
    ptr = buf.data_ptr()
    copy_topk_rows(buf, 1, torch.ones((CAP + 10, K + 3), dtype=torch.int64))
    assert buf.data_ptr() == ptr and int((buf[:, 1] == 1).sum()) == CAP * K
    buf.fill_(-1)
    copy_topk_rows(buf, 0, torch.full((4, K), 3, dtype=torch.int32), offset=CAP - 2)
    assert int((buf[:, 0] == 3).sum()) == 2 * K


def test_zero_rows_is_a_no_op():
    buf, counts, plan = buffers()
    count_topk_rows(counts, buf, 0, plan)
    copy_topk_rows(buf, 0, torch.zeros((0, K), dtype=torch.int32))
    assert int(counts.sum()) == 0 and int((buf != -1).sum()) == 0


def test_capture_copy_and_count_compile_with_fullgraph():
    """The capture copy runs inside vLLM's compiled, graph-captured forward; the count runs after it.
    Both must trace into one graph: no graph breaks, no data-dependent shapes, no host syncs."""
    torch._dynamo.reset()
    buf, counts, plan = buffers()
    ref_buf, ref_counts, _ = buffers()
    ids = torch.randint(0, E, (12, K), dtype=torch.int32)
    copy = torch.compile(copy_topk_rows, fullgraph=True, dynamic=False)
    count = torch.compile(count_topk_rows, fullgraph=True, dynamic=False)
    for slot in range(L):
        copy(buf, slot, ids + slot)
        copy_topk_rows(ref_buf, slot, ids + slot)
    count(counts, buf, 7, plan)
    count_topk_rows(ref_counts, ref_buf, 7, plan)
    assert torch.equal(buf, ref_buf) and torch.equal(counts, ref_counts)


@pytest.mark.parametrize("fn", [copy_topk_rows, count_topk_rows])
def test_device_code_has_no_host_syncs(fn):
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    banned = {
        "item",
        "cpu",
        "tolist",
        "nonzero",
        "bincount",
        "numpy",
        "synchronize",
        "unique",
        "masked_select",
    }
    calls = {
        n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    assert not calls & banned
    assert not any(isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Compare) for n in ast.walk(tree))


def test_restore_local_rows_layouts():
    rows = torch.arange(20).reshape(10, 2)
    # One DP rank, no forward context: as is.
    out, how = restore_local_rows(
        rows, tokens_per_dp=None, shard_sizes=None, local_tokens=None, dp_rank=0, tp_size=1, gather=None
    )
    assert how == "local" and out is rows
    # Naive DP dispatch: every rank's tokens concatenated; rank 1 owns rows 4..8.
    out, how = restore_local_rows(
        rows, tokens_per_dp=[4, 5, 1], shard_sizes=None, local_tokens=None, dp_rank=1, tp_size=1, gather=None
    )
    assert how == "dp-concatenated" and torch.equal(out, rows[4:9])
    # Only this rank's rows.
    out, how = restore_local_rows(
        rows[:5],
        tokens_per_dp=[4, 5, 1],
        shard_sizes=None,
        local_tokens=None,
        dp_rank=1,
        tp_size=1,
        gather=None,
    )
    assert how == "local"
    # Gathered DP×TP sequence-parallel shards (ceil-div padded: 3 tokens -> 2 + 2 rows on TP 2).
    out, how = restore_local_rows(
        rows[:8],
        tokens_per_dp=[3, 4],
        shard_sizes=[2, 2, 2, 2],
        local_tokens=None,
        dp_rank=1,
        tp_size=2,
        gather=None,
    )
    assert how == "dp-gathered-shards" and torch.equal(out, rows[4:8])
    # Sequence-parallel shard: all-gather across TP (simulated), trailing ceil-div padding trimmed.
    out, how = restore_local_rows(
        rows[:3],
        tokens_per_dp=None,
        shard_sizes=None,
        local_tokens=5,
        dp_rank=0,
        tp_size=2,
        gather=lambda t: torch.cat([t, t]),
    )
    assert how == "sp-gathered" and out.shape[0] == 5


@pytest.mark.parametrize("n", [0, 1, 7, CAP])
def test_host_count_equals_the_device_count_bit_for_bit(n):
    # Same buffer, ids in and out of range (-1 padding columns, ids >= E): same [L, E + 2] counts.
    gen = torch.Generator().manual_seed(n)
    buf, counts, plan = buffers()
    buf.copy_(torch.randint(-2, E + 3, (CAP, L, K), generator=gen, dtype=torch.int32))
    count_topk_rows(counts, buf, n, plan)
    host = count_rows_on_host(buf.reshape(-1).numpy().copy(), n, L, E, K)
    assert host.dtype.name == "int32" and host.shape == (L, E + 2)
    assert host.tolist() == counts.tolist()
    assert int(host.sum()) == n * L * K  # every id lands in exactly one column
