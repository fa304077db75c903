"""The fused per-layer expert count (one Triton kernel, run here by Triton's CPU interpreter) against
SGLang's own select-experts gatherer method, and the plugin's per-pass host work (issue #20)."""

from __future__ import annotations

import importlib.util
import inspect
import types

import pytest
import torch
from sglang_objects import E, K, L, make_batch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


VIEWS = {"view", "_unsafe_view", "alias", "detach", "select", "slice", "unsqueeze", "squeeze", "reshape",
         "expand", "as_strided", "t", "transpose", "lift_fresh"}  # fmt: skip
"""ATen ops that make views or wrap host data: no device kernel."""


class Ops(TorchDispatchMode):
    """The ATen ops that would run on the device inside the block (views left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket.__name__)
        if name not in VIEWS:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def interpret(monkeypatch):
    """Triton kernels run by its interpreter on CPU tensors (the kernel is built after this is set)."""
    from moecap.collect.engines.sglang import fused_count

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused_count.reset_for_tests()
    yield fused_count
    fused_count.reset_for_tests()


def _sglang_counts(method, layers, experts, layer, ids):
    g = types.SimpleNamespace(
        _data=torch.zeros((layers, experts), dtype=torch.int32),
        _expert_location_metadata=types.SimpleNamespace(num_physical_experts=experts),
    )
    method(g, layer, ids)
    return g._data


@needs_triton
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "tokens,top_k,live", [(1, 4, 1), (4, 4, 1), (64, 4, 64), (200, 4, 197), (333, 8, 5), (7, 2, 0)]
)
def test_fused_count_equals_sglangs_method_on_masked_ids(sgl, interpret, dtype, tokens, top_k, live):
    from moecap.collect.engines.sglang import compat

    method = compat.sglang_count_method()
    gen = torch.Generator().manual_seed(tokens * 31 + top_k)
    experts = 60
    ids = torch.randint(-1, experts, (tokens, top_k), generator=gen).to(dtype)
    scalar = torch.tensor(live, dtype=torch.int32)
    fused = torch.zeros((3, experts), dtype=torch.int32)
    fused[0] = 5  # other layers' rows are left alone
    interpret.launch(fused, 2, ids, scalar)
    masked = ids.masked_fill(torch.arange(tokens).unsqueeze(1) >= live, -1)
    theirs = _sglang_counts(method, 3, experts, 2, masked)
    assert torch.equal(fused[2], theirs[2])
    assert fused[0].tolist() == [5] * experts and fused[1].sum() == 0
    # The physical invariant, independent of both implementations: live rows' valid ids, one each.
    assert int(fused[2].sum()) == int((ids[:live] >= 0).sum())


@needs_triton
def test_fused_count_reads_a_strided_view_and_skips_out_of_range_ids(sgl, interpret):
    # SGLang hands the gatherer only the routed columns of a wider top-k when it fuses shared experts.
    wide = torch.tensor([[0, 1, 9], [2, 2, 9], [3, -1, 9], [1, 1, 9]], dtype=torch.int32)
    counts = torch.zeros((1, 4), dtype=torch.int32)
    interpret.launch(counts, 0, wide[:, :2], torch.tensor(3, dtype=torch.int32))
    assert counts[0].tolist() == [1, 1, 2, 1], "rows 0-2 of the two routed columns; id 9 is outside"
    counts.zero_()
    interpret.launch(
        counts, 0, torch.tensor([[4, 7, 1]], dtype=torch.int32), torch.tensor(1, dtype=torch.int32)
    )
    assert counts[0].tolist() == [0, 1, 0, 0], "ids >= the number of experts are not counted (as 0.5.23)"


@needs_triton
def test_prepare_checks_against_sglang_and_the_switch_turns_it_off(sgl, interpret, monkeypatch):
    from moecap.collect.engines.sglang import compat

    live = compat.allocate_live_tokens("cpu")
    assert compat.prepare_fused("cpu") is True
    assert compat.count_path("cpu") == "fused" and int(live) == 2**31 - 1, (
        "the check leaves the scalar as it was"
    )
    interpret.reset_for_tests()

    def wrong(self, layer_idx, topk_ids):  # a release whose method counted differently
        self._data[layer_idx, 0] += 1

    assert interpret.prepare("cpu", wrong, live) is False and compat.count_path("cpu") == "masked"
    interpret.reset_for_tests()
    monkeypatch.setenv(interpret.ENV_FUSED, "0")
    assert compat.prepare_fused("cpu") is False and compat.count_path("cpu") == "masked"


def test_without_a_gpu_or_the_interpreter_the_old_path_stays(sgl, monkeypatch):
    from moecap.collect.engines.sglang import compat

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    compat.allocate_live_tokens("cpu")
    assert compat.prepare_fused("cpu") is False and compat.count_path("cpu") == "masked"


def _padded_run(sgl, passes):
    """Decode passes replayed in a graph of 4 rows (`passes`: real requests per pass); padded rows are
    routed to real experts, as Qwen2-MoE's are in SGLang 0.5.16."""
    routing = [torch.tensor([[0, 1], [1, 2], [3, 3], [5, 6]], dtype=torch.int32) for _ in passes]
    sgl.install()
    sgl.set_recorder()
    r = sgl.runner(routing)
    sgl.adapter._before_graph_capture(r)  # what HookRegistry runs before init_cuda_graphs
    for n in passes:
        r.forward(make_batch("DECODE", [f"q{i}" for i in range(n)], seq_lens=[9] * n))
    return sgl.rows()


EXPECTED = {1: [1, 1, 0, 0, 0, 0, 0, 0], 2: [1, 2, 1, 0, 0, 0, 0, 0], 3: [1, 2, 1, 2, 0, 0, 0, 0],
            4: [1, 2, 1, 2, 0, 1, 1, 0]}  # fmt: skip
"""Real requests -> counts of one layer (hand-derived from the routing above)."""


@needs_triton
def test_real_forward_with_the_fused_count_masks_padding_per_pass(sgl, interpret):
    passes = [2, 2, 3, 1, 1, 4]  # changing and repeated live counts: the scalar is written only on change
    rows, counts = _padded_run(sgl, passes)
    assert sgl.meta.extra["sglang"]["count_path"] == "fused"
    assert [row["num_tokens"] for row in rows] == passes
    for row in rows:
        c = counts[row["step"]]
        for layer in range(L):
            assert c[layer * E : (layer + 1) * E] == EXPECTED[row["num_tokens"]]
            assert sum(c[layer * E : (layer + 1) * E]) == row["num_tokens"] * K


def test_real_forward_with_the_old_path_counts_the_same(sgl):
    passes = [2, 2, 3, 1, 1, 4]
    rows, counts = _padded_run(sgl, passes)
    assert sgl.meta.extra["sglang"]["count_path"] == "masked"
    for row in rows:
        assert counts[row["step"]][:E] == EXPECTED[row["num_tokens"]]


def test_live_token_scalar_is_written_only_when_it_changes(sgl):
    from moecap.collect.engines.sglang import compat

    live = compat.allocate_live_tokens("cpu")
    seen = []
    for n in (64, 64, 64, 3, 3, None, None, 64):
        with Ops() as ops:
            assert compat.set_live_tokens("cpu", n)
        seen.append((int(live), len(ops.names)))
    big = 2**31 - 1
    assert seen == [(64, 1), (64, 0), (64, 0), (3, 1), (3, 0), (big, 1), (big, 0), (64, 1)]
    compat.reset_live_tokens()
    assert int(live) == big and compat.set_live_tokens("cpu", 64) and int(live) == 64


def test_a_pass_without_eplb_adds_one_device_op_the_readback_copy(sgl):
    """Steady decode, no EPLB: what the plugin adds to a pass on the device is the readback copy of
    SGLang's buffer — no zeroing, no index_select, no live-token fill (ops counted against the same
    pass through SGLang's own forward, recorder on)."""
    from collections import Counter

    sgl.install()
    sgl.set_recorder()
    r = sgl.runner([])
    sgl.adapter._before_graph_capture(r)
    r.forward(make_batch("DECODE", ["a"], seq_lens=[5]))  # creates the tracer, sets the scalar
    first, second = make_batch("DECODE", ["a"], seq_lens=[6]), make_batch("DECODE", ["a"], seq_lens=[7])
    with Ops() as theirs:
        sgl._original_forward(r, first)
    with Ops() as ours:
        r.forward(second)
    added = Counter(ours.names) - Counter(theirs.names)
    assert added == Counter({"copy_": 1}), (added, ours.names)


def test_moe_rows_are_picked_on_the_host_when_the_buffer_has_dense_layers(sgl):
    # Layer 0 dense (mlp_only_layers), layers 1-2 MoE: the recorder buffer has 3 rows, the row 2 x E.
    sgl.install()
    sgl.set_recorder()
    ids = torch.tensor([[0, 1], [6, 7]], dtype=torch.int32)
    r = sgl.runner([ids])
    r.model_config.hf_config.mlp_only_layers = [0]
    r.forward(make_batch("DECODE", ["a", "b"], seq_lens=[3, 4]))
    rows, counts = sgl.rows()
    assert sgl.meta.moe.layer_ids == [1, 2]
    c = counts[rows[0]["step"]]
    assert len(c) == 2 * E
    assert c[:E] == c[E:] == [1, 1, 0, 0, 0, 0, 1, 1]


def test_fused_launch_has_no_host_sync_or_data_dependent_shape():
    """Capture safety by inspection: the launch reads shapes and strides only, never tensor values."""
    from moecap.collect.engines.sglang import fused_count

    src = inspect.getsource(fused_count.launch)
    for banned in (
        ".item(",
        ".cpu(",
        ".tolist(",
        ".nonzero(",
        "bincount",
        "synchronize",
        "torch.zeros",
        "torch.empty",
    ):
        assert banned not in src, banned
