"""`moecap-collect import-sglang-dump`: SGLang's expert-distribution dumps (written here with `torch.save` in
the structure `sglang/srt/eplb/expert_distribution.py` dumps, 0.5.16 and 0.5.23) become `steps` +
`experts` trace files whose counts the analyzer's `expert_tokens` view reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moecap.analyze.sql import tables
from moecap.collect.engines.sglang.dump import import_sglang_dumps, load_model_config, read_dump
from moecap.collect.errors import CollectError
from moecap.schemas import open_traces

torch = pytest.importorskip("torch")

L, E, K = 4, 8, 2
CONFIG = {
    "_name_or_path": "tiny/moe",
    "model_type": "qwen2_moe",
    "num_hidden_layers": L,
    "num_experts": E,
    "num_experts_per_tok": K,
    "mlp_only_layers": [0],  # layer 0 is dense: its dump row stays zero and is not an MoE layer
}
MOE_LAYERS = [1, 2, 3]


def routed(tokens: int, seed: int, num_experts: int = E) -> torch.Tensor:
    """[L, num_experts] counts of `tokens` tokens, each choosing K distinct experts (dense layer 0 empty)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(L, num_experts, dtype=torch.int32)
    for layer in MOE_LAYERS:
        for _ in range(tokens):
            out[layer, torch.randperm(num_experts, generator=g)[:K]] += 1
    return out


def stat_dump(path: Path, passes: list[torch.Tensor], slots: int, tp: int) -> Path:
    """What `_StatAccumulator.dump` writes: the circular buffer's slots, all-reduced (SUM) over `tp` ranks."""
    buf = torch.zeros(slots, L, E, dtype=torch.int32)
    for i, c in enumerate(passes):
        buf[i] = c * tp
    torch.save({"rank": 0, "logical_count": buf, "average_utilization_rate_over_window": None}, path)
    return path


def experts_by_step(out: Path) -> dict[int, list[int]]:
    (run,) = open_traces([out], strict=True).runs.values()
    (f,) = run.tables("experts")
    return {r["step"]: r["counts"] for r in f.table.to_pylist()}


def layer_sums(counts: list[int]) -> list[int]:
    return [sum(counts[i * E : (i + 1) * E]) for i in range(len(counts) // E)]


def test_stat_dump_divided_by_tp_size_gives_each_pass_tokens_times_top_k(tmp_path):
    tokens = [5, 3, 7]
    passes = [routed(n, seed=n) for n in tokens]
    dump = stat_dump(tmp_path / "expert_distribution_recorder_1764806400.25.pt", passes, slots=6, tp=2)
    result = import_sglang_dumps([dump], tmp_path / "out", model_config=CONFIG, tp_size=2)
    assert result.run_id.startswith("20251204T000000Z-sglang-dump-moe-stat-")
    got = experts_by_step(tmp_path / "out")
    assert sorted(got) == [0, 1, 2]  # the three unused slots (all zero) are dropped
    for slot, n in enumerate(tokens):
        assert got[slot] == passes[slot][MOE_LAYERS].flatten().tolist()
        assert layer_sums(got[slot]) == [n * K] * 3
    (run,) = open_traces([tmp_path / "out"], strict=True).runs.values()
    meta = run.metadata
    assert meta.moe.layer_ids == MOE_LAYERS and (meta.moe.num_experts, meta.moe.top_k) == (E, K)
    assert meta.model.config == CONFIG and meta.engine.name == "sglang"
    block = meta.extra["sglang_dump"]
    assert block["tp_divided"] is True and "divided by tp_size 2" in block["counts_scale"]
    (steps,) = run.tables("steps")
    rows = steps.table.to_pylist()
    assert [r["num_tokens"] for r in rows] == tokens and {r["phase"] for r in rows} == {"mixed"}
    assert {r["t_start_ns"] for r in rows} == {meta.clock.monotonic_ns} and rows[0]["gpu_start_ns"] is None


def test_stat_dump_is_kept_as_dumped_unless_told_and_says_so(tmp_path):
    c = routed(4, seed=1)
    dump = stat_dump(tmp_path / "expert_distribution_recorder_1.pt", [c], slots=2, tp=2)
    import_sglang_dumps([dump], tmp_path / "out", model_config=CONFIG)
    assert experts_by_step(tmp_path / "out")[0] == (c[MOE_LAYERS] * 2).flatten().tolist()
    (run,) = open_traces([tmp_path / "out"], strict=True).runs.values()
    block = run.metadata.extra["sglang_dump"]
    assert block["tp_divided"] is False and "x tp_size" in block["counts_scale"]
    with pytest.raises(CollectError, match=r"logical_count\[0\] is not divisible by --tp-size 3"):
        import_sglang_dumps([dump], tmp_path / "o3", model_config=CONFIG, tp_size=3)


def _p2l() -> torch.Tensor:
    """A non-identity EPLB map: 8 logical experts on 10 physical slots, reversed, logical 0 and 5 twice."""
    row = [7, 6, 5, 4, 3, 2, 1, 0, 0, 5]
    return torch.tensor([row] * L, dtype=torch.int64)


def per_pass_dump(path: Path, rank: int, passes: list[tuple[int, torch.Tensor]]) -> Path:
    """What `_DetailAccumulator.dump` writes in mode per_pass (one file per rank)."""
    records = [
        {"forward_pass_id": fid, "rank": rank, "gatherer_key": "primary", "global_physical_count": phys}
        for fid, phys in passes
    ]
    torch.save({"records": records, "last_physical_to_logical_map": _p2l()}, path)
    return path


def test_per_pass_physical_counts_go_through_the_physical_to_logical_map(tmp_path):
    p2l = _p2l()
    phys = [routed(n, seed=10 + n, num_experts=10) for n in (6, 2)]
    logical = []
    for c in phys:
        want = torch.zeros(L, E, dtype=torch.int64)
        for layer in range(L):
            for slot in range(10):
                want[layer, int(p2l[layer, slot])] += int(c[layer, slot])
        logical.append(want)
    files = [
        per_pass_dump(
            tmp_path / f"expert_distribution_recorder_1.5_{rank}.pt", rank, [(40, phys[0]), (41, phys[1])]
        )
        for rank in (0, 1)
    ]
    result = import_sglang_dumps(files, tmp_path / "out", model_config=CONFIG)
    assert "ranks [1] not imported" in result.summary
    got = experts_by_step(tmp_path / "out")
    assert sorted(got) == [40, 41]  # the step key is SGLang's forward_pass_id
    assert (
        got[40] == logical[0][MOE_LAYERS].flatten().tolist()
        and got[41] == logical[1][MOE_LAYERS].flatten().tolist()
    )
    assert layer_sums(got[40]) == [12] * 3 and layer_sums(got[41]) == [4] * 3
    both = import_sglang_dumps(files, tmp_path / "sum", model_config=CONFIG, sum_ranks=True)
    traces = open_traces([tmp_path / "sum"], strict=True)
    experts = [f for f in traces.files if f.table_kind == "experts"]
    assert sorted(f.run.rank.tp for f in experts) == [0, 1] and len(both.paths) == 4
    assert {f.run.extra["sglang"]["counts_scope"] for f in experts} == {"sum_over_ranks"}
    with pytest.raises(CollectError, match="--tp-size divides stat dumps only"):
        import_sglang_dumps(files, tmp_path / "x", model_config=CONFIG, tp_size=2)


def test_per_token_records_give_the_batch_composition(tmp_path):
    # An EXTEND pass of two requests (3 new tokens after a 2-token cached prefix, then 2 from scratch),
    # then a DECODE pass of the same two requests.
    topk = torch.full((L, 5, 8), -1, dtype=torch.int32)
    extend = {
        "input_ids": [11, 12, 13, 21, 22],
        "positions": [2, 3, 4, 0, 1],
        "extend_seq_lens": [3, 2],
        "forward_mode": 1,
        "topk_ids_of_layer": topk,
        "misc_objects": [],
    }
    decode = {
        "input_ids": [14, 23],
        "positions": [5, 2],
        "extend_seq_lens": None,
        "forward_mode": 2,
        "topk_ids_of_layer": topk[:, :2],
        "misc_objects": [],
    }
    records = [
        dict(
            extend, forward_pass_id=7, rank=0, gatherer_key="primary", global_physical_count=routed(5, 1, 10)
        ),
        dict(
            decode, forward_pass_id=8, rank=0, gatherer_key="primary", global_physical_count=routed(2, 2, 10)
        ),
    ]
    path = tmp_path / "expert_distribution_recorder_2_0.pt"
    torch.save({"records": records, "last_physical_to_logical_map": _p2l()}, path)
    assert read_dump(path).mode == "per_token"
    import_sglang_dumps([path], tmp_path / "out", model_config=CONFIG)
    (run,) = open_traces([tmp_path / "out"], strict=True).runs.values()
    (steps,) = run.tables("steps")
    rows = {r["step"]: r for r in steps.table.to_pylist()}
    assert rows[7]["phase"] == "prefill" and rows[7]["num_tokens"] == 5
    assert rows[7]["req_new_tokens"] == [3, 2] and rows[7]["req_prefix_lens"] == [2, 0]
    assert rows[8]["phase"] == "decode" and rows[8]["req_new_tokens"] == [1, 1]
    assert rows[8]["req_prefix_lens"] == [5, 2]
    assert run.metadata.extra["sglang_dump"]["phase_source"] == "forward_mode"


def test_the_analyzer_reports_the_imported_counts(tmp_path):
    passes = [routed(n, seed=n) for n in (4, 9)]
    dump = stat_dump(tmp_path / "expert_distribution_recorder_3.pt", passes, slots=4, tp=1)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(CONFIG))
    cli = "import sys; from moecap.collect.cli import main; sys.argv = ['moecap-collect', *sys.argv[1:]]; main()"
    done = subprocess.run(
        [sys.executable, "-c", cli, "import-sglang-dump", str(dump), "--model-config", str(cfg), "--tp-size", "1",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with tables([str(tmp_path / "out")], metrics=False, cache_dir=tmp_path / "cache") as t:
        got = t.sql(
            "SELECT step, layer, expert, tokens FROM expert_tokens ORDER BY step, layer, expert"
        ).fetchall()
    want = [
        (step, layer, expert, int(passes[step][layer, expert]))
        for step in range(2)
        for layer in MOE_LAYERS
        for expert in range(E)
        if int(passes[step][layer, expert]) > 0
    ]
    assert [row for row in got if row[3] > 0] == want


def test_a_bundled_model_name_is_a_model_config():
    cfg = load_model_config("Qwen/Qwen1.5-MoE-A2.7B")
    assert cfg["num_experts"] == 60
    with pytest.raises(CollectError, match=r"neither a config\.json path nor a bundled model"):
        load_model_config("no/such-model")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text", r"x\.pt: not a torch\.save file"),
        ([1, 2], r"x\.pt: expected a dict \(SGLang's dump\), got list"),
        ({"foo": 1}, r"x\.pt: not an SGLang expert-distribution dump: no logical_count"),
        ({"logical_count": torch.zeros(2, 3, dtype=torch.int32)}, r"x\.pt: logical_count has shape \[2, 3\]"),
        ({"logical_count": torch.zeros(1, 2, 3)}, r"x\.pt: logical_count has shape .*float32"),
        ({"records": []}, r"x\.pt: a per_pass / per_token dump without last_physical_to_logical_map"),
        (
            {
                "records": [{"forward_pass_id": 1}],
                "last_physical_to_logical_map": torch.zeros(L, 10, dtype=torch.long),
            },
            r"x\.pt: records\[0\] has no global_physical_count",
        ),
        (
            {
                "records": [
                    {"forward_pass_id": 1, "global_physical_count": torch.zeros(L, 9, dtype=torch.int32)}
                ],
                "last_physical_to_logical_map": torch.zeros(L, 10, dtype=torch.long),
            },
            r"x\.pt: records\[0\]\.global_physical_count has shape \[4, 9\], last_physical_to_logical_map \[4, 10\]",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    with pytest.raises(CollectError, match=message) as info:
        import_sglang_dumps([path], tmp_path / "out", model_config=CONFIG)
    assert "\n" not in str(info.value)


def test_a_dump_that_does_not_match_the_model_config_is_refused(tmp_path):
    dump = stat_dump(tmp_path / "d.pt", [routed(2, 0)], slots=1, tp=1)
    with pytest.raises(
        CollectError, match=r"d\.pt: the dump has 4 layers, the model config's num_hidden_layers is 24"
    ):
        import_sglang_dumps(
            [dump], tmp_path / "out", model_config=load_model_config("Qwen/Qwen1.5-MoE-A2.7B")
        )
    mixed = per_pass_dump(tmp_path / "p.pt", 0, [(1, routed(1, 0, 10))])
    with pytest.raises(CollectError, match="dumps of different recorder modes"):
        import_sglang_dumps([dump, mixed], tmp_path / "out", model_config=CONFIG)


def test_the_cli_prints_one_line_for_a_bad_dump(tmp_path):
    bad = tmp_path / "expert_distribution_recorder_9.pt"
    bad.write_text("not a dump")
    cli = "import sys; from moecap.collect.cli import main; sys.argv = ['moecap-collect', *sys.argv[1:]]; main()"
    done = subprocess.run(
        [sys.executable, "-c", cli, "import-sglang-dump", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"moecap-collect: error: {bad}: not a torch.save file (SGLang's expert-distribution dumps are)"
    ]
