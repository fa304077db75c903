"""The sweep matrix: what to run, from the command line or a small YAML file, expanded into points.

    spec = load_spec("sweep.yaml", overrides={"batch_sizes": [1, 32]})
    points = expand(spec)            # engine configs × tasks × batch sizes × repeats

A matrix is engines × models × engine-args × tasks × batch sizes (concurrencies) × repeats. Each
`Point` is one recorded run; its `key` is its identity (stable across re-runs of the same matrix, so a
re-run skips what is already recorded), and `EngineConfig` is the part that decides whether the engine
can be reused: points with equal configs share one started engine. `{batch_size}` in the engine args
is replaced per point, so `--max-num-seqs {batch_size}` makes one engine per batch size, as MoE-CAP's
guide restarts its server per batch size. SGLang starts one engine per point whatever the config
(`sglang_session.py`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import CollectError

ENGINES = ("hf", "vllm", "sglang")
"""Engines a sweep drives (SGLang: one engine per point, see docs/sweep.md)."""

_SGLANG_LIMIT = re.compile(r"--max-running-requests(?:=|\s+)(\S+)")

_PADDED = re.compile(r"^(?P<name>[A-Za-z0-9_-]+):(?P<n_in>\d+)x(?P<n_out>\d+)$")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that needs its own engine start: points with equal configs share one engine."""

    engine: str
    model: str
    engine_args: str = ""
    """Engine flags as one string (vLLM's or SGLang's CLI flags), `{batch_size}` already replaced."""
    random_weights: bool = False
    dtype: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    counts: bool = True
    cuda_graphs: str = "auto"
    attn_implementation: str | None = None
    seed: int = 0
    """Seed of the random weights (and of the workload sample)."""

    def label(self) -> str:
        args = f" [{self.engine_args}]" if self.engine_args else ""
        return f"{self.engine} {self.model}{args}"


@dataclass(frozen=True)
class Point:
    """One run of the matrix."""

    config: EngineConfig
    task: str
    """A dataset spec `load_samples` accepts: synthetic:<in>x<out>, gsm8k, gsm8k:4000x1000, …"""
    batch_size: int
    """Requests in flight (closed loop), MoE-CAP's batch size."""
    num_prompts: int
    repeat: int = 0
    max_new_tokens: int | None = None
    ignore_eos: bool = True
    dataset_path: str | None = None
    max_batch_tokens: int | None = None

    def identity(self) -> dict[str, Any]:
        """What makes this point this point (the basis of `key`)."""
        out = asdict(self)
        out["config"] = asdict(self.config)
        return out

    @property
    def key(self) -> str:
        """A short stable id: 12 hex digits of the SHA-1 of the point's identity."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    @property
    def slug(self) -> str:
        """A readable name: model-task-c<batch size>-r<repeat>, safe in file names."""
        model = Path(self.config.model.rstrip("/")).name
        if model == "config.json":
            model = Path(self.config.model).parent.name
        model = model.removesuffix(".json").replace("__", "-")
        return _safe(f"{model}-{self.task}-c{self.batch_size}-r{self.repeat}")

    def sweep_metadata(self, sweep_name: str) -> dict[str, Any]:
        """The `workload.sweep` entry of the run's metadata (the analyzer's matrix table reads it)."""
        return {
            "name": sweep_name,
            "point": self.key,
            "task": self.task,
            "batch_size": self.batch_size,
            "repeat": self.repeat,
            "engine_args": self.config.engine_args,
        }


@dataclass
class SweepSpec:
    """The matrix as given (before expansion); field names are the YAML keys."""

    engines: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    engine_args: list[str] = field(default_factory=lambda: [""])
    tasks: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    num_prompts: int | None = None
    waves: int | None = None
    """num_prompts = waves × batch size (instead of a fixed num_prompts)."""
    repeats: int = 1
    max_new_tokens: int | None = None
    ignore_eos: bool = True
    random_weights: bool = False
    dtype: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    counts: bool = True
    cuda_graphs: str = "auto"
    attn_implementation: str | None = None
    seed: int = 0
    dataset_path: str | None = None
    max_batch_tokens: int | None = None
    name: str = "sweep"


_ALIASES = {
    "engine": "engines",
    "model": "models",
    "task": "tasks",
    "concurrencies": "batch_sizes",
    "concurrency": "batch_sizes",
    "batch_size": "batch_sizes",
    "max_tokens": "max_new_tokens",  # the name `run` and `drive` use
}
_LISTS = {"engines", "models", "engine_args", "tasks", "batch_sizes"}
_INTS = {"num_prompts", "waves", "repeats", "max_new_tokens", "seed", "max_batch_tokens"}
_BOOLS = {"ignore_eos", "random_weights", "counts"}
_STRINGS = {"dtype", "device", "tokenizer", "cuda_graphs", "attn_implementation", "dataset_path", "name"}
_KEYS = {f.name for f in fields(SweepSpec)}
_UNSUPPORTED = {
    "request_rates": "request rates need a served engine and an open-loop driver; a sweep runs closed loops "
    "at fixed batch sizes (concurrencies) for now",
    "request_rate": "request rates need a served engine and an open-loop driver; a sweep runs closed loops "
    "at fixed batch sizes (concurrencies) for now",
}


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text)[:80]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a sweep YAML file (a `CollectError` naming the file otherwise)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CollectError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise CollectError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CollectError(f"{path}: expected a mapping of sweep settings (engine:, model:, tasks:, …)")
    return data


def build_spec(values: Mapping[str, Any], source: str = "sweep") -> SweepSpec:
    """A validated `SweepSpec` from a mapping (YAML keys or command-line values); `source` names where
    the values came from in errors ("sweep.yaml", "the command line")."""
    spec = SweepSpec()
    for raw_key, value in values.items():
        key = _ALIASES.get(str(raw_key), str(raw_key))
        if key in _UNSUPPORTED:
            raise CollectError(f"{source}: {raw_key}: {_UNSUPPORTED[key]}")
        if key not in _KEYS:
            raise CollectError(
                f"{source}: unknown setting {raw_key!r}; expected one of {', '.join(sorted(_KEYS))}"
            )
        if value is None:
            continue
        setattr(spec, key, _coerce(key, value, f"{source}: {raw_key}"))
    _check(spec, source)
    return spec


def _coerce(key: str, value: Any, where: str) -> Any:
    if key in _LISTS:
        items = value if isinstance(value, list) else _split(value)
        if key == "batch_sizes":
            return [_positive_int(v, where) for v in items]
        if key == "engine_args":
            return ["" if v is None else str(v) for v in items] if isinstance(value, list) else [str(value)]
        return [str(v) for v in items]
    if key in _INTS:
        if key == "seed":
            return _int(value, where)
        return _positive_int(value, where)
    if key in _BOOLS:
        if isinstance(value, bool):
            return value
        raise CollectError(f"{where}: expected true or false, got {value!r}")
    if key in _STRINGS:
        if isinstance(value, (dict, list)):
            raise CollectError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    return value


def _split(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise CollectError(f"{where}: expected an integer, got {value!r}")
    try:
        return int(str(value).strip())
    except ValueError:
        raise CollectError(f"{where}: expected an integer, got {value!r}") from None


def _positive_int(value: Any, where: str) -> int:
    n = _int(value, where)
    if n < 1:
        raise CollectError(f"{where}: expected an integer >= 1, got {value!r}")
    return n


def check_task(task: str, where: str) -> None:
    """A task is synthetic:<in>x<out>, a dataset name, or <dataset>:<in>x<out> (one-line error otherwise)."""
    from ..datasets import parse_synthetic, resolve_dataset

    try:
        if task.startswith("synthetic:"):
            parse_synthetic(task)
            return
        m = _PADDED.match(task)
        if ":" in task and m is None:
            raise CollectError(f"expected <dataset>:<input tokens>x<output tokens>, got {task!r}")
        if m is not None and (int(m.group("n_in")) < 1 or int(m.group("n_out")) < 1):
            raise CollectError(f"{task!r}: lengths must be at least 1")
        resolve_dataset(m.group("name") if m else task)
    except CollectError as exc:
        raise CollectError(f"{where}: {exc}") from None


def _check(spec: SweepSpec, source: str) -> None:
    for name in ("engines", "models", "tasks", "batch_sizes"):
        if not getattr(spec, name):
            raise CollectError(f"{source}: {name}: at least one value is needed")
    for engine in spec.engines:
        if engine not in ENGINES:
            raise CollectError(f"{source}: engines: {engine!r} is not one of {', '.join(ENGINES)}")
    if "sglang" in spec.engines:
        for args in spec.engine_args:
            m = _SGLANG_LIMIT.search(args)
            if m is not None and m.group(1) != "{batch_size}":
                raise CollectError(
                    f"{source}: engine_args {args!r}: SGLang's --max-running-requests is each point's batch "
                    "size (the sweep sets it, as `run --batch-size` does); leave it out"
                )
    for task in spec.tasks:
        check_task(task, f"{source}: tasks")
    if (spec.num_prompts is None) == (spec.waves is None):
        raise CollectError(
            f"{source}: give exactly one of num_prompts (prompts per point) or waves "
            "(prompts = waves × batch size)"
        )
    if spec.cuda_graphs not in ("auto", "on", "off"):
        raise CollectError(f"{source}: cuda_graphs: expected auto, on or off, got {spec.cuda_graphs!r}")
    if spec.engines == ["hf"] and any(a.strip() for a in spec.engine_args):
        raise CollectError(
            f"{source}: engine_args are vLLM's or SGLang's flags; the hf engine takes dtype, device and "
            "attn_implementation"
        )
    for args in spec.engine_args:
        try:
            args.format(batch_size=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise CollectError(
                f"{source}: engine_args {args!r}: only {{batch_size}} may appear in braces ({exc})"
            ) from None
    if len(set(spec.batch_sizes)) != len(spec.batch_sizes):
        raise CollectError(f"{source}: batch_sizes: {spec.batch_sizes} repeats a value")
    if len(set(spec.tasks)) != len(spec.tasks):
        raise CollectError(f"{source}: tasks: {spec.tasks} repeats a value")


def load_spec(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """The spec of a YAML file (or none) with command-line `overrides` on top (None values ignored)."""
    values: dict[str, Any] = {}
    source = "the command line"
    if path is not None:
        values = {_ALIASES.get(str(k), str(k)): v for k, v in read_yaml(path).items()}
        source = str(path)
    overrides = dict(overrides or {})
    for one, other in (("num_prompts", "waves"), ("waves", "num_prompts")):
        if overrides.get(one) is not None and overrides.get(other) is None:
            values.pop(other, None)  # the command line's choice replaces the file's
    for key, value in overrides.items():
        if value is not None and value != []:
            values[_ALIASES.get(key, key)] = value
    return build_spec(values, source)


def expand(spec: SweepSpec) -> list[Point]:
    """The matrix's points, grouped so that points sharing an engine config run back to back
    (engine config, then task, then batch size, then repeat: one engine start per config)."""
    points: list[Point] = []
    configs = [
        (engine, model, args)
        for engine, model in itertools.product(spec.engines, spec.models)
        # engine args are vLLM's flags: an hf config has none (and is not repeated per args string)
        for args in (spec.engine_args if engine != "hf" else [""])
    ]
    for engine, model, args in configs:
        for task, bs, repeat in itertools.product(spec.tasks, spec.batch_sizes, range(spec.repeats)):
            config = EngineConfig(
                engine=engine,
                model=model,
                engine_args=args.format(batch_size=bs).strip(),
                random_weights=spec.random_weights,
                dtype=spec.dtype,
                device=spec.device,
                tokenizer=spec.tokenizer,
                counts=spec.counts,
                cuda_graphs=spec.cuda_graphs,
                attn_implementation=spec.attn_implementation,
                seed=spec.seed,
            )
            points.append(
                Point(
                    config=config,
                    task=task,
                    batch_size=bs,
                    num_prompts=spec.num_prompts if spec.num_prompts is not None else spec.waves * bs,
                    repeat=repeat,
                    max_new_tokens=spec.max_new_tokens,
                    ignore_eos=spec.ignore_eos,
                    dataset_path=spec.dataset_path,
                    max_batch_tokens=spec.max_batch_tokens,
                )
            )
    order = {c: i for i, c in enumerate(dict.fromkeys(p.config for p in points))}
    return sorted(points, key=lambda p: order[p.config])  # stable: task, bs, repeat order kept


def group_by_config(points: Sequence[Point]) -> list[tuple[EngineConfig, list[Point]]]:
    """Consecutive points that share an engine config (one engine start each)."""
    groups: list[tuple[EngineConfig, list[Point]]] = []
    for p in points:
        if groups and groups[-1][0] == p.config:
            groups[-1][1].append(p)
        else:
            groups.append((p.config, [p]))
    return groups
