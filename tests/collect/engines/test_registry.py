"""The one engine registry `run` and `serve` are built from (collect/engines/base.py): every entry is
an `Engine`, its `run` flags are real `run` options, the command refuses the options an engine does not
take, and the start-up delays a session reports are what its records say."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from moecap.collect.datasets import Sample
from moecap.collect.engines.base import COMMON_RUN_FLAGS, ENGINES, RunArgs, get_engine, start_delays
from moecap.collect.errors import CollectError
from moecap.collect.run_command import refuse_inapplicable
from moecap.collect.workload import RequestRecord

RUN_OPTIONS = {f.name for f in fields(RunArgs)}


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_entry_is_an_engine_whose_flags_are_run_options(name):
    engine = get_engine(name)
    assert engine.name == name and engine.label
    assert COMMON_RUN_FLAGS <= engine.run_flags <= RUN_OPTIONS
    for method in ("preflight", "engine_args", "run_options", "run", "session", "serve", "trace_errors"):
        assert callable(getattr(engine, method))
    assert engine.serves == (name != "hf") and bool(engine.serve_example) == engine.serves


def test_an_unknown_engine_and_what_hf_lacks_are_one_line_errors():
    with pytest.raises(CollectError, match=r"unknown engine 'nope'; expected one of hf, vllm, sglang"):
        get_engine("nope")
    hf = get_engine("hf")
    with pytest.raises(CollectError, match="serve supports --engine vllm and sglang"):
        hf.serve("m", [], out="x", run_id=None, counts=True, strict_engine=False, random_weights=False)
    with pytest.raises(CollectError, match="no engine session"):
        hf.session(None)


def _args(**kw):
    return RunArgs(model="m", dataset="d", num_prompts=1, batch_size=1, out=Path("x"), **kw)


def test_options_an_engine_does_not_take_are_named_defaults_pass():
    refuse_inapplicable(_args(), "sglang", get_engine("sglang").run_flags)  # defaults everywhere: fine
    refuse_inapplicable(_args(block_size=16, mode="cb"), "vllm", get_engine("vllm").run_flags)
    with pytest.raises(CollectError, match=r"^--block-size does not apply to --engine sglang$"):
        refuse_inapplicable(_args(block_size=16), "sglang", get_engine("sglang").run_flags)
    with pytest.raises(CollectError, match=r"^--trace, --engine-args do not apply to --engine hf$"):
        refuse_inapplicable(_args(trace=False, engine_args="--x"), "hf", get_engine("hf").run_flags)


def test_start_delays_are_read_off_the_records():
    # Hand-over at 100, 100.5 and 101 ms; first tokens at 130 and 160 ms (one request never got one).
    s = Sample(sample_id="0", dataset="d", prompt_token_ids=[1])
    recs = [
        RequestRecord("a", s, 100_000_000),
        RequestRecord("b", s, 100_500_000),
        RequestRecord("c", s, 101_000_000),
    ]
    recs[0].first_token_ns, recs[1].first_token_ns = 160_000_000, 130_000_000
    assert start_delays(recs) == {"submit_s": 0.001, "first_token_s": 0.03}
