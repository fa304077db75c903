"""On one GPU: what SGLang's own expert-distribution recorder (`--expert-distribution-recorder-mode stat`,
recording started) costs WITHOUT moecap's plugin — the gatherer that the `experts` stage reads. Compare its
`engine_own_median` with fidelity-sglang-off-N.json (no recorder) and fidelity-sglang-experts-N.json (recorder
+ our plugin) from the same machine: off → recorder is SGLang's cost, recorder → experts is ours.

    source benchmarks/gpu/env.sh && python benchmarks/gpu/sglang_recorder_cost.py $OUT 1,64
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import engine_fidelity as ef

from moecap.collect.engines.sglang.runner import SglangSession

_options = ef.offline_options


def _with_recorder(engine, mode, batch, out):  # type: ignore[no-untyped-def]
    opts = _options(engine, mode, batch, out)
    opts.engine_args["expert_distribution_recorder_mode"] = "stat"
    return opts


_start = SglangSession.start


def _start_recording(self):  # type: ignore[no-untyped-def]
    _start(self)
    self.engine.start_expert_distribution_record()


def main() -> None:
    ef.offline_options = _with_recorder
    SglangSession.start = _start_recording
    out = Path(sys.argv[1])
    for batch in (int(b) for b in sys.argv[2].split(",")):
        res = ef.sglang_offline("off", batch, 5, out)
        res.update(stage=f"recorder-{batch}", engine="sglang", ok=True, gpu=ef._gpu_name())
        (out / f"fidelity-sglang-recorder-{batch}.json").write_text(json.dumps(res, indent=1))
        ef.log(f"recorder-{batch}: own {res['engine_own_median']} run {res['run_median']}")


if __name__ == "__main__":
    main()
