"""Grouping trace objects by run, and which runs an incremental re-run skips."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from moecap.analyze.fleet.discover import discover, pending, run_id_of
from moecap.analyze.fleet.task import manifest_uri

TRACES = Path(__file__).resolve().parents[3] / "traces"
RUN = "h100-OLMoE-1B-7B-0924-cb-bs1-syn160x128-n1"


def test_run_id_is_split_from_the_right():
    assert run_id_of("20261204T044925Z-sglang-Qwen1.5-MoE-A2.7B-10a9.client.requests.arrow") == (
        "20261204T044925Z-sglang-Qwen1.5-MoE-A2.7B-10a9"
    )
    assert run_id_of("a.b.c.dp0-pp1-tp2.experts.arrow") == "a.b.c"
    assert run_id_of("run.dp0-pp0-tp0.nosuchtable.arrow") is None
    assert run_id_of("notes.arrow") is None and run_id_of("x.steps.parquet") is None


def test_files_of_a_run_group_together_wherever_they_lie(tmp_path):
    for i, f in enumerate(sorted(TRACES.glob(f"{RUN}.*.arrow"))):
        d = tmp_path / f"host{i % 2}" / ("recovered" if i == 3 else "")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d)
    shutil.copy(TRACES / "README.md", tmp_path / "odd.arrow")
    groups = {g.run_id: g for g in discover([str(tmp_path)])}
    assert sorted(len(g.objects) for g in groups.values()) == [1, 4]
    assert sorted(o.name for o in groups[RUN].objects) == sorted(
        f.name for f in TRACES.glob(f"{RUN}.*.arrow")
    )
    assert groups[str(tmp_path / "odd.arrow")].objects[0].name == "odd.arrow"  # reported by the loader later


def test_a_run_is_skipped_only_when_its_inputs_are_unchanged(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for f in TRACES.glob(f"{RUN}.*.arrow"):
        shutil.copy(f, src)
    dataset = str(tmp_path / "ds")
    (group,) = discover([str(src)])
    manifest = Path(manifest_uri(dataset, RUN))
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"inputs": group.input_keys()}))
    assert pending([group], dataset) == ([], [group])
    steps = src / f"{RUN}.dp0-pp0-tp0.steps.arrow"
    st = steps.stat()
    os.utime(steps, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten
    (changed,) = discover([str(src)])
    assert pending([changed], dataset) == ([changed], [])
