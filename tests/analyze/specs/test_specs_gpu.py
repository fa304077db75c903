"""GPU table: name normalisation, units, unknown names, YAML overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecap.analyze.errors import InputError, SpecError
from moecap.analyze.specs import gpu_names, gpu_table, normalize_gpu_name, resolve_gpu


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # table names and short names
        ("H100-SXM-80GB", "H100-SXM-80GB"),
        ("H100", "H100-SXM-80GB"),
        ("h200", "H200-SXM-141GB"),
        ("B200", "B200-SXM-180GB"),
        ("A100-80GB", "A100-80GB-SXM"),
        ("a100_80gb_pcie", "A100-80GB-PCIe"),
        # torch.cuda.get_device_name() / nvidia-smi
        ("NVIDIA H100 80GB HBM3", "H100-SXM-80GB"),
        ("NVIDIA H200", "H200-SXM-141GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB-SXM"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB-SXM"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB-PCIe"),
        ("NVIDIA H100 PCIe", "H100-PCIe-80GB"),
        ("NVIDIA H100 NVL", "H100-NVL-94GB"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("AMD Instinct MI300X", "MI300X"),
        # MoE-CAP gpu_raw_type keys (and its cost-table spelling of H100 SXM)
        ("NVIDIA-H100-HBM3-80GB", "H100-SXM-80GB"),
        ("NVIDIA-H100-80GB-HBM3", "H100-SXM-80GB"),
        ("NVIDIA-A100-SXM4-80GB", "A100-80GB-SXM"),
        ("NVIDIA-A100-PCIe-80GB", "A100-80GB-PCIe"),
        ("NVIDIA-H100-PCIe-80GB", "H100-PCIe-80GB"),
        ("NVIDIA-H200-140GB", "H200-SXM-141GB"),
        ("NVIDIA-H200-141GB", "H200-SXM-141GB"),
        ("NVIDIA-B200-183GB", "B200-SXM-180GB"),
        # the shared table's original long names
        ("B200 (HGX B200, per GPU)", "B200-SXM-180GB"),
    ],
)
def test_name_normalisation(name: str, expected: str) -> None:
    assert resolve_gpu(name).name == expected


def test_normalize_gpu_name() -> None:
    assert normalize_gpu_name("  NVIDIA  H100_80GB--HBM3 ") == "H100-80GB-HBM3"
    assert normalize_gpu_name("AMD Instinct MI300X") == "INSTINCT-MI300X"


def test_units_are_bytes_and_flops() -> None:
    h100 = resolve_gpu("H100")
    assert h100.memory_bandwidth == 3.35e12  # bytes/s
    assert h100.memory_bytes == 80 * 10**9
    assert h100.peak_flops("bf16") == pytest.approx(989.4e12)  # dense, not the 1979 sparse headline
    assert h100.peak_flops("bfloat16") == h100.dense_flops["bf16"]
    assert h100.peak_flops("fp8") == pytest.approx(1978.9e12)
    assert h100.tdp_w == 700
    assert h100.price_usd is None and h100.usd_per_gpu_hour is None
    assert h100.extra["mamf_bf16_tflops"] == 794.5


def test_missing_dtype_peak_raises_or_falls_back() -> None:
    a100 = resolve_gpu("NVIDIA A100-SXM4-80GB")
    with pytest.raises(SpecError, match="no dense fp8 peak"):
        a100.peak_flops("fp8")
    assert a100.peak_flops("fp8", fallback="bf16") == pytest.approx(312e12)


def test_bundled_table_is_sourced_and_unambiguous() -> None:
    table = gpu_table()
    assert len(table) == 17
    owners: dict[str, str] = {}
    for spec in table.values():
        assert spec.source, spec.name
        for alias in (spec.name, *spec.aliases):
            key = normalize_gpu_name(alias)
            assert owners.setdefault(key, spec.name) == spec.name, f"{alias} names two GPUs"


@pytest.mark.parametrize("name", ["A100", "NVIDIA A100-PCIE-40GB", "TPU v5e"])
def test_unknown_gpu_lists_known_and_explains_override(name: str) -> None:
    with pytest.raises(SpecError) as info:
        resolve_gpu(name)
    message = str(info.value)
    assert message.startswith(f"unknown GPU {name!r}; known: A100-40GB-SXM, A100-80GB-PCIe, A100-80GB-SXM,")
    assert "H100-SXM-80GB" in message and "YAML" in message and "--gpu-overrides" in message


OVERRIDE = """
gpus:
  - name: MyAccel-64GB
    aliases: ["My Accelerator"]
    memory_gb: 64
    memory_bandwidth_tb_s: 2.5
    tflops_dense: {bf16: 500, fp8: 1000}
    tdp_w: 600
    price_usd: 20000
    usd_per_gpu_hour: 2.5
    source: "test"
  - name: H100
    memory_gb: 80
    memory_bandwidth_tb_s: 3.0
    tflops_dense: {bf16: 900}
"""


def test_yaml_override_adds_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "gpus.yaml"
    path.write_text(OVERRIDE)
    mine = resolve_gpu("NVIDIA My Accelerator", overrides_yaml=path)
    assert mine.name == "MyAccel-64GB"
    assert mine.memory_bandwidth == 2.5e12 and mine.peak_flops("fp8") == 1000e12
    assert mine.price_usd == 20000 and mine.usd_per_gpu_hour == 2.5
    # "H100" replaces the bundled H100 SXM entry; its device-name spellings lead to the new values.
    replaced = resolve_gpu("NVIDIA H100 80GB HBM3", overrides_yaml=str(path))
    assert replaced.name == "H100" and replaced.memory_bandwidth == 3.0e12
    assert "H100-SXM-80GB" not in gpu_names(path) and "MyAccel-64GB" in gpu_names(path)
    # The bundled table itself is untouched.
    assert resolve_gpu("NVIDIA H100 80GB HBM3").memory_bandwidth == 3.35e12


def test_bad_override_files(tmp_path: Path) -> None:
    incomplete = tmp_path / "incomplete.yaml"
    incomplete.write_text("gpus:\n  - name: X\n    memory_gb: 10\n")
    with pytest.raises(InputError, match=r"GPU entry 'X' lacks field.*memory_bandwidth_tb_s, tflops_dense"):
        resolve_gpu("X", overrides_yaml=incomplete)
    broken = tmp_path / "broken.yaml"
    broken.write_text("gpus: [\n")
    with pytest.raises(InputError, match="cannot read GPU override file"):
        resolve_gpu("H100", overrides_yaml=broken)
    bad_dtype = tmp_path / "dtype.yaml"
    bad_dtype.write_text(
        "gpus:\n  - {name: X, memory_gb: 1, memory_bandwidth_tb_s: 1, tflops_dense: {bf17: 1}}\n"
    )
    with pytest.raises(InputError, match="unknown tflops_dense dtype"):
        resolve_gpu("X", overrides_yaml=bad_dtype)
    with pytest.raises(InputError, match="cannot read GPU override file"):
        resolve_gpu("H100", overrides_yaml=tmp_path / "missing.yaml")
