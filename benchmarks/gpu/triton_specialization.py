"""On a GPU: does a Triton kernel compile again when an integer argument stops being a multiple of 16?

The compile steps inside both H100 sweeps (docs/sweep.md) are exactly the steps whose token count is not a
multiple of 16; Triton specializes integer arguments on divisibility by 16 (and on == 1), so a kernel
launched with M = 8,192 and then M = 7,167 compiles twice. This times the first and second launch of a
small GEMM kernel (tl.dot over an M x K by K x N problem, M a plain runtime argument) at M = 8,192, 4,096
(another multiple of 16: no new compile expected) and 7,167, 1,164 (not multiples: one new compile, then
none). Prints one line per launch: M, ms (synchronised), whether Triton's cache grew.

    python benchmarks/gpu/triton_specialization.py
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl


@triton.jit
def gemm(a, b, c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(a + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm[:, None] < M), other=0.0)
        y = tl.load(b + (k0 + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(x, y)
    tl.store(c + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=(rm[:, None] < M))


def launch(m: int, n: int = 1408, k: int = 2048) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gemm[(triton.cdiv(m, 64), triton.cdiv(n, 64))](a, b, c, m, n, k, BM=64, BN=64, BK=32)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def compiled() -> int | None:
    """How many binaries Triton holds for `gemm` on this device (None where its cache layout differs)."""
    try:
        return len(gemm.device_caches[torch.cuda.current_device()][0])
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def main() -> None:
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    for m in (8192, 8192, 4096, 4096, 7167, 7167, 1164, 1164):
        before = compiled()
        ms = launch(m)
        after = compiled()
        grew = None if before is None or after is None else after > before
        kind = "(mult. of 16)" if m % 16 == 0 else "(not mult.)  "
        print(f"M={m:5d} {kind} {ms:8.2f} ms  new compile: {grew}")


if __name__ == "__main__":
    main()
