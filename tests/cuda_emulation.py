"""Run CUDA kernels' logic on the CPU: a .cu file compiled by g++ with thin shims.

One std::thread per CUDA thread, std::barrier for __syncthreads, blocks one at a time. It
checks index math, tiling, barriers and epilogues on machines with no GPU; it says nothing
about speed or nvcc's code generation (the GPU tests do that).
"""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_INC = next((os.path.join(h, "include") for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0",
                                                        "/usr/local/cuda") if h and os.path.exists(
                                                            os.path.join(h, "include", "cuda_fp16.h"))), None)

SHIMS = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
struct Idx { unsigned x = 0, y = 0, z = 0; };
thread_local Idx threadIdx, blockIdx;
static Idx blockDim, gridDim;
#define __global__
#define __launch_bounds__(a, b)
#undef __shared__
#define __shared__ static  // one block runs at a time, so a static array is that block's shared memory
static std::barrier<>* g_bar;
static float4* g_smem;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
// Correctly rounded single operations (g++ is run with -ffp-contract=off, so no FMA).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
"""


def load_kernel_source(name: str, cut_at: str) -> str:
    """csrc/cuda/<name> without its CUDA includes and without everything from `cut_at` on
    (the launchers: <<<>>> and the runtime API are GPU-only)."""
    src = open(os.path.join(ROOT, "csrc", "cuda", name)).read()
    src = re.sub(r"#include <cuda[^>]*>\n", "", src)
    for header in ("launchers.h", "../piece_table.h"):
        src = src.replace(f'#include "{header}"', '#include "%s"' % os.path.normpath(
            os.path.join(ROOT, "csrc", "cuda", header)))
    return src[:src.index(cut_at)]


def build(tmp_dir, source: str):
    """Compile an emulator program; skips the test where g++ or the CUDA headers are missing."""
    if CUDA_INC is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and the CUDA headers")
    (tmp_dir / "emu.cpp").write_text(SHIMS + source)
    exe = tmp_dir / "emu"
    r = subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-w", f"-I{CUDA_INC}",
                        str(tmp_dir / "emu.cpp"), "-o", str(exe)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail("emulator build failed:\n" + r.stderr[-3000:])
    return exe
