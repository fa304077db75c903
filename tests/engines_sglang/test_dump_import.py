"""Dumps written by SGLang's OWN dump code (`_StatAccumulator.dump`, `_DetailAccumulator.dump` and
`_dump_to_file` of the release under test, on the CPU) import into the counts that went in.

The accumulators' constructors read the live server context (`get_exec()`, a device), so they are
built with `object.__new__` and given the attributes their constructors set; `append` and `dump`,
the code that shapes the file, are SGLang's. The stat dump's all-reduce over ranks is stood in for by
"two TP ranks with the same counts" (SUM = x2), which is what SGLang does under plain TP."""

from __future__ import annotations

import torch
from sglang_objects import location_metadata

from moecap.collect.engines.sglang.dump import import_sglang_dumps, read_dump
from moecap.schemas import open_traces

L, E, K = 3, 4, 2
CONFIG = {"num_hidden_layers": L, "num_experts": E, "num_experts_per_tok": K, "_name_or_path": "tiny/moe"}
P2L = torch.tensor([[3, 2, 1, 0, 1]] * L)  # 5 physical slots, reversed, logical 1 twice (EPLB)


def _phys(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(L, P2L.shape[1], dtype=torch.int32)
    for layer in range(L):
        for _ in range(tokens):
            out[layer, torch.randperm(P2L.shape[1], generator=g)[:K]] += 1
    return out


def _logical(phys: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(L, E, dtype=torch.int64)
    out.scatter_add_(1, P2L, phys.long())
    return out


def _counts(out) -> dict[int, list[int]]:
    (run,) = open_traces([out], strict=True).runs.values()
    (f,) = run.tables("experts")
    return {r["step"]: r["counts"] for r in f.table.to_pylist()}


def test_sglangs_stat_dump_imports_to_the_logical_counts(sglang_version, tmp_path, monkeypatch):
    from sglang.srt.eplb import expert_distribution as ed

    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path / "dumps"))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: t.mul_(2))
    acc = object.__new__(ed._StatAccumulator)
    acc._expert_location_metadata = location_metadata(L, E, p2l=P2L)
    acc._rank, acc._enable, acc._first_dump = 0, False, False
    acc._global_physical_count_of_buffered_step = ed._CircularBuffer(
        (L, 5), 4, dtype=torch.int32, device="cpu"
    )
    passes = [_phys(n, n) for n in (3, 5)]
    for i, phys in enumerate(passes):
        acc.append(i, "primary", {"global_physical_count": phys}, {})
    acc.dump("file")
    (path,) = (tmp_path / "dumps").glob("expert_distribution_recorder_*.pt")
    assert read_dump(path).mode == "stat"
    import_sglang_dumps([path], tmp_path / "out", model_config=CONFIG, tp_size=2)
    got = _counts(tmp_path / "out")
    assert got == {i: _logical(p).flatten().tolist() for i, p in enumerate(passes)}
    assert [sum(got[1][i * E : (i + 1) * E]) for i in range(L)] == [5 * K] * L


def test_sglangs_per_pass_dump_imports_through_its_physical_to_logical_map(
    sglang_version, tmp_path, monkeypatch
):
    from sglang.srt.eplb import expert_distribution as ed

    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path / "dumps"))
    acc = object.__new__(ed._DetailAccumulator)
    acc._expert_location_metadata = location_metadata(L, E, p2l=P2L)
    acc._rank, acc._enable, acc._records = 0, False, []
    passes = {17: _phys(4, 1), 18: _phys(1, 2)}
    for fid, phys in passes.items():
        acc.append(fid, "primary", {"global_physical_count": phys}, {})
    acc.dump("file")
    (path,) = (tmp_path / "dumps").glob("expert_distribution_recorder_*_0.pt")
    dump = read_dump(path)
    assert dump.mode == "per_pass" and dump.rank == 0
    import_sglang_dumps([path], tmp_path / "out", model_config=CONFIG)
    assert _counts(tmp_path / "out") == {fid: _logical(p).flatten().tolist() for fid, p in passes.items()}
