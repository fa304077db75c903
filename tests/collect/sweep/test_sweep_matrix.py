"""The sweep matrix: command-line values and YAML files become points with stable identities."""

from __future__ import annotations

import pytest

from moecap.collect.errors import CollectError
from moecap.collect.sweep import build_spec, expand, group_by_config, load_spec

BASE = {
    "engines": ["hf"],
    "models": ["m.json"],
    "tasks": ["synthetic:32x8", "synthetic:64x8"],
    "batch_sizes": "1,4",
    "waves": 2,
}


def test_two_tasks_by_two_batch_sizes_is_four_points_on_one_engine():
    points = expand(build_spec(BASE))
    assert [(p.task, p.batch_size, p.num_prompts) for p in points] == [
        ("synthetic:32x8", 1, 2),
        ("synthetic:32x8", 4, 8),
        ("synthetic:64x8", 1, 2),
        ("synthetic:64x8", 4, 8),
    ]
    assert len(group_by_config(points)) == 1  # one engine start for all four
    assert len({p.key for p in points}) == 4


def test_point_keys_are_stable_and_change_with_what_defines_the_point():
    first = {p.key for p in expand(build_spec(BASE))}
    again = {p.key for p in expand(build_spec(dict(BASE)))}
    assert first == again
    other_seed = {p.key for p in expand(build_spec({**BASE, "seed": 1}))}
    assert not first & other_seed
    one_more_bs = {p.key for p in expand(build_spec({**BASE, "batch_sizes": [1, 4, 8]}))}
    assert first < one_more_bs  # adding a batch size keeps the recorded points' identities


def test_batch_size_placeholder_in_engine_args_gives_one_engine_per_batch_size():
    spec = build_spec(
        {
            **BASE,
            "engines": ["vllm"],
            "tasks": ["synthetic:32x8"],
            "engine_args": "--max-num-seqs {batch_size}",
        }
    )
    groups = group_by_config(expand(spec))
    assert [(c.engine_args, [p.batch_size for p in ps]) for c, ps in groups] == [
        ("--max-num-seqs 1", [1]),
        ("--max-num-seqs 4", [4]),
    ]


def test_repeats_and_fixed_prompt_count():
    points = expand(
        build_spec({**BASE, "waves": None, "num_prompts": 5, "repeats": 2, "tasks": ["synthetic:8x2"]})
    )
    assert [(p.batch_size, p.repeat, p.num_prompts) for p in points] == [
        (1, 0, 5),
        (1, 1, 5),
        (4, 0, 5),
        (4, 1, 5),
    ]
    assert points[0].slug == "m-synthetic-8x2-c1-r0"


def test_yaml_file_with_command_line_overrides(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "engine: hf\nmodel: m.json\nrandom_weights: true\n"
        "tasks: [synthetic:32x8, gsm8k:4000x1000, longbench_v2:13000x1000]\n"
        "concurrencies: [1, 32, 64, 128]\nnum_prompts: 100\n"
    )
    spec = load_spec(path)
    assert (spec.engines, spec.random_weights, spec.batch_sizes, spec.num_prompts) == (
        ["hf"], True, [1, 32, 64, 128], 100,
    )  # fmt: skip
    assert len(expand(spec)) == 12
    # --waves on the command line replaces the file's num_prompts (they are exclusive)
    spec = load_spec(path, {"waves": 2, "batch_sizes": "1,2"})
    assert (spec.waves, spec.num_prompts, spec.batch_sizes) == (2, None, [1, 2])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "engine: hf\nmodel: m\ntasks: [synthetic:8x2]\nbatch_sizes: [1, x]\nwaves: 1\n",
            "batch_sizes: expected an integer",
        ),
        (
            "engine: hf\nmodel: m\ntasks: [synthetic:8x2]\nbatch_sizes: [0]\nwaves: 1\n",
            "batch_sizes: expected an integer >= 1",
        ),
        (
            "engine: hf\nmodel: m\ntasks: [synthetic:8x]\nbatch_sizes: [1]\nwaves: 1\n",
            "tasks: dataset 'synthetic:8x'",
        ),
        (
            "engine: hf\nmodel: m\ntasks: [nosuchset]\nbatch_sizes: [1]\nwaves: 1\n",
            "tasks: unknown dataset 'nosuchset'",
        ),
        (
            "engine: tgi\nmodel: m\ntasks: [synthetic:8x2]\nbatch_sizes: [1]\nwaves: 1\n",
            "engines: 'tgi' is not one of hf, vllm, sglang",
        ),
        ("engine: hf\nmodel: m\ntasks: [synthetic:8x2]\nbatch_sizes: [1]\n", "exactly one of num_prompts"),
        (
            "engine: hf\nmodel: m\ntasks: [synthetic:8x2]\nbatch_sizes: [1]\nwaves: 1\nbatchsize: 3\n",
            "unknown setting 'batchsize'",
        ),
        (
            "engine: hf\nmodel: m\ntasks: [synthetic:8x2]\nbatch_sizes: [1]\nwaves: 1\nrequest_rates: [1]\n",
            "request_rates: request rates need",
        ),
        (
            "engine: vllm\nmodel: m\ntasks: [synthetic:8x2]\nbatch_sizes: [1]\nwaves: 1\nengine_args: '--x {bs}'\n",
            "only {batch_size}",
        ),
        (
            "engine: sglang\nmodel: m\ntasks: [synthetic:8x2]\nbatch_sizes: [1]\nwaves: 1\n"
            "engine_args: '--mem-fraction-static 0.8 --max-running-requests 128'\n",
            "SGLang's --max-running-requests is each point's batch size",
        ),
        (
            "engine: [vllm, sglang]\nmodel: m\ntasks: [synthetic:8x2]\nbatch_sizes: [1]\nwaves: 1\n"
            "engine_args: '--max-running-requests=64'\n",
            "SGLang's --max-running-requests is each point's batch size",
        ),
        ("engine: hf\nmodel: m\ntasks: [synthetic:8x2\n", "not valid YAML (line"),
        ("- just\n- a list\n", "expected a mapping"),
        ("model: m\ntasks: [synthetic:8x2]\nbatch_sizes: [1]\nwaves: 1\n", "engines: at least one value"),
    ],
)
def test_bad_yaml_gives_one_line_naming_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CollectError) as err:
        load_spec(path)
    line = str(err.value)
    assert "\n" not in line and line.startswith(str(path)) and message in line, line


def test_command_line_errors_name_the_command_line():
    with pytest.raises(CollectError, match=r"^the command line: tasks: at least one value"):
        load_spec(None, {"engines": ["hf"], "models": ["m"], "batch_sizes": "1", "waves": 1})


def test_engine_args_apply_to_vllm_and_sglang_only():
    with pytest.raises(CollectError, match="engine_args are vLLM's or SGLang's flags"):
        build_spec({**BASE, "engine_args": "--max-num-seqs 4"})
    both = expand(build_spec({**BASE, "engines": ["hf", "vllm"], "engine_args": ["--a 1", "--a 2"]}))
    configs = [(c.engine, c.engine_args) for c, _ in group_by_config(both)]
    assert configs == [("hf", ""), ("vllm", "--a 1"), ("vllm", "--a 2")]


def test_sglang_points_are_one_config_per_engine_args_and_may_name_the_batch_size():
    spec = build_spec(
        {**BASE, "engines": ["sglang"], "tasks": ["synthetic:32x8"], "batch_sizes": [1, 4],
         "engine_args": ["--mem-fraction-static 0.8 --max-running-requests {batch_size}"]}
    )  # fmt: skip
    points = expand(spec)
    assert [(p.batch_size, p.config.engine_args) for p in points] == [
        (1, "--mem-fraction-static 0.8 --max-running-requests 1"),
        (4, "--mem-fraction-static 0.8 --max-running-requests 4"),
    ]
    assert all(p.config.engine == "sglang" for p in points)
