"""Fused DyT: y = weight · tanh(α·x) (+ bias) over the last dimension, in one pass each way;
and the trainer's cross-entropy, in one pass each way.

Autograd on the plain formula runs one kernel per operation, keeps the intermediates alive and
reduces dα, dweight and dbias in separate passes. Here the forward reads x once and writes y; the
backward reads x and dy once, writes dx and accumulates dα, dweight and dbias in the same sweep.
Nothing is saved but x (tanh is recomputed, which is cheaper than storing it).

Two implementations of the same numerics (fp32 arithmetic for bf16/fp32 inputs, one rounding to
the input dtype at the end; fp64 stays fp64):

* CPU: a small C kernel (below), compiled once per machine with the system C compiler into
  ``~/.cache/fms_dyt``. Eagerly an autograd function calls it; inside ``torch.compile``d blocks
  it is the custom op ``torch.ops.fms_dyt.dyt``, which dynamo keeps as one node (no graph
  break). Without a compiler (or with ``FMS_DYT_CPU_KERNEL=0``) the PyTorch formulation runs.
* Elsewhere (GPUs): the same autograd function running plain PyTorch ops, which
  ``torch.compile`` fuses into one kernel forward and one backward; eager it still saves only x.

Under FSDP mixed precision x is bf16 while α and weight may be bf16 or fp32: the output takes x's
dtype, each gradient its parameter's dtype, and reductions accumulate in fp32 (fp64 across blocks).
docs/performance.md has the measurements.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

# ---- PyTorch formulation (GPUs, fallback) -----------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def dyt_reference(x, alpha, weight, bias=None):
    """The plain formula, in x's dtype op by op (what autograd would differentiate)."""
    y = weight * torch.tanh(alpha * x)
    return y if bias is None else y + bias


def _forward_math(x, alpha, weight, bias):
    ct = _compute_dtype(x)
    y = weight.to(ct) * torch.tanh(alpha.to(ct) * x.to(ct))
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def _backward_math(grad_y, x, alpha, weight, has_bias):
    ct = _compute_dtype(x)
    a, g, x_c = alpha.to(ct), grad_y.to(ct), x.to(ct)
    t = torch.tanh(a * x_c)
    lead = tuple(range(x.dim() - 1))
    grad_weight = (g * t).sum(lead)
    h = g * weight.to(ct) * (1 - t * t)
    grad_x = (h * a).to(x.dtype)
    grad_alpha = (h * x_c).sum().reshape(alpha.shape)
    grad_bias = g.sum(lead) if has_bias else None
    return grad_x, grad_alpha, grad_weight, grad_bias


class _DyTFunction(torch.autograd.Function):
    """Saves x only; ``cpu_kernel`` picks the C kernel (CPU tensors) or the PyTorch formulation."""

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, cpu_kernel: bool):
        ctx.save_for_backward(x, alpha, weight)
        ctx.has_bias, ctx.cpu_kernel = bias is not None, cpu_kernel
        return (_cpu_forward if cpu_kernel else _forward_math)(x, alpha, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha, weight = ctx.saved_tensors
        gx, ga, gw, gb = (_cpu_backward if ctx.cpu_kernel else _backward_math)(grad_y, x, alpha, weight, ctx.has_bias)
        gb = None if gb is None else gb.to(weight.dtype)
        return gx, ga.to(alpha.dtype), gw.to(weight.dtype), gb, None


# ---- the CPU kernel ---------------------------------------------------------------------------

_C_SOURCE = r"""
/* fms-dyt CPU kernels: y = w * tanh(alpha * x) (+ b) over rows of `cols` elements. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define ROW_BLOCK 128 /* rows summed in fp32 before the fp64 running total */

static inline float bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t bf16_store(float f) { /* round to nearest even; NaN -> 0x7FC0, as torch */
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7FC0u : r);
}
static inline float f32_load(float v) { return v; }
static inline float f32_store(float v) { return v; }
static inline double f64_load(double v) { return v; }
static inline double f64_store(double v) { return v; }

/* Forward tanh: x P(x^2) / Q(x^2), a relative-error fit on [0, 9] (tanh rounds to 1 beyond);
   within 6 ulp of tanh in fp32 arithmetic, ~4x cheaper than a libm-grade tanh. */
static inline float tanh_fwd(float z) {
    float a = fabsf(z);
    a = a < 9.0f ? a : 9.0f;
    float s = a * a;
    float p = (((1.335458755e-08f * s + 2.060904046e-05f) * s + 3.495586291e-03f) * s
               + 1.338102435e-01f) * s + 9.999999795e-01f;
    float q = (((7.776530999e-07f * s + 3.285631290e-04f) * s + 2.587697601e-02f) * s
               + 4.671433994e-01f) * s + 1.0f;
    float t = a * p / q;
    t = t < 1.0f ? t : 1.0f; /* the fit may pass 1 by an ulp near 9 */
    t = copysignf(t, z);
    return z != z ? z : t;
}

/* exp(y) for y <= 0 (softmax arguments, -2|z| for tanh) to ~2 ulp: 2^k p(r), Cody-Waite reduction;
   0 below fp32's normal range, NaN stays NaN. */
static inline float exp_nonpos(float y) {
    float c = y > -87.0f ? y : -87.0f;
    float k = (c * 1.44269504f + 12582912.0f) - 12582912.0f; /* nearest integer */
    float r = (c - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666667e-01f + r * (4.16666667e-02f
              + r * (8.33333333e-03f + r * (1.38888889e-03f + r * 1.98412698e-04f))))));
    int32_t ki = (int32_t)k;
    uint32_t bits = (uint32_t)(ki + 127) << 23; float scale; memcpy(&scale, &bits, 4);
    float e = y > -87.0f ? p * scale : 0.0f;
    return y != y ? y : e;
}
static inline double exp_f64(double y) { return exp(y); }

/* Backward: tanh(z) and 1 - tanh(z)^2, both to a few ulp (also where tanh saturates, which
   1 - t*t cannot give), from e = exp(-2|z|). */
static inline void tanh_grad(float z, float* t_out, float* d_out) {
    float a = fabsf(z);
    float e = exp_nonpos(-2.0f * (a < 40.0f ? a : 40.0f));
    float inv = 1.0f / (1.0f + e);
    float s = a * a; /* small |z|: the odd Taylor series, since 1 - e cancels */
    float small = a + a * s * (-3.33333333e-01f + s * (1.33333333e-01f + s * (-5.39682540e-02f
                  + s * (2.18694885e-02f + s * -8.86323552e-03f))));
    float t = a < 0.25f ? small : (1.0f - e) * inv;
    t = z < 0.0f ? -t : t;
    float d = 4.0f * e * inv * inv;
    *t_out = z != z ? z : t;
    *d_out = z != z ? z : d;
}
/* bf16 backward: the forward's tanh and 1 - t*t, as autograd differentiates tanh. Where tanh
   saturates this is less accurate than tanh_grad, but far below bf16's resolution of dx and
   far better than the plain formula in bf16 (which rounds t to 8 bits first); ~1.5x cheaper. */
static inline void tanh_grad_bf16(float z, float* t_out, float* d_out) {
    float t = tanh_fwd(z); *t_out = t; *d_out = 1.0f - t * t;
}
static inline void tanh_grad_f64(double z, double* t_out, double* d_out) {
    double t = tanh(z); *t_out = t; *d_out = 1.0 - t * t;
}

#define DYT_KERNELS(NAME, T, F, LOAD, STORE, TANH, TANH_GRAD)                                  \
static inline void fwd_row_##NAME(const T* restrict x, T* restrict y, int64_t n, F alpha,      \
                                  const F* restrict w, const F* restrict b, int has_b) {       \
    if (has_b) { for (int64_t c = 0; c < n; ++c) y[c] = STORE(w[c] * TANH(alpha * LOAD(x[c])) + b[c]); } \
    else       { for (int64_t c = 0; c < n; ++c) y[c] = STORE(w[c] * TANH(alpha * LOAD(x[c]))); }        \
}                                                                                               \
void dyt_forward_##NAME(const T* x, T* y, int64_t rows, int64_t cols, F alpha, const F* w,     \
                        const F* b, int nthreads) {                                             \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                          \
    for (int64_t r = 0; r < rows; ++r)                                                          \
        fwd_row_##NAME(x + r * cols, y + r * cols, cols, alpha, w, b, b != NULL);               \
}                                                                                               \
static inline void bwd_row_##NAME(const T* restrict x, const T* restrict dy, T* restrict dx,    \
                                  int64_t n, F alpha, const F* restrict w, F* restrict acc_w,  \
                                  F* restrict acc_a, F* restrict acc_b, int has_b) {           \
    for (int64_t c = 0; c < n; ++c) {                                                           \
        F xv = LOAD(x[c]), g = LOAD(dy[c]), t, d;                                               \
        TANH_GRAD(alpha * xv, &t, &d);                                                          \
        F h = g * w[c] * d;                                                                     \
        dx[c] = STORE(alpha * h);                                                               \
        acc_w[c] += g * t;                                                                      \
        acc_a[c] += h * xv;                                                                     \
        if (has_b) acc_b[c] += g;                                                               \
    }                                                                                           \
}                                                                                               \
/* partial: [nthreads][3][cols] fp64, zeroed by the caller: sums of dy*t, dy*w*(1-t^2)*x, dy. */ \
/* Returns the number of threads that could not allocate their accumulators (0: success). */    \
int dyt_backward_##NAME(const T* x, const T* dy, T* dx, int64_t rows, int64_t cols, F alpha,  \
                         const F* w, int has_b, double* partial, int nthreads) {                \
    int failed = 0;                                                                             \
    _Pragma("omp parallel num_threads(nthreads)")                                               \
    {                                                                                           \
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();                             \
        int64_t r0 = rows * tid / nt, r1 = rows * (tid + 1) / nt;                               \
        F* acc = (F*)malloc(3 * cols * sizeof(F));                                              \
        double* out = partial + (int64_t)tid * 3 * cols;                                        \
        for (int64_t rb = r0; rb < r1 && acc; rb += ROW_BLOCK) {                                \
            int64_t re = rb + ROW_BLOCK < r1 ? rb + ROW_BLOCK : r1;                             \
            memset(acc, 0, 3 * cols * sizeof(F));                                               \
            for (int64_t r = rb; r < re; ++r) {                                                 \
                if (has_b) bwd_row_##NAME(x + r * cols, dy + r * cols, dx + r * cols, cols, alpha, \
                                          w, acc, acc + cols, acc + 2 * cols, 1);               \
                else bwd_row_##NAME(x + r * cols, dy + r * cols, dx + r * cols, cols, alpha,    \
                                    w, acc, acc + cols, acc + 2 * cols, 0);                     \
            }                                                                                   \
            for (int64_t c = 0; c < 3 * cols; ++c) out[c] += acc[c];                            \
        }                                                                                       \
        if (!acc && r0 < r1) {                                                                  \
            _Pragma("omp atomic")                                                               \
            failed++;                                                                           \
        }                                                                                       \
        free(acc);                                                                              \
    }                                                                                           \
    return failed;                                                                              \
}

/* Cross-entropy over rows of `cols` logits. Forward: lse[r] = logsumexp(x[r]) and
   loss[r] = lse[r] - x[r][t[r]] (0 where t[r] == ignore); backward: one pass writing
   dx[r] = scale * (softmax(x[r]) - onehot(t[r])). Sums run in F within blocks, in double across. */
#define CE_KERNELS(NAME, T, F, LOAD, STORE, EXP, LOG)                                          \
void ce_forward_##NAME(const T* x, const int64_t* t, F* lse, F* loss, int64_t rows, int64_t cols, \
                       int64_t ignore, int nthreads) {                                          \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                          \
    for (int64_t r = 0; r < rows; ++r) {                                                        \
        const T* xr = x + r * cols;                                                             \
        F m = -INFINITY;                                                                        \
        _Pragma("omp simd reduction(max:m)")                                                    \
        for (int64_t c = 0; c < cols; ++c) { F v = LOAD(xr[c]); m = v > m ? v : m; }           \
        double total = 0.0;                                                                     \
        for (int64_t c0 = 0; c0 < cols; c0 += 1024) {                                           \
            int64_t c1 = c0 + 1024 < cols ? c0 + 1024 : cols;                                   \
            F part = 0;                                                                         \
            _Pragma("omp simd reduction(+:part)")                                               \
            for (int64_t c = c0; c < c1; ++c) part += EXP(LOAD(xr[c]) - m);                     \
            total += part;                                                                      \
        }                                                                                       \
        F l = m + (F)LOG(total);                                                                \
        lse[r] = l;                                                                             \
        loss[r] = t[r] == ignore ? 0 : l - LOAD(xr[t[r]]);                                      \
    }                                                                                           \
}                                                                                               \
void ce_backward_##NAME(const T* x, const int64_t* t, const F* lse, T* dx, int64_t rows,         \
                        int64_t cols, int64_t ignore, F scale, int nthreads) {                  \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                          \
    for (int64_t r = 0; r < rows; ++r) {                                                        \
        const T* xr = x + r * cols; T* dr = dx + r * cols;                                      \
        F l = lse[r], s = t[r] == ignore ? 0 : scale;                                           \
        for (int64_t c = 0; c < cols; ++c) dr[c] = STORE(s * EXP(LOAD(xr[c]) - l));            \
        if (t[r] != ignore) dr[t[r]] = STORE(s * (EXP(LOAD(xr[t[r]]) - l) - 1));                \
    }                                                                                           \
}

DYT_KERNELS(f32, float, float, f32_load, f32_store, tanh_fwd, tanh_grad)
DYT_KERNELS(bf16, uint16_t, float, bf16_load, bf16_store, tanh_fwd, tanh_grad_bf16)
DYT_KERNELS(f64, double, double, f64_load, f64_store, tanh, tanh_grad_f64)
CE_KERNELS(f32, float, float, f32_load, f32_store, exp_nonpos, log)
CE_KERNELS(bf16, uint16_t, float, bf16_load, bf16_store, exp_nonpos, log)
CE_KERNELS(f64, double, double, f64_load, f64_store, exp_f64, log)
"""

_KERNEL_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float64: "f64"}
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]
_kernel_lock = threading.Lock()
_kernel_state: dict = {}


def _cache_dir() -> Path:
    root = os.environ.get("FMS_DYT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fms_dyt"
    )
    return Path(root)


def _machine_key() -> str:
    # -march=native code must not be reused on another CPU (e.g. a cache in a shared home directory).
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def _build_kernel() -> Optional[ctypes.CDLL]:
    if os.environ.get("FMS_DYT_CPU_KERNEL", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        warnings.warn("fms_dyt: no C compiler found; DyT on CPU uses the slower PyTorch formulation")
        return None
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, *_CFLAGS, "-lm", _machine_key()]).encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"dyt_cpu_{key}.so"
    if not lib_path.exists():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            src, out = Path(tmp) / "dyt_cpu.c", Path(tmp) / "dyt_cpu.so"
            src.write_text(_C_SOURCE)
            proc = subprocess.run([cc, *_CFLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                warnings.warn(
                    f"fms_dyt: compiling the DyT CPU kernel with {cc} failed; using the slower PyTorch "
                    f"formulation. Compiler output:\n{proc.stderr[-2000:]}"
                )
                return None
            os.replace(out, lib_path)  # atomic: concurrent ranks may build at once
    # torch has loaded its libgomp already, so the kernel shares torch's OpenMP thread pool.
    lib = ctypes.CDLL(str(lib_path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name, real in (("f32", ctypes.c_float), ("bf16", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(lib, f"dyt_forward_{name}").argtypes = [p, p, i64, i64, real, p, p, i32]
        getattr(lib, f"dyt_backward_{name}").argtypes = [p, p, p, i64, i64, real, p, i32, p, i32]
        getattr(lib, f"dyt_backward_{name}").restype = i32
        getattr(lib, f"ce_forward_{name}").argtypes = [p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"ce_backward_{name}").argtypes = [p, p, p, p, i64, i64, i64, real, i32]
    return lib


def cpu_kernel() -> Optional[ctypes.CDLL]:
    """The compiled CPU kernel library, building it on first use; None when unavailable."""
    if "lib" not in _kernel_state:
        with _kernel_lock:
            if "lib" not in _kernel_state:
                _kernel_state["lib"] = _build_kernel()
    return _kernel_state["lib"]


def _kernel_params(x, alpha, weight, bias):
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.detach().to(ct).contiguous()
    b = None if bias is None else bias.detach().to(ct).contiguous()
    return float(alpha.detach().reshape(())), w, b


def _cpu_forward(x, alpha, weight, bias):
    lib = cpu_kernel()
    if lib is None or x.dtype not in _KERNEL_DTYPES or x.numel() == 0:
        return _forward_math(x, alpha, weight, bias)
    x = x.contiguous()
    a, w, b = _kernel_params(x, alpha, weight, bias)
    y = torch.empty_like(x)
    cols = x.shape[-1]
    getattr(lib, f"dyt_forward_{_KERNEL_DTYPES[x.dtype]}")(
        x.data_ptr(), y.data_ptr(), x.numel() // cols, cols, a, w.data_ptr(),
        None if b is None else b.data_ptr(), torch.get_num_threads(),
    )
    return y


def _cpu_backward(grad_y, x, alpha, weight, has_bias):
    lib = cpu_kernel()
    if lib is None or x.dtype not in _KERNEL_DTYPES or x.numel() == 0:
        return _backward_math(grad_y, x, alpha, weight, has_bias)
    x, grad_y = x.contiguous(), grad_y.to(x.dtype).contiguous()
    a, w, _ = _kernel_params(x, alpha, weight, None)
    cols, threads = x.shape[-1], torch.get_num_threads()
    grad_x = torch.empty_like(x)
    partial = torch.zeros(threads, 3, cols, dtype=torch.float64)
    failed = getattr(lib, f"dyt_backward_{_KERNEL_DTYPES[x.dtype]}")(
        x.data_ptr(), grad_y.data_ptr(), grad_x.data_ptr(), x.numel() // cols, cols, a,
        w.data_ptr(), int(has_bias), partial.data_ptr(), threads,
    )
    if failed:
        raise MemoryError(f"fms_dyt: the DyT CPU kernel could not allocate 3 x {cols} accumulators")
    sums = partial.sum(0)
    grad_bias = sums[2] if has_bias else None
    return grad_x, sums[1].sum().reshape(alpha.shape), sums[0], grad_bias


# ---- the custom op: the CPU kernel as one opaque node for autograd and torch.compile ----------


def _define_ops():
    if hasattr(torch.ops.fms_dyt, "dyt"):  # ops.py imported twice (e.g. as exported remote code)
        return

    @torch.library.custom_op("fms_dyt::dyt", mutates_args=(), device_types="cpu")
    def dyt_op(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return _cpu_forward(x, alpha, weight, bias)

    @dyt_op.register_fake
    def _(x, alpha, weight, bias):
        return torch.empty_like(x)

    @torch.library.custom_op("fms_dyt::dyt_backward", mutates_args=(), device_types="cpu")
    def dyt_backward_op(
        grad_y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, has_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        gx, ga, gw, gb = _cpu_backward(grad_y, x, alpha, weight, has_bias)
        # Outputs of a custom op may not alias each other (the sums are views of one buffer),
        # nor be None.
        gb = weight.new_empty(0) if gb is None else gb.to(weight.dtype, copy=True)
        return gx, ga.to(alpha.dtype, copy=True), gw.to(weight.dtype, copy=True), gb

    @dyt_backward_op.register_fake
    def _(grad_y, x, alpha, weight, has_bias):
        gb = torch.empty_like(weight) if has_bias else weight.new_empty(0)
        return torch.empty_like(x), torch.empty_like(alpha), torch.empty_like(weight), gb

    def setup_context(ctx, inputs, output):
        x, alpha, weight, bias = inputs
        ctx.save_for_backward(x, alpha, weight)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_y):
        x, alpha, weight = ctx.saved_tensors
        gx, ga, gw, gb = torch.ops.fms_dyt.dyt_backward(grad_y, x, alpha, weight, ctx.has_bias)
        return gx, ga, gw, gb if ctx.has_bias else None

    dyt_op.register_autograd(backward, setup_context=setup_context)


_define_ops()


def dyt(
    x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """DyT over the last dimension of ``x``; ``alpha`` has one element. Output in x's dtype."""
    on_cpu = x.device.type == "cpu"
    if on_cpu and torch.compiler.is_compiling():
        return torch.ops.fms_dyt.dyt(x, alpha, weight, bias)  # opaque to dynamo: no graph break
    # Eager: the autograd function directly (the custom op's dispatch costs ~0.2 ms a call).
    return _DyTFunction.apply(x, alpha, weight, bias, on_cpu)


# ---- cross-entropy ----------------------------------------------------------------------------


class _CrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy by the CPU kernel: keeps the logits (the caller holds them anyway) and one
    fp32 log-sum-exp per row, instead of a [rows, vocab] fp32 log-softmax."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int):
        lib, name = cpu_kernel(), _KERNEL_DTYPES[logits.dtype]
        logits, targets = logits.contiguous(), targets.contiguous()
        rows, cols = logits.shape
        ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lse, loss_rows = torch.empty(rows, dtype=ct), torch.empty(rows, dtype=ct)
        getattr(lib, f"ce_forward_{name}")(
            logits.data_ptr(), targets.data_ptr(), lse.data_ptr(), loss_rows.data_ptr(), rows, cols,
            ignore_index, torch.get_num_threads(),
        )
        valid = int((targets != ignore_index).sum())
        ctx.save_for_backward(logits, targets, lse)
        ctx.valid, ctx.ignore_index = valid, ignore_index
        return (loss_rows.sum(dtype=torch.float64) / valid).to(ct)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        rows, cols = logits.shape
        getattr(cpu_kernel(), f"ce_backward_{_KERNEL_DTYPES[logits.dtype]}")(
            logits.data_ptr(), targets.data_ptr(), lse.data_ptr(), grad.data_ptr(), rows, cols,
            ctx.ignore_index, float(grad_loss) / ctx.valid, torch.get_num_threads(),
        )
        return grad, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [rows, vocab] against ``targets`` [rows], computed in fp32
    (fp64 stays fp64) whatever the logits' dtype: ``F.cross_entropy(logits.float(), targets)``.

    On CPU a one-pass kernel (forward: log-sum-exp per row; backward: softmax minus one-hot)
    replaces PyTorch's log-softmax + NLL, which write and keep a [rows, vocab] fp32 tensor.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy wants logits [rows, vocab] and targets [rows]; got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    use_kernel = (
        logits.device.type == "cpu" and logits.dtype in _KERNEL_DTYPES and targets.dtype == torch.int64
        and logits.numel() > 0 and not torch.compiler.is_compiling() and cpu_kernel() is not None
    )
    if not use_kernel:
        return F.cross_entropy(logits.to(_compute_dtype(logits)), targets, ignore_index=ignore_index)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= logits.shape[1]))
    if bad.any():
        raise IndexError(f"cross_entropy: target {int(targets[bad][0])} is outside the vocabulary [0, {logits.shape[1]})")
    return _CrossEntropyFunction.apply(logits, targets, ignore_index)
