"""The non-GPU parts of benchmarks/gpu/sglang_validate.py (run once on a GPU: its checks must be right)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sglang_validate", ROOT / "benchmarks/gpu/sglang_validate.py")
assert _spec is not None and _spec.loader is not None
sv = importlib.util.module_from_spec(_spec)
sys.modules["sglang_validate"] = sv
_spec.loader.exec_module(sv)


def _row(step, phase, tokens, prefix=(0,), gpu=(0, 2_000_000), draft=False):
    return {"step": step, "phase": phase, "num_tokens": tokens, "req_prefix_lens": list(prefix), "is_draft": draft,
            "t_start_ns": 0, "t_end_ns": 1_000_000, "gpu_start_ns": gpu[0], "gpu_end_ns": gpu[1]}  # fmt: skip


def test_check_rows_passes_a_consistent_trace_and_flags_padding():
    # 2 layers x 3 experts, top-2. Step 2 counted 4 padded graph rows too: a violation.
    steps = [
        _row(1, "prefill", 3),
        _row(2, "decode", 2, prefix=(3, 9)),
        _row(3, "prefill", 2, prefix=(1024,)),
    ]
    counts = {1: [3, 2, 1, 6, 0, 0], 2: [4, 4, 4, 4, 4, 4], 3: [2, 2, 0, 1, 1, 2]}
    out = sv.check_rows(steps, counts, num_layers=2, num_experts=3, top_k=2)
    assert out["invariant_violations"] == 1 and out["first_violations"] == [[2, "decode", 0, 12, 4]]
    assert out["phases"] == {"prefill": 2, "decode": 1} and out["chunked_prefill_steps"] == 1
    assert out["gpu_span_ms_median"] == 2.0 and out["tokens"] == 7


def test_check_rows_missing_counts_and_draft_passes():
    steps = [_row(1, "decode", 1), _row(2, "decode", 1, draft=True)]
    out = sv.check_rows(steps, {}, num_layers=1, num_experts=2, top_k=1)
    assert out["missing_counts"] == 1 and out["invariant_violations"] == 1, "draft passes carry no counts"


def test_throughput_and_overhead():
    tp = sv.summarize_throughput([{"tokens": 100, "wall_s": 1.0}, {"tokens": 300, "wall_s": 1.0},
                                  {"tokens": 200, "wall_s": 1.0}])  # fmt: skip
    assert tp["median_tokens_per_s"] == 200.0
    stages = {"off": {"median_tokens_per_s": 200.0}, "steps": {"median_tokens_per_s": 198.0},
              "experts": {"median_tokens_per_s": 194.0}}  # fmt: skip
    assert sv.overhead(stages) == {"steps": 1.0, "experts": 3.0}
    assert sv.overhead({"steps": {"median_tokens_per_s": 1.0}}) == {}


def test_arguments(tmp_path):
    args = sv.parse_args(["--out", str(tmp_path), "--stages", "experts,off"])
    assert args.trace_dir == str(tmp_path / "trace") and args.mem_fraction == 0.8
    with pytest.raises(SystemExit, match="unknown stage"):
        sv.parse_args(["--out", str(tmp_path), "--stages", "experts,bogus"])
    with pytest.raises(SystemExit, match="--counts-batches"):
        sv.parse_args(["--out", str(tmp_path), "--counts-batches", "1,x"])


def test_prompts_are_deterministic_token_ids():
    a, b = sv.prompts(3, 200, seed=1), sv.prompts(3, 200, seed=1)
    assert a == b and len(a) == 3 and all(len(p) == 200 for p in a)
    assert all(100 <= t < 151_000 for p in a for t in p)


def test_compact_summary_of_a_failed_stage():
    summary = {"stages": {"experts": {"ok": False, "error": "RuntimeError: boom"}}, "skipped": ["steps"]}
    out = sv.compact(summary)
    assert out["ok"] == {"experts": False} and out["errors"] == {"experts": "RuntimeError: boom"}
    assert out["skipped"] == ["steps"]


def test_the_generated_entry_point_names_the_plugin(tmp_path):
    from moecap.collect.engines.sglang.adapter import write_plugin_dist_info

    dist = write_plugin_dist_info(tmp_path)
    text = (dist / "entry_points.txt").read_text()
    assert "[sglang.srt.plugins]" in text and "moecap = moecap.collect.engines.sglang:register" in text
    import importlib.metadata as md

    found = [ep for d in md.distributions(path=[str(tmp_path)]) for ep in d.entry_points]
    assert [(ep.group, ep.name, ep.value) for ep in found] == [
        ("sglang.srt.plugins", "moecap", "moecap.collect.engines.sglang:register")
    ]


def test_word_level_tokenizer_decodes_every_id_and_loads_with_transformers(tmp_path):
    """The serve stage's tokenizer: what SGLang's server loads (AutoTokenizer) must decode every id the
    random model can emit to non-empty text, and know the model's eos."""
    transformers = pytest.importorskip("transformers")
    folder = sv.word_level_tokenizer(tmp_path / "tok", vocab_size=1000, eos_id=998)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert len(tok) == 1000
    assert tok.eos_token_id == 998 and tok.unk_token_id == 0
    assert tok.decode([5, 6, 999]) == "t5 t6 t999"
    assert tok.encode("t7 t8 zzz", add_special_tokens=False) == [7, 8, 0]  # unknown words: <unk>


def test_client_join_counts_requests_on_both_sides(tmp_path):
    assert "error" in sv.client_join(tmp_path)
    args = sv.parse_args(["--out", str(tmp_path), "--stages", "serve"])
    assert args.serve_port == 30111 and "serve" in sv.STAGES
