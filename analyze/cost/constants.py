"""Cost constants: the bundled, sourced data file plus user overrides (YAML file, then flags).

Every constant is a `Constant` that carries its value, unit, sensitivity band (low/high), source,
date and *origin* (bundled file, override file, flag), so a printed cost can always say where each
number came from. Precedence, strongest first: flags > `--cost-overrides` YAML > a `price_usd` /
`usd_per_gpu_hour` in the GPU table (a `--gpu-overrides` entry) > the bundled data file.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError, SpecError
from ..specs import GpuSpec, resolve_gpu
from ..specs.gpu import BUNDLED_YAML_LOADER

COST_MODELS = ("ownership", "cloud")
"""ownership: amortised capex + energy (+ host, overheads); cloud: a $/GPU-hour rental price."""

GPU_KEYS = ("price_usd", "usd_per_gpu_hour")
"""Per-GPU constants: purchase price (USD per GPU) and cloud price (USD per GPU-hour)."""

ENV_OVERRIDES = "MOECAP_COST_OVERRIDES"
"""Environment variable naming a cost-overrides YAML (for commands without a --cost-overrides flag)."""

#: The flag that sets each constant, for messages.
FLAG_OF = {
    "lifetime_years": "--lifetime-years",
    "utilization": "--utilization",
    "electricity_usd_per_kwh": "--electricity-usd-per-kwh",
    "pue": "--pue",
    "capex_overhead_factor": "--capex-overhead-factor",
    "host_capex_usd_per_gpu": "--host-capex-usd-per-gpu",
    "host_power_w_per_gpu": "--host-power-w-per-gpu",
    "price_usd": "--gpu-price-usd",
    "usd_per_gpu_hour": "--usd-per-gpu-hour",
}


class PriceUnknown(SpecError):
    """A cost needs a GPU price (purchase or per hour) that neither the data file nor the user gave."""


@dataclass(frozen=True)
class Constant:
    """One cost constant with its provenance. low/high: the sensitivity band (None = not varied)."""

    name: str
    value: float
    unit: str = ""
    source: str = ""
    date: str = ""
    low: float | None = None
    high: float | None = None
    origin: str = "bundled"
    """bundled | overrides <file> | flag <name> | gpu table."""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}

    def replace(self, **changes: Any) -> Constant:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CostSettings:
    """Resolved constants for the cost model. `gpu_prices`: canonical GPU name -> key -> Constant,
    key "*" holding values that apply to every GPU (a flag without a GPU name)."""

    model: str
    constants: Mapping[str, Constant]
    gpu_prices: Mapping[str, Mapping[str, Constant]]
    gpu_overrides: str | None = None
    layers: tuple[str, ...] = ()
    """Where the settings came from, weakest first (for the document)."""
    bundled_gpu_prices: Mapping[str, Mapping[str, Constant]] = field(default_factory=dict)

    def value(self, name: str) -> float:
        return self.constants[name].value

    def gpu_constant(self, gpu: GpuSpec, key: str) -> Constant:
        """The purchase price ("price_usd") or cloud price ("usd_per_gpu_hour") for `gpu`.

        Raises PriceUnknown naming the flag (and YAML key) that would supply it.
        """
        assert key in GPU_KEYS
        user = self.gpu_prices.get(gpu.name, {}).get(key) or self.gpu_prices.get("*", {}).get(key)
        if user is not None:
            return user
        table_value = gpu.price_usd if key == "price_usd" else gpu.usd_per_gpu_hour
        if table_value is not None:
            band = self.value("price_band_fraction")
            return Constant(
                key,
                float(table_value),
                _GPU_UNITS[key],
                source=f"GPU table entry {gpu.name} (--gpu-overrides)",
                low=table_value * (1 - band),
                high=table_value * (1 + band),
                origin="gpu table",
            )
        bundled = self.bundled_gpu_prices.get(gpu.name, {}).get(key)
        if bundled is not None:
            return bundled
        what = "purchase price" if key == "price_usd" else "cloud price per GPU-hour"
        alt = (
            "or use --cost-model cloud with --usd-per-gpu-hour"
            if key == "price_usd"
            else "or use --cost-model ownership"
        )
        raise PriceUnknown(
            f"no {what} for GPU {gpu.name}: pass {FLAG_OF[key]} {gpu.name}=USD "
            f"(or `gpus: {{{gpu.name}: {{{key}: USD}}}}` in a YAML given to --cost-overrides / "
            f"${ENV_OVERRIDES}), {alt}"
        )

    def with_value(self, name: str, value: float) -> CostSettings:
        """A copy with one constant's value replaced (for sensitivity bands)."""
        constants = dict(self.constants)
        constants[name] = constants[name].replace(value=value)
        return dataclasses.replace(self, constants=constants)

    def describe(self) -> dict[str, Any]:
        """The settings for metrics.json: model, layers and every general constant."""
        return {
            "model": self.model,
            "layers": list(self.layers),
            "constants": {k: c.as_dict() for k, c in self.constants.items()},
        }


_GPU_UNITS = {"price_usd": "USD per GPU", "usd_per_gpu_hour": "USD per GPU-hour"}


# -- loading ---------------------------------------------------------------------------------------
@functools.cache
def _bundled_raw() -> dict[str, Any]:
    text = resources.files("moecap.analyze.cost.data").joinpath("cost_constants.yaml").read_text("utf-8")
    data = yaml.load(text, Loader=BUNDLED_YAML_LOADER)
    assert isinstance(data, dict)
    return data


def bundled_collected_date() -> str:
    return str(_bundled_raw().get("collected", ""))


def _constant(name: str, raw: Any, where: str, origin: str, unit: str = "") -> Constant:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, Mapping)):
        raise InputError(f"{where}: {name} must be a number or a mapping with `value`, got {raw!r}")
    if not isinstance(raw, Mapping):
        return Constant(name, float(raw), unit, origin=origin)
    unknown = sorted(set(raw) - {"value", "low", "high", "unit", "source", "date"})
    if unknown:
        raise InputError(
            f"{where}: {name} has unknown field(s) {unknown}; known: value, low, high, unit, source, date"
        )
    nums: dict[str, float | None] = {}
    for key in ("value", "low", "high"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise InputError(f"{where}: {name}.{key} must be a number, got {v!r}")
        nums[key] = None if v is None else float(v)
    if nums["value"] is None:
        raise InputError(f"{where}: {name} lacks `value`")
    return Constant(
        name,
        nums["value"],
        str(raw.get("unit", unit) or unit),
        source=str(raw.get("source", "") or "").strip(),
        date=str(raw.get("date", "") or ""),
        low=nums["low"],
        high=nums["high"],
        origin=origin,
    )


def _check_value(c: Constant, where: str) -> None:
    for label, v in (("", c.value), (".low", c.low), (".high", c.high)):
        if v is not None and not math.isfinite(v):  # NaN passes every comparison below
            raise InputError(f"{where}: {c.name}{label} must be a finite number, got {v}")
    positive = {"lifetime_years", "utilization", "pue", "capex_overhead_factor"}
    if c.name in positive and c.value <= 0:
        raise InputError(f"{where}: {c.name} must be > 0, got {c.value}")
    if c.value < 0:
        raise InputError(f"{where}: {c.name} must be >= 0, got {c.value}")
    if c.name == "utilization" and c.value > 1:
        raise InputError(f"{where}: utilization is a fraction in (0, 1], got {c.value}")


def _merge(base: Constant | None, new: Constant, band_fraction: float) -> Constant:
    """An override keeps the bundled unit; its band is its own, else the bundled band if that still
    contains the new value, else +/- band_fraction around it."""
    unit = new.unit or (base.unit if base else "")
    low, high = new.low, new.high
    if low is None and high is None:
        if (
            base is not None
            and base.low is not None
            and base.high is not None
            and base.low <= new.value <= base.high
        ):
            low, high = base.low, base.high
        elif base is None or base.low is not None or base.high is not None:
            low, high = new.value * (1 - band_fraction), new.value * (1 + band_fraction)
    return new.replace(unit=unit, low=low, high=high)


def _canonical_gpu(name: str, where: str, gpu_overrides: str | None) -> str:
    if name == "*":
        return name
    try:
        return resolve_gpu(name, overrides_yaml=gpu_overrides).name
    except SpecError as exc:
        raise InputError(f"{where}: {exc}") from None


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read cost overrides {p}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"cost overrides {p}: expected a mapping (constants:, gpus:, model:)")
    return data


def load_cost_settings(
    overrides: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    gpu_overrides: str | None = None,
    use_env: bool = False,
) -> CostSettings:
    """The bundled constants with `overrides` (a YAML path or a parsed mapping of the same layout)
    and then `flags` applied.

    flags: constant name -> number, plus "model" -> ownership|cloud and "price_usd" /
    "usd_per_gpu_hour" -> {GPU name or "*": USD}. use_env: also read the YAML named by
    $MOECAP_COST_OVERRIDES when `overrides` is None. Raises InputError on a bad file or value.
    """
    raw = _bundled_raw()
    collected = bundled_collected_date()
    layers = [f"bundled cost_constants.yaml (collected {collected})"]
    constants = {
        name: _constant(name, value, "bundled cost_constants.yaml", "bundled")
        for name, value in raw["constants"].items()
    }
    bundled_prices: dict[str, dict[str, Constant]] = {}
    for gpu_name, entry in raw.get("gpus", {}).items():
        canonical = _canonical_gpu(gpu_name, "bundled cost_constants.yaml", None)
        bundled_prices[canonical] = {
            key: _constant(key, value, f"bundled cost_constants.yaml {gpu_name}", "bundled", _GPU_UNITS[key])
            for key, value in entry.items()
        }
    model = "ownership"
    gpu_prices: dict[str, dict[str, Constant]] = {}
    if overrides is None and use_env and os.environ.get(ENV_OVERRIDES):
        overrides = os.environ[ENV_OVERRIDES]
    if overrides is not None:
        where = "cost overrides" if isinstance(overrides, Mapping) else f"cost overrides {overrides}"
        data = dict(overrides) if isinstance(overrides, Mapping) else _read_yaml(overrides)
        origin = "overrides" if isinstance(overrides, Mapping) else f"overrides {overrides}"
        layers.append(origin)
        unknown = sorted(set(data) - {"constants", "gpus", "model", "schema", "collected"})
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown}; expected constants:, gpus:, model:")
        model = str(data.get("model", model))
        for name, value in (data.get("constants") or {}).items():
            if name not in constants:
                raise InputError(f"{where}: unknown constant {name!r}; known: {', '.join(constants)}")
            constants[name] = _merge(
                constants[name],
                _constant(name, value, where, origin),
                constants["price_band_fraction"].value,
            )
        for gpu_name, entry in (data.get("gpus") or {}).items():
            if not isinstance(entry, Mapping) or set(entry) - set(GPU_KEYS):
                raise InputError(f"{where}: gpus.{gpu_name} must map {' / '.join(GPU_KEYS)} to a price")
            canonical = _canonical_gpu(str(gpu_name), where, gpu_overrides)
            for key, value in entry.items():
                base = bundled_prices.get(canonical, {}).get(key)
                new = _constant(key, value, f"{where} gpus.{gpu_name}", origin, _GPU_UNITS[key])
                band = constants["price_band_fraction"].value
                gpu_prices.setdefault(canonical, {})[key] = _merge(base, new, band)
    if flags:
        layers.append("flags")
        band = constants["price_band_fraction"].value
        for name, value in flags.items():
            if value is None:
                continue
            if name == "model":
                model = str(value)
            elif name in GPU_KEYS:
                for gpu_name, usd in dict(value).items():
                    canonical = _canonical_gpu(gpu_name, FLAG_OF[name], gpu_overrides)
                    base = bundled_prices.get(canonical, {}).get(name)
                    new = Constant(name, float(usd), _GPU_UNITS[name], origin=f"flag {FLAG_OF[name]}")
                    gpu_prices.setdefault(canonical, {})[name] = _merge(base, new, band)
            elif name in constants:
                new = Constant(name, float(value), origin=f"flag {FLAG_OF.get(name, name)}")
                constants[name] = _merge(constants[name], new, band)
            else:
                raise InputError(
                    f"unknown cost setting {name!r}; known: {', '.join([*constants, *GPU_KEYS])}"
                )
    if model not in COST_MODELS:
        raise InputError(f"--cost-model {model!r}: expected one of {', '.join(COST_MODELS)}")
    for c in constants.values():
        _check_value(c, c.origin)
    for entry in gpu_prices.values():
        for c in entry.values():
            _check_value(c, c.origin)
    return CostSettings(
        model=model,
        constants=constants,
        gpu_prices=gpu_prices,
        gpu_overrides=gpu_overrides,
        layers=tuple(layers),
        bundled_gpu_prices=bundled_prices,
    )


def parse_gpu_values(values: Iterable[str] | None, flag: str) -> dict[str, float]:
    """`--gpu-price-usd H200=35000 --gpu-price-usd 30000` -> {"H200": 35000.0, "*": 30000.0}."""
    out: dict[str, float] = {}
    for text in values or ():
        name, sep, number = str(text).rpartition("=")
        key = name.strip() if sep else "*"
        try:
            out[key] = float(number)
        except ValueError:
            raise InputError(f"{flag} {text!r}: expected USD or GPU=USD (e.g. {flag} H200=35000)") from None
    return out
