"""Reference mode as a process against the MoE-CAP reference's own process, on the same record file.

`python benchmarks/reference_process.py [N]` writes N synthetic MoE-CAP records (chunked prefill,
`reference_loop.synthetic_records`) as a batch_data.json, then times, each as a fresh process, side by
side and alternating (best of `--repeat`):

* reference: `python benchmarks/reference_loop.py --records FILE`-equivalent: json.load + the
  per-record Python loop with the reference's call structure (what MoE-CAP's own script does);
* moecap: `moecap-analyze FILE --formula reference --model-config ... --gpu ... --format json`;
* decode floor: a process that only imports numpy and `json.load`s the file: what reference mode on
  this file costs before any moecap code runs (the lean path, `moecap.analyze.lean`, loads numpy and
  decodes with the standard library's json; no typer, rich, pydantic or polars).

Both print the same decoding S-MBU (checked). Prints one JSON line. `--before DIR`: also time, in the
same rounds, another version of moecap (DIR holds its `moecap` folder, e.g. a `git worktree` of main
linked as DIR/moecap), run as `python -c "from moecap.analyze.cli import main; main()" ARGS`; the
load average at start and end is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = {
    "_name_or_path": "Qwen/Qwen3-30B-A3B",
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
}  # fmt: skip
GPU, NUM_GPUS = "NVIDIA-H200-141GB", 8

_LOOP = """
import json, sys
sys.path.insert(0, {here!r})
from reference_loop import reference_loop_metrics
records = json.load(open({path!r}))
config = json.load(open({config!r}))
r = reference_loop_metrics(records, model_config=config, model_name=config["_name_or_path"], gpu={gpu!r}, num_gpus={n})
print(json.dumps({{"decoding_smbu": r["decoding_smbu"]}}))
"""


CPU: dict[str, list[float]] = {}  # user + sys seconds of each process, by side


def _time(cmd: list[str], env: dict[str, str] | None = None, side: str = "") -> tuple[float, str]:
    """Wall seconds and stdout of one process; its CPU seconds (user + sys) go to CPU[side]: on a shared
    machine the CPU time moves less with the load than the wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    CPU.setdefault(side, []).append(cpu)
    return wall, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=int, nargs="?", default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", help="a folder holding another version's `moecap` package")
    args = ap.parse_args()
    load_start = os.getloadavg()
    sys.path.insert(0, str(HERE))
    from reference_loop import synthetic_records

    with tempfile.TemporaryDirectory() as tmp:
        path, config = Path(tmp) / "batch_data.json", Path(tmp) / "config.json"
        path.write_text(json.dumps(synthetic_records(args.records)))
        config.write_text(json.dumps(CONFIG))
        loop_cmd = [
            sys.executable,
            "-c",
            _LOOP.format(here=str(HERE), path=str(path), config=str(config), gpu=GPU, n=NUM_GPUS),
        ]
        ours_cmd = [
            str(Path(sys.executable).with_name("moecap-analyze")),
            str(path),
            "--formula", "reference", "--model-config", str(config), "--gpu", GPU,
            "--num-gpus", str(NUM_GPUS), "--format", "json",
        ]  # fmt: skip
        floor_cmd = [sys.executable, "-c", f"import json, numpy; json.load(open({str(path)!r}))"]
        before_cmd = [sys.executable, "-c", "from moecap.analyze.cli import main; main()", *ours_cmd[1:]]
        before_env = {**os.environ, "PYTHONPATH": args.before} if args.before else None
        loop_s, ours_s, before_s = [], [], []
        for _ in range(args.repeat):  # alternating, so both see the same machine load
            t, out_loop = _time(loop_cmd, side="reference")
            loop_s.append(t)
            t, out_ours = _time(ours_cmd, side="moecap")
            ours_s.append(t)
            _time(floor_cmd, side="decode floor")
            if before_env is not None:
                t, out_before = _time(before_cmd, before_env, side="before")
                before_s.append(t)
        ref = json.loads(out_loop)["decoding_smbu"]
        ours = json.loads(out_ours)["runs"][0]["batch_metrics"]["decoding_smbu"]
        print(
            json.dumps(
                {
                    "records": args.records,
                    "reference_process_s": round(min(loop_s), 3),
                    "moecap_reference_process_s": round(min(ours_s), 3),
                    "x_faster": round(min(loop_s) / min(ours_s), 2),
                    "all_reference_s": [round(x, 3) for x in loop_s],
                    "all_moecap_s": [round(x, 3) for x in ours_s],
                    "same_decoding_smbu": abs(ref - ours) <= 1e-9 * abs(ref),
                    **(
                        {
                            "before_s": round(min(before_s), 3),
                            "before_x_faster": round(min(loop_s) / min(before_s), 2),
                            "all_before_s": [round(x, 3) for x in before_s],
                            "same_as_before": out_before == out_ours,
                        }
                        if before_s
                        else {}
                    ),
                    "cpu_s_median": {k: round(statistics.median(v), 3) for k, v in CPU.items()},
                    "cpu_x_faster_median": round(
                        statistics.median(CPU["reference"]) / statistics.median(CPU["moecap"]), 2
                    ),
                    "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
                }
            )
        )


if __name__ == "__main__":
    main()
