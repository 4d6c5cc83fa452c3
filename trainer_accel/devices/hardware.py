"""What this machine can do: CPU cores and threads, native bf16, peak FLOP/s, and the warnings that follow.

Two slow set-ups are easy to fall into and silent: `accelerate launch` without `--cpu` leaves a lone CPU
process with one thread (about 1.8x slower on 2 cores), and bf16 autocast on a CPU without bf16 instructions is
emulated (about 18x slower than fp32). `compute_warnings` names both at start, with the fix.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time

import torch

# Dense peaks from the vendors' datasheets, in TFLOP/s: (bf16/fp16 tensor cores, tf32 tensor cores, fp32 without
# tensor cores). A key matches torch.cuda.get_device_name() as whole words ("H100" is in "NVIDIA H100 80GB HBM3",
# not in "NVIDIA GH200"); the longest matching key wins ("H100 NVL" over "H100"). Datasheets quote tensor-core
# rates with sparsity: these are half of those.
GPU_PEAK_TFLOPS: list[tuple[str, float, float, float]] = [
    ("B200", 2250.0, 1100.0, 80.0),
    ("GH200", 989.0, 494.0, 67.0),
    ("H200", 989.0, 494.0, 67.0),  # SXM
    ("H200 NVL", 835.0, 418.0, 60.0),
    ("H100", 989.0, 494.0, 67.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H100 PCIe", 756.0, 378.0, 51.0),
    ("H100 NVL", 835.0, 418.0, 60.0),
    ("A100", 312.0, 156.0, 19.5),
    ("A10G", 125.0, 62.5, 31.2),
    ("A10", 125.0, 62.5, 31.2),
    ("L40S", 362.0, 183.0, 91.6),
    ("L40", 181.0, 90.5, 90.5),
    ("L4", 121.0, 60.0, 30.3),
    ("A6000", 155.0, 77.4, 38.7),
    ("RTX 4090", 165.0, 82.6, 82.6),
    ("RTX 3090", 71.0, 35.6, 35.6),
    ("V100", 125.0, 15.7, 15.7),  # fp16 tensor cores; no bf16 or tf32
    ("T4", 65.0, 8.1, 8.1),
]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as a container or taskset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def local_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX on x86, the BF16 extension on Arm)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            )
            return out.stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.lower().startswith(("features", "flags")) and " bf16" in line for line in f)
    except OSError:
        return False


def compute_warnings(device: torch.device, mixed_precision: str, processes: int) -> list[str]:
    """Set-ups that train much slower than this machine could, each with what to do instead."""
    out = []
    if device.type != "cpu":
        return out
    threads, cores, local = torch.get_num_threads(), usable_cores(), local_processes()
    if processes == 1 and threads == 1 and cores > 1:
        out.append(
            f"this process trains on 1 CPU thread of {cores} cores (accelerate launch sets OMP_NUM_THREADS=1 "
            f"unless told --cpu); launch with --config_file launch/cpu.yaml, or set OMP_NUM_THREADS={cores}"
        )
    elif threads * local < cores // 2:
        out.append(
            f"{local} process(es) x {threads} thread(s) use {threads * local} of {cores} CPU cores; "
            f"set OMP_NUM_THREADS={max(1, cores // local)}"
        )
    if mixed_precision == "bf16" and not cpu_has_native_bf16():
        out.append(
            "bf16 was asked for on a CPU without bf16 instructions: autocast emulates it, about 18x slower "
            'than fp32; set train_cfg.mixed_precision to "no" (launch/cpu.yaml does)'
        )
    return out


def gpu_peak_flops(device: torch.device, mixed_precision: str, tf32: bool) -> tuple[float | None, str]:
    """Datasheet peak FLOP/s of this GPU at the precision its matmuls run in, and where the figure comes from:
    bf16/fp16 tensor cores under mixed precision, else tf32 tensor cores when train_cfg.tf32 allows them, else
    plain fp32."""
    name = torch.cuda.get_device_name(device)
    words = _words(name)
    matches = [row for row in GPU_PEAK_TFLOPS if _has_words(words, _words(row[0]))]
    if not matches:
        return None, f"no datasheet peak known for {name!r}"
    key, half, tf32_peak, fp32_peak = max(matches, key=lambda row: len(row[0]))
    peak, kind = (
        (half, "bf16/fp16")
        if mixed_precision in ("bf16", "fp16")
        else (tf32_peak, "tf32")
        if tf32
        else (fp32_peak, "fp32")
    )
    return peak * 1e12, f"datasheet {key} {kind} dense"


def _words(name: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", name)  # "NVIDIA A100-SXM4-80GB" -> NVIDIA, A100, SXM4, 80GB


def _has_words(words: list[str], key: list[str]) -> bool:
    return any(words[i : i + len(key)] == key for i in range(len(words) - len(key) + 1))


def measured_matmul_flops(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seconds: float = 1.0,
    sizes: tuple[int, ...] = (512, 1024, 2048),
) -> float:
    """Best FLOP/s of square matmuls on this device (the CPU's practical peak, with its current threads)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up: thread pool, allocator, kernel choice
        reps, start = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed > seconds / 3:
                break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


def fits_in_free_memory(device: torch.device, nbytes: int, spare: float = 0.25) -> bool:
    """Whether `nbytes` more fit in a CUDA device's free memory with `spare` of it left over (for the work done
    with them); True on devices whose free memory torch cannot read (CPU, MPS), where the host's is used."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes * (1 + spare) <= free
