"""Which runs a fleet analysis has to do: list the trace objects, group them by run, skip the done ones.

Grouping is by the run id in each file's name (`<run_id>.<rank tag>.<table>.arrow`, the collector's
naming; run ids may hold dots, so the name is split from the right). A name that does not follow it
is its own group, so the loader reports it. Incremental runs: a run whose manifest in the dataset
lists exactly the same inputs (URI, size, mtime) is skipped; a run with a new, changed or missing
object is analysed again (its files are rewritten in place).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from moecap.schemas import TABLES

from ..storage import ObjectInfo, is_uri, list_objects
from .task import RunGroup, read_manifest


def run_id_of(name: str) -> str | None:
    """The run id in a trace file name, or None when the name is not `<run_id>.<tag>.<table>.arrow`."""
    if not name.endswith(".arrow"):
        return None
    parts = name[: -len(".arrow")].rsplit(".", 2)
    if len(parts) != 3 or parts[2] not in TABLES or not parts[0]:
        return None
    return parts[0]


def discover(inputs: Iterable[str]) -> list[RunGroup]:
    """Every trace object under `inputs` (URIs, local paths, directories, globs), grouped by run."""
    objects: dict[str, ObjectInfo] = {}
    for raw in inputs:
        spec = raw if is_uri(raw) else os.path.abspath(raw)
        for obj in list_objects(spec):
            objects.setdefault(obj.uri, obj)
    groups: dict[str, list[ObjectInfo]] = {}
    for obj in objects.values():
        groups.setdefault(run_id_of(obj.name) or obj.uri, []).append(obj)
    return [RunGroup(run_id=k, objects=v) for k, v in sorted(groups.items())]


def pending(groups: list[RunGroup], dataset: str, threads: int = 16) -> tuple[list[RunGroup], list[RunGroup]]:
    """(groups to analyse, groups already analysed from the very same inputs)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        manifests = list(pool.map(lambda g: read_manifest(dataset, g.run_id), groups))
    todo: list[RunGroup] = []
    done: list[RunGroup] = []
    for group, manifest in zip(groups, manifests, strict=True):
        same = manifest is not None and manifest.get("inputs") == group.input_keys()
        (done if same else todo).append(group)
    return todo, done
