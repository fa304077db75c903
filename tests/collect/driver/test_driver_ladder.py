"""drive's residue ladder: before its shaped warm-up, one group of fresh one-token token-id prompts at a time,
each group `count` tokens in all, for every count s + r (r = 0…15) of the ladder sizes up to the server's
prefill tokens per step (`workload.residue_ladder`; why: docs/sweep.md). Checked on what the loopback server
received and when; the step budget comes from what the server tells (SGLang /server_info, vLLM's dev-mode
/server_info) or from --warmup-ladder N."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys

import pytest
from loopback import SCRIPTED, start_server

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive
from moecap.collect.errors import CollectError
from moecap.collect.workload import WARMUP_PREFIX

CLI = [sys.executable, "-c", "from moecap.collect.cli import main; main()"]
SGLANG_INFO = {
    "version": "0.5.16",
    "chunked_prefill_size": 96,
    "max_prefill_tokens": 16384,
    "max_running_requests": 8,
    "max_req_input_len": 41,  # prompts of up to 40 tokens
}


def _ladder(server, prefix: str) -> dict[int, dict]:
    """Per ladder count, the server's view of its one request: body, prompts (lists of ids), SGLang rid(s),
    arrival and answer (ns)."""
    groups: dict[int, dict] = {}
    for seen in server.get("/_seen"):
        m = re.fullmatch(rf"{WARMUP_PREFIX}{prefix}-ladder-(\d+)", seen["id"])
        if m:
            assert int(m.group(1)) not in groups  # one request per count
            t = server.get(f"/_timings?id={seen['id']}")
            prompt = seen["body"]["prompt"]
            groups[int(m.group(1))] = {
                "body": seen["body"], "rid": seen["rid"], "target": seen["target"],
                "prompts": prompt if isinstance(prompt[0], list) else [prompt],
                "arrived": t["arrived_ns"], "done": t["chunks"][-1]["t_ns"],
            }  # fmt: skip
    return groups


def _samples(n: int = 3) -> list[Sample]:
    return [Sample(f"s{i}", "random", prompt_token_ids=[500 + i] * 12) for i in range(n)]


def test_sglang_server_gets_one_group_per_count_one_after_another():
    with start_server(SCRIPTED, "--as-sglang", "--server-info", json.dumps(SGLANG_INFO)) as srv:
        cfg = ClientConfig(api_url=srv.url + "/v1/chat/completions", model="m", max_tokens=3,
                           request_id_prefix="lad")  # fmt: skip
        chat = [Sample(f"c{i}", "scripted", prompt=f"stream tokens=2 w{i} x y") for i in range(3)]
        res = asyncio.run(drive(chat, cfg, LoadConfig(concurrency=3, warmup=1, warmup_ladder="auto")))
        groups = _ladder(srv, "lad")
    assert all(r.ok for r in res.records) and len(res.records) == 3
    # Budget min(96, 16384); text prompts (no token count here) of up to 40 tokens, 3 in flight: reach
    # min(96, 3 × 40); sizes 16, 32, 48, 64, 80 (the last with room for +15), so every count 16…95 once.
    assert sorted(groups) == list(range(16, 96))
    assert res.ladder.steps == 80 and res.ladder.reach == 96 and res.ladder.note is None
    assert res.ladder.bound == "server"
    for count, g in groups.items():
        lengths = sorted(map(len, g["prompts"]))
        assert sum(lengths) == count
        assert len(lengths) == -(-count // 40) and lengths[-1] - lengths[0] <= 1  # as few prompts as fit 40
        assert (len(lengths) > 1) == isinstance(g["body"]["prompt"][0], list)  # several: the batch form
        assert g["target"] == "/v1/completions"  # token ids: completions, whatever the run's API
        assert g["body"]["max_tokens"] == 1 and g["body"]["stream"] is False
        assert all(isinstance(t, int) for p in g["prompts"] for t in p)
        rids = g["rid"] if isinstance(g["rid"], list) else [g["rid"]]
        assert len(rids) == len(lengths)  # SGLang: one id per prompt of the batch
        assert all(r.startswith(WARMUP_PREFIX) for r in rids)  # SGLang's tracer leaves these passes out
    order = sorted(groups)
    for before, after in itertools.pairwise(order):
        # the next group goes out only after the one before has been answered
        assert groups[after]["arrived"] >= groups[before]["done"]
    ids = [t for g in groups.values() for p in g["prompts"] for t in p]
    assert max(ids) < 1000  # text samples show no vocabulary: ids below any served LLM's vocabulary size
    firsts = [tuple(p[:4]) for g in groups.values() for p in g["prompts"]]
    assert len(set(firsts)) == len(firsts)  # no prompt is a prefix-cache hit for another


def test_vllm_server_without_dev_mode_gets_no_ladder_and_a_note(tmp_path):
    with start_server(SCRIPTED, "--as-vllm") as srv:
        p = subprocess.run(
            [*CLI, "drive", "--api-url", srv.url, "--dataset", "synthetic:12x2", "--num-prompts", "2",
             "--out", str(tmp_path), "--run-id", "nodev", "--max-tokens", "2"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        seen = srv.get("/_seen")
    assert p.returncode == 0, p.stderr
    assert not [s for s in seen if "-ladder-" in s["id"]]
    notes = [line for line in p.stderr.splitlines() if "residue ladder" in line]
    assert len(notes) == 1 and "--warmup-ladder" in notes[0] and "VLLM_SERVER_DEV_MODE" in notes[0]


def test_vllm_dev_mode_server_info_gives_the_budget_and_the_prompt_length():
    info = {"vllm_config": {"scheduler_config": {"max_num_batched_tokens": 40, "max_num_seqs": 4},
                            "model_config": {"max_model_len": 21}}}  # fmt: skip
    with start_server(SCRIPTED, "--as-vllm", "--server-info", json.dumps(info)) as srv:
        cfg = ClientConfig(api_url=srv.url, model="m", max_tokens=2, request_id_prefix="dev")
        text = [Sample(f"t{i}", "scripted", prompt=f"stream tokens=2 t{i}") for i in range(4)]
        res = asyncio.run(drive(text, cfg, LoadConfig(concurrency=4, warmup=1, warmup_ladder="auto")))
        groups = _ladder(srv, "dev")
    # budget 40, text prompts of up to 20 tokens, 4 at once: reach 40; sizes 16 (32 would not leave +15)
    assert sorted(groups) == list(range(16, 32)) and res.ladder.reach == 40
    assert max(len(p) for g in groups.values() for p in g["prompts"]) == 20  # max_model_len − 1
    assert sorted(map(len, groups[31]["prompts"])) == [15, 16]
    assert all(r.ok for r in res.records)


def test_a_given_budget_serves_a_server_that_tells_none_and_a_refusal_stops_the_climb(tmp_path):
    # Four 12-token prompts at once form steps of up to 48 tokens (ladder sizes 16, 32). 33 ids at most:
    # the climb reaches 33, and the 34-token group is refused (the server's context error); the ladder
    # stops there and the measured requests still run.
    with start_server(SCRIPTED, "--max-prompt-ids", "33") as srv:
        p = subprocess.run(
            [*CLI, "drive", "--api-url", srv.url, "--dataset", "synthetic:12x2", "--num-prompts", "4",
             "--batch-size", "4", "--out", str(tmp_path), "--run-id", "given", "--max-tokens", "2",
             "--warmup-ladder", "64"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        seen = srv.get("/_seen")
    assert p.returncode == 0, p.stderr
    counts = sorted(int(m.group(1)) for s in seen if (m := re.search(r"-ladder-(\d+)$", s["id"])))
    assert counts == list(range(16, 35))  # 16…33 answered, 34 refused, nothing after it
    note = [line for line in p.stderr.splitlines() if "residue ladder stopped" in line]
    assert len(note) == 1 and "34-token step" in note[0] and "maximum context length" in note[0]
    measured = [s for s in seen if not s["id"].startswith(WARMUP_PREFIX)]
    assert len(measured) == 4


_IDS = [Sample(f"i{i}", "random", prompt_token_ids=[300 + i] * 20) for i in range(3)]
_TEXT = [Sample(f"t{i}", "scripted", prompt=f"stream tokens=2 t{i}") for i in range(3)]
_CASES = [
    # 20-token id prompts, 2 in flight: steps of up to 40 tokens, not the server's 96
    (LoadConfig(concurrency=2, warmup=1, warmup_ladder="auto"), _IDS, 40, "workload"),
    # one at a time: 20 tokens, below the ladder's first size with its +15 (31): no climb at all
    (LoadConfig(concurrency=1, warmup=1, warmup_ladder="auto"), _IDS, 20, "workload"),
    # open loop, all at once, 3 samples: 60; at most 2 at a time: 40
    (LoadConfig(request_rate=float("inf"), warmup=1, warmup_ladder="auto"), _IDS, 60, "workload"),
    (
        LoadConfig(request_rate=float("inf"), max_concurrency=2, warmup=1, warmup_ladder="auto"),
        _IDS,
        40,
        "workload",
    ),
    # more in flight than samples: 3 at most
    (LoadConfig(concurrency=8, warmup=1, warmup_ladder="auto"), _IDS, 60, "workload"),
    # text prompts: no token count here, so the server's longest prompt (40); 2 in flight: 80
    (LoadConfig(concurrency=2, warmup=1, warmup_ladder="auto"), _TEXT, 80, "workload"),
    # ... 3 in flight: 120, the server's budget (96) binds
    (LoadConfig(concurrency=3, warmup=1, warmup_ladder="auto"), _TEXT, 96, "server"),
]


@pytest.mark.parametrize(("load", "samples", "reach", "bound"), _CASES)
def test_the_climb_stops_at_the_largest_step_the_workload_can_form(load, samples, reach, bound):
    # as run's warm-up: a batch-1 run of short prompts pays no climb to the server's budget
    with start_server(SCRIPTED, "--as-sglang", "--server-info", json.dumps(SGLANG_INFO)) as srv:
        cfg = ClientConfig(
            api_url=srv.url + "/v1/completions", model="m", max_tokens=2, request_id_prefix="wl"
        )
        res = asyncio.run(drive(samples, cfg, load))
        groups = _ladder(srv, "wl")
    assert all(r.ok for r in res.records) and len(res.records) == 3
    assert (res.ladder.reach, res.ladder.bound) == (reach, bound)
    top = (reach - 15) // 16 * 16  # the last ladder size (`ladder_sizes`)
    assert sorted(groups) == (list(range(16, top + 16)) if top >= 16 else [])
    assert res.ladder.steps == len(groups)


@pytest.mark.parametrize("flags", [["--warmup-ladder", "off"], ["--warmup", "0", "--warmup-ladder", "64"]])
def test_off_or_no_warmup_sends_no_ladder(tmp_path, flags):
    with start_server(SCRIPTED, "--as-sglang", "--server-info", json.dumps(SGLANG_INFO)) as srv:
        p = subprocess.run(
            [*CLI, "drive", "--api-url", srv.url, "--dataset", "synthetic:12x2", "--num-prompts", "2",
             "--out", str(tmp_path), "--run-id", "off", "--max-tokens", "2", *flags],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        seen = srv.get("/_seen")
    assert p.returncode == 0, p.stderr
    assert not [s for s in seen if "-ladder-" in s["id"]] and "residue ladder" not in p.stderr


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5"])
def test_a_bad_ladder_value_is_one_line(value):
    with pytest.raises(CollectError, match=r"--warmup-ladder .*expected auto, off or a number of tokens > 0"):
        LoadConfig(warmup=1, warmup_ladder=value)
