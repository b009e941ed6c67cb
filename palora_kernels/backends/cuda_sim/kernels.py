"""Kernels of the ``cuda_sim`` backend: the CUDA kernels of csrc/cuda/*.cuh run on CPU tensors
under the host emulator of the CUDA execution model (csrc/emu/emu.h). Tests only: slow by design.

The same .cuh source that nvcc compiles into palora_kernels._C is compiled here by g++ with
-DPALORA_EMU into a small shared library (no torch header, a few seconds) and called through
ctypes with the tensors' data pointers and strides. ``PALORA_BACKEND=cuda_sim`` then runs the
whole autograd path (forward and dX) through the emulated kernels.

Every call also checks what the kernels wrote: y and H start as a sentinel NaN inside guard
bands, so an element the kernels forgot keeps the sentinel's bit pattern and a write outside an
output shows up in its guard band.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..._ops import conv_memory_format, conv_out_size
from . import RECORD

CSRC = Path(__file__).resolve().parents[3] / "csrc"
_SOURCES = ("emu/emu.h", "emu/emu_capi.cpp", "cuda/palora_cuda.h", "cuda/common.cuh",
            "cuda/lora_gemm.cuh", "cuda/lora_mm.cuh", "cuda/lora_conv2d.cuh", "cuda/pref_grad.cuh",
            "cuda/conv_dgrad.cuh", "cuda/conv_wgrad.cuh", "cuda/mtlora_mm.cuh",
            "emu/selftest.cuh")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_GUARD = 64                                   # sentinel elements on each side of an output
SCHEDULES = {"forward": 0, "reverse": 1, "shuffle": 2}


class LoraMMArgs(ctypes.Structure):           # mirrors palora::LoraMMArgs (csrc/cuda/palora_cuda.h)
    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "wm", "bias", "down", "up", "pref", "y", "h")]
                + [(n, ctypes.c_int64) for n in (
                    "dtype", "N", "K", "M", "R", "P", "T", "rows_per_sample",
                    "stride_xn", "stride_xk", "stride_wk", "stride_wm", "stride_bias",
                    "stride_dk", "stride_dr", "stride_ur", "stride_um", "stride_pp", "stride_pt",
                    "stride_yn", "stride_yc", "stride_hn", "stride_hc")]
                + [("scale", ctypes.c_double)])


class LoraConvArgs(ctypes.Structure):         # mirrors palora::LoraConvArgs
    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "weight", "down", "bias", "up", "pref", "y", "h")]
                + [(n, ctypes.c_int64) for n in (
                    "dtype", "N", "C_in", "H", "W", "C_out", "R", "kh", "kw", "P", "T",
                    "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "Ho", "Wo",
                    "stride_xn", "stride_xc", "stride_xh", "stride_xw",
                    "stride_bias", "stride_uc", "stride_ur", "stride_pp", "stride_pt",
                    "stride_yn", "stride_yp", "stride_yc", "stride_hn", "stride_hp", "stride_hc")]
                + [("scale", ctypes.c_double)])


class LoraConvDgradArgs(ctypes.Structure):    # mirrors palora::LoraConvDgradArgs
    _fields_ = ([(n, ctypes.c_void_p) for n in ("dy", "weight", "down", "up", "pref", "dx", "dg")]
                + [(n, ctypes.c_int64) for n in (
                    "dtype", "N", "C_in", "H", "W", "C_out", "R", "kh", "kw", "P", "T",
                    "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "Ho", "Wo",
                    "stride_dyn", "stride_dyc", "stride_dyh", "stride_dyw",
                    "stride_uc", "stride_ur", "stride_pp", "stride_pt",
                    "stride_xn", "stride_xp", "stride_xc", "stride_gn", "stride_gp", "stride_gc")]
                + [("scale", ctypes.c_double)])


class PrefGradArgs(ctypes.Structure):         # mirrors palora::PrefGradArgs
    _fields_ = ([(n, ctypes.c_void_p) for n in ("h", "dg", "partial", "out")]
                + [(n, ctypes.c_int64) for n in (
                    "dtype", "N", "R", "T", "rank", "P", "rows_per_sample",
                    "stride_hn", "stride_hc", "stride_gn", "stride_gc", "hw", "stride_hp", "stride_gp")]
                + [("scale", ctypes.c_double)])


class LoraConvWgradArgs(ctypes.Structure):    # mirrors palora::LoraConvWgradArgs
    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "dy", "dg", "pref", "workspace", "dw", "da")]
                + [(n, ctypes.c_int64) for n in (
                    "dtype", "N", "C_in", "H", "W", "C_out", "R", "kh", "kw", "P", "T",
                    "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "Ho", "Wo",
                    "stride_xn", "stride_xc", "stride_xh", "stride_xw",
                    "stride_dyn", "stride_dyc", "stride_dyh", "stride_dyw",
                    "stride_gn", "stride_gc", "stride_gh", "stride_gw", "stride_pp", "stride_pt",
                    "need_weight", "splits")]
                + [("scale", ctypes.c_double)])


_MT_MAX = 32                                  # palora::kMTLoraMaxAdapters


class MTLoraMMArgs(ctypes.Structure):         # mirrors palora::MTLoraMMArgs
    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "xs", "weight", "bias", "A", "B", "scales", "y", "h", "work")]
                + [(n, ctypes.c_int64) for n in ("dtype", "N", "K", "M", "G", "T1", "n_xs", "s2t")]
                + [("ranks", ctypes.c_int64 * _MT_MAX)]
                + [(n, ctypes.c_int64) for n in (
                    "stride_xn", "stride_xk", "stride_xsn", "stride_xsk", "stride_wm", "stride_wk", "stride_bias",
                    "stride_ar", "stride_ak", "stride_bm", "stride_br", "stride_yo", "stride_yn", "stride_ym",
                    "stride_hn", "seed", "offset")]
                + [("p", ctypes.c_double)])


class MTLoraDgradArgs(ctypes.Structure):      # mirrors palora::MTLoraDgradArgs
    _fields_ = ([(n, ctypes.c_void_p) for n in ("dys", "dbase", "weight", "A", "B", "col_scales", "dx", "dxs", "dg",
                                                "work")]
                + [(n, ctypes.c_int64) for n in ("dtype", "N", "K", "M", "G", "T1", "n_xs", "s2t", "need_x")]
                + [("ranks", ctypes.c_int64 * _MT_MAX)]
                + [(n, ctypes.c_int64) for n in (
                    "stride_dyn", "stride_dym", "stride_wm", "stride_wk", "stride_ar", "stride_ak", "stride_bm",
                    "stride_br", "stride_dxn", "stride_dxso", "stride_dxsn", "stride_gn", "seed", "offset")]
                + [("p", ctypes.c_double)])


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def _cache_dir() -> Path:
    return Path(os.environ.get("PALORA_EMU_CACHE", Path(tempfile.gettempdir()) / "palora_emu"))


_libs: dict = {}
_lock = threading.Lock()


def build(defines: Sequence[str] = ()) -> ctypes.CDLL:
    """Compile (once per source hash and defines) and load the emulated kernels.

    defines: extra -D macros, e.g. ("PALORA_BREAK_BARRIER",) or ("PALORA_BREAK_CPASYNC_WAIT",) for
    the deliberate race tests."""
    key = tuple(sorted(defines))
    with _lock:
        if key in _libs:
            return _libs[key]
        cxx = _compiler()
        if cxx is None:
            raise RuntimeError("cuda_sim needs a C++ compiler (g++ or $CXX) on PATH")
        h = hashlib.sha256()
        for rel in _SOURCES:
            h.update((CSRC / rel).read_bytes())
        flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-DPALORA_EMU", f"-I{CSRC}"]
        flags += [f"-D{d}" for d in key]
        h.update(" ".join([cxx] + flags).encode())
        out = _cache_dir() / f"libpalora_emu_{h.hexdigest()[:16]}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            cmd = [cxx, *flags, str(CSRC / "emu" / "emu_capi.cpp"), "-o", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
            os.replace(tmp, out)                  # atomic: concurrent builders agree
        lib = ctypes.CDLL(str(out))
        for fn, argt in (("palora_emu_lora_mm", LoraMMArgs), ("palora_emu_lora_conv2d", LoraConvArgs),
                         ("palora_emu_pref_grad", PrefGradArgs), ("palora_emu_lora_conv2d_dgrad", LoraConvDgradArgs),
                         ("palora_emu_lora_conv2d_wgrad", LoraConvWgradArgs), ("palora_emu_mtlora_mm", MTLoraMMArgs),
                         ("palora_emu_mtlora_mm_dgrad", MTLoraDgradArgs)):
            getattr(lib, fn).argtypes = [ctypes.POINTER(argt)]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.palora_emu_pref_grad_workspace.argtypes = [ctypes.POINTER(PrefGradArgs)]
        lib.palora_emu_pref_grad_workspace.restype = ctypes.c_longlong
        lib.palora_emu_lora_conv2d_wgrad_workspace.argtypes = [ctypes.POINTER(LoraConvWgradArgs)]
        lib.palora_emu_lora_conv2d_wgrad_workspace.restype = ctypes.c_longlong
        lib.palora_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        lib.palora_emu_stats.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
        lib.palora_emu_barrier_broken.restype = ctypes.c_int
        lib.palora_emu_cpasync_wait_broken.restype = ctypes.c_int
        lib.palora_emu_async_copies.restype = ctypes.c_longlong
        lib.palora_emu_selftest.argtypes = [ctypes.c_int, ctypes.c_void_p]
        lib.palora_emu_selftest.restype = ctypes.c_char_p
        _libs[key] = lib
        return lib


def set_schedule(lib: ctypes.CDLL, name: str, seed: int = 0) -> None:
    """The order fibers run between barriers (per OS thread): forward, reverse or shuffle."""
    lib.palora_emu_set_schedule(SCHEDULES[name], seed)


def stats(lib: ctypes.CDLL) -> dict:
    """Counters of the calling OS thread: launches, blocks, barriers released, fiber switches,
    cp.async copies."""
    buf = (ctypes.c_longlong * 4)()
    lib.palora_emu_stats(buf)
    out = dict(zip(("launches", "blocks", "barriers", "switches"), buf))
    out["async_copies"] = lib.palora_emu_async_copies()   # 16-byte cp.async copies issued
    return out


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name}: cuda_sim runs on CPU tensors, got device {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (x's), got {t.dtype}")


# The sentinel: a NaN with a payload no arithmetic produces (NaN results carry the default payload),
# so an inf or NaN in the inputs, propagated by the kernels, is not mistaken for a missed store.
_SENTINEL_BITS = {torch.float32: (torch.int32, 0x7FC0BEEF), torch.float16: (torch.int16, 0x7E5A),
                  torch.bfloat16: (torch.int16, 0x7FDA)}


def _guarded(shape, strides, dtype):
    """An output with the given strides inside a buffer of sentinels with guard bands on both sides."""
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
    ity, bits = _SENTINEL_BITS[dtype]
    buf = torch.full((span + 2 * _GUARD,), bits, dtype=ity).view(dtype)
    return buf, buf[_GUARD:].as_strided(shape, strides)


def _unwritten(t: torch.Tensor) -> torch.Tensor:
    ity, bits = _SENTINEL_BITS[t.dtype]
    return t.view(ity) == bits


def _verify_output(buf: torch.Tensor, out: torch.Tensor, op: str, name: str) -> None:
    if not (_unwritten(buf[:_GUARD]).all() and _unwritten(buf[-_GUARD:]).all()):
        raise RuntimeError(f"{op}: the emulated kernels wrote outside {name} (guard band changed)")
    missed = _unwritten(out)
    if missed.any():
        bad = missed.nonzero()[:4].tolist()
        raise RuntimeError(f"{op}: {name} holds the unwritten sentinel at {bad}...: elements never stored")


def _run(lib, fn: str, args) -> None:
    err = getattr(lib, fn)(ctypes.byref(args))
    if err is not None:
        raise RuntimeError(f"{fn}: {err.decode()}")


def lora_mm_sim(x, wm, bias, down, up, pref, rows_per_sample, scale, lib=None, verify=True):
    """(y, H) of palora::lora_mm via the emulated kernels (the layout of the cuda backend)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: cuda_sim supports float32, float16, bfloat16, got {x.dtype}")
    for name, t in (("x", x), ("wm", wm), ("down", down), ("up", up)) + ((("bias", bias),) if bias is not None else ()):
        _check(name, t, x.dtype)
    lib = lib or build()
    N, K = x.shape
    M, R = wm.shape[1], down.shape[1]
    pref32 = pref.float()
    ybuf, y = _guarded((N, M), (M, 1), x.dtype)
    hbuf, h = _guarded((N, R), (RECORD.h_row_stride(R), 1), x.dtype)
    a = LoraMMArgs(
        x=_ptr(x), wm=_ptr(wm), bias=_ptr(bias), down=_ptr(down), up=_ptr(up), pref=_ptr(pref32),
        y=_ptr(y), h=_ptr(h), dtype=_DTYPES[x.dtype], N=N, K=K, M=M, R=R, P=pref.shape[0], T=pref.shape[1],
        rows_per_sample=rows_per_sample,
        stride_xn=x.stride(0), stride_xk=x.stride(1), stride_wk=wm.stride(0), stride_wm=wm.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0,
        stride_dk=down.stride(0), stride_dr=down.stride(1), stride_ur=up.stride(0), stride_um=up.stride(1),
        stride_pp=pref32.stride(0), stride_pt=pref32.stride(1), stride_yn=y.stride(0), stride_yc=y.stride(1),
        stride_hn=h.stride(0), stride_hc=h.stride(1), scale=float(scale))
    _run(lib, "palora_emu_lora_mm", a)
    if verify:
        _verify_output(ybuf, y, "lora_mm", "y")
        _verify_output(hbuf, h, "lora_mm", "H")
    return y, h


def _conv_strides(N, C, Ho, Wo, fmt):
    if fmt == torch.channels_last:
        return (Ho * Wo * C, 1, Wo * C, C)
    return (C * Ho * Wo, Ho * Wo, Wo, 1)


def lora_conv2d_sim(x, weight, down, bias, up, pref, stride, padding, dilation, scale, lib=None, verify=True):
    """(y, H) of palora::lora_conv2d via the emulated kernels (the layout of the cuda backend)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: cuda_sim supports float32, float16, bfloat16, got {x.dtype}")
    for name, t in (("x", x), ("weight", weight), ("down", down), ("up", up)) + (
            (("bias", bias),) if bias is not None else ()):
        _check(name, t, x.dtype)
    lib = lib or build()
    weight, down = weight.contiguous(), down.contiguous()
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    R = down.shape[0]
    Ho = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    fmt = conv_memory_format(x)
    pref32 = pref.float()
    ybuf, y = _guarded((N, C_out, Ho, Wo), _conv_strides(N, C_out, Ho, Wo, fmt), x.dtype)
    hbuf, h = _guarded((N, R, Ho, Wo), _conv_strides(N, R, Ho, Wo, fmt), x.dtype)
    a = LoraConvArgs(
        x=_ptr(x), weight=_ptr(weight), down=_ptr(down), bias=_ptr(bias), up=_ptr(up), pref=_ptr(pref32),
        y=_ptr(y), h=_ptr(h), dtype=_DTYPES[x.dtype], N=N, C_in=C_in, H=H, W=W, C_out=C_out, R=R, kh=kh, kw=kw,
        P=pref.shape[0], T=pref.shape[1], stride_h=stride[0], stride_w=stride[1], pad_h=padding[0],
        pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1], Ho=Ho, Wo=Wo,
        stride_xn=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2), stride_xw=x.stride(3),
        stride_bias=bias.stride(0) if bias is not None else 0, stride_uc=up.stride(0), stride_ur=up.stride(1),
        stride_pp=pref32.stride(0), stride_pt=pref32.stride(1),
        stride_yn=y.stride(0), stride_yp=y.stride(3), stride_yc=y.stride(1),
        stride_hn=h.stride(0), stride_hp=h.stride(3), stride_hc=h.stride(1), scale=float(scale))
    _run(lib, "palora_emu_lora_conv2d", a)
    if verify:
        _verify_output(ybuf, y, "lora_conv2d", "y")
        _verify_output(hbuf, h, "lora_conv2d", "H")
    return y, h


def lora_conv2d_dgrad_sim(dy, weight, down, up, pref, x_hw, stride, padding, dilation, scale, lib=None, verify=True):
    """(dX, dG) of palora::lora_conv2d_dgrad via the emulated kernels (the layout of the cuda backend)."""
    if dy.dtype not in _DTYPES:
        raise TypeError(f"dy: cuda_sim supports float32, float16, bfloat16, got {dy.dtype}")
    for name, t in (("dy", dy), ("weight", weight), ("down", down), ("up", up)):
        _check(name, t, dy.dtype)
    lib = lib or build()
    weight, down = weight.contiguous(), down.contiguous()
    N, C_out, Ho, Wo = dy.shape
    _, C_in, kh, kw = weight.shape
    R = down.shape[0]
    H, W = x_hw
    fmt = conv_memory_format(dy)
    pref32 = pref.float()
    xbuf, dx = _guarded((N, C_in, H, W), _conv_strides(N, C_in, H, W, fmt), dy.dtype)
    gbuf, dg = _guarded((N, R, Ho, Wo), _conv_strides(N, R, Ho, Wo, fmt), dy.dtype)
    a = LoraConvDgradArgs(
        dy=_ptr(dy), weight=_ptr(weight), down=_ptr(down), up=_ptr(up), pref=_ptr(pref32), dx=_ptr(dx), dg=_ptr(dg),
        dtype=_DTYPES[dy.dtype], N=N, C_in=C_in, H=H, W=W, C_out=C_out, R=R, kh=kh, kw=kw, P=pref.shape[0],
        T=pref.shape[1], stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1],
        dil_h=dilation[0], dil_w=dilation[1], Ho=Ho, Wo=Wo,
        stride_dyn=dy.stride(0), stride_dyc=dy.stride(1), stride_dyh=dy.stride(2), stride_dyw=dy.stride(3),
        stride_uc=up.stride(0), stride_ur=up.stride(1), stride_pp=pref32.stride(0), stride_pt=pref32.stride(1),
        stride_xn=dx.stride(0), stride_xp=dx.stride(3), stride_xc=dx.stride(1),
        stride_gn=dg.stride(0), stride_gp=dg.stride(3), stride_gc=dg.stride(1), scale=float(scale))
    _run(lib, "palora_emu_lora_conv2d_dgrad", a)
    if verify:
        _verify_output(xbuf, dx, "lora_conv2d_dgrad", "dX")
        _verify_output(gbuf, dg, "lora_conv2d_dgrad", "dG")
    return dx, dg


def _pixel_rows(t: torch.Tensor):
    """(N, R, Ho, Wo) -> (t, stride of an image, of a channel, of a pixel): the kernel walks pixel
    q = ho*Wo + wo at q * stride, which needs dense pixels (NCHW or NHWC); other strides are copied."""
    if t.shape[2] > 1 and t.stride(2) != t.shape[3] * t.stride(3):
        t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(3)


def pref_grad_sim(h, dg, pref, rows_per_sample, rank, scale, lib=None):
    """dp (P, T) in pref's dtype via the emulated pref_grad kernels (the cuda backend's).
    h, dg: (N, R), or the conv's (N, R, Ho, Wo) whose N*Ho*Wo pixels are the rows."""
    if h.dtype not in _DTYPES:
        raise TypeError(f"h: cuda_sim supports float32, float16, bfloat16, got {h.dtype}")
    _check("h", h, h.dtype)
    _check("dg", dg, h.dtype)
    if h.dim() not in (2, 4) or dg.shape != h.shape:
        raise ValueError(f"pref_grad: h and dg: expected (N, R) or (N, R, Ho, Wo) of one shape, got "
                         f"{tuple(h.shape)} and {tuple(dg.shape)}")
    lib = lib or build()
    if h.dim() == 4:
        hw = h.shape[2] * h.shape[3]
        (h, shn, shc, shp), (dg, sgn, sgc, sgp) = _pixel_rows(h), _pixel_rows(dg)
    else:
        hw, (shn, shc, shp), (sgn, sgc, sgp) = 1, (h.stride(0), h.stride(1), 0), (dg.stride(0), dg.stride(1), 0)
    N, R = h.shape[0] * hw, h.shape[1]
    P, T = pref.shape
    out = torch.full((P, T), float("nan"))             # every element must be written
    a = PrefGradArgs(h=_ptr(h), dg=_ptr(dg), partial=None, out=_ptr(out), dtype=_DTYPES[h.dtype], N=N, R=R, T=T,
                     rank=rank, P=P, rows_per_sample=rows_per_sample, stride_hn=shn, stride_hc=shc,
                     stride_gn=sgn, stride_gc=sgc, hw=hw, stride_hp=shp, stride_gp=sgp, scale=float(scale))
    partial = torch.full((max(int(lib.palora_emu_pref_grad_workspace(ctypes.byref(a))), 1),), float("nan"))
    a.partial = _ptr(partial)
    _run(lib, "palora_emu_pref_grad", a)
    if out.isnan().any() and not (h.isnan().any() or dg.isnan().any()):
        raise RuntimeError("pref_grad: the emulated kernels left elements of dp unwritten")
    return out.to(pref.dtype)


def lora_conv2d_wgrad_sim(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight, lib=None,
                          verify=True, splits=0):
    """(dW, dA_cat) of palora::lora_conv2d_wgrad via the emulated kernels (the layout of the cuda backend),
    both contiguous; dW has 0 rows without need_weight. splits > 0 forces the number of pixel chunks
    (0: the kernel's choice)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: cuda_sim supports float32, float16, bfloat16, got {x.dtype}")
    for name, t in (("x", x), ("dy", dy), ("dg", dg)):
        _check(name, t, x.dtype)
    lib = lib or build()
    N, C_in, H, W = x.shape
    C_out, R, (Ho, Wo), (kh, kw) = dy.shape[1], dg.shape[1], dy.shape[2:], kernel_hw
    Cw = C_out if need_weight else 0
    pref32 = pref.float()
    strides = (C_in * kh * kw, kh * kw, kw, 1)
    wbuf, dw = _guarded((Cw, C_in, kh, kw), strides, x.dtype)
    abuf, da = _guarded((R, C_in, kh, kw), strides, x.dtype)
    a = LoraConvWgradArgs(
        x=_ptr(x), dy=_ptr(dy), dg=_ptr(dg), pref=_ptr(pref32), workspace=None, dw=_ptr(dw) if Cw else None,
        da=_ptr(da), dtype=_DTYPES[x.dtype],
        N=N, C_in=C_in, H=H, W=W, C_out=C_out, R=R, kh=kh, kw=kw, P=pref.shape[0], T=pref.shape[1],
        stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0],
        dil_w=dilation[1], Ho=Ho, Wo=Wo,
        stride_xn=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2), stride_xw=x.stride(3),
        stride_dyn=dy.stride(0), stride_dyc=dy.stride(1), stride_dyh=dy.stride(2), stride_dyw=dy.stride(3),
        stride_gn=dg.stride(0), stride_gc=dg.stride(1), stride_gh=dg.stride(2), stride_gw=dg.stride(3),
        stride_pp=pref32.stride(0), stride_pt=pref32.stride(1), need_weight=int(bool(need_weight)), splits=splits,
        scale=float(scale))
    # NaN: a partial tile element the kernel forgot poisons dW or dA
    ws = torch.full((max(int(lib.palora_emu_lora_conv2d_wgrad_workspace(ctypes.byref(a))), 1),), float("nan"))
    a.workspace = _ptr(ws)
    _run(lib, "palora_emu_lora_conv2d_wgrad", a)
    if verify:
        _verify_output(wbuf, dw, "lora_conv2d_wgrad", "dW")
        _verify_output(abuf, da, "lora_conv2d_wgrad", "dA")
    return dw, da


def wgrad_splits(lib, x, dy, dg, kernel_hw, need_weight, splits=0) -> int:
    """The number of pixel chunks the wgrad kernel uses for these sizes (tests)."""
    a = LoraConvWgradArgs(N=x.shape[0], C_in=x.shape[1], C_out=dy.shape[1], R=dg.shape[1], kh=kernel_hw[0],
                          kw=kernel_hw[1], Ho=dy.shape[2], Wo=dy.shape[3], need_weight=int(bool(need_weight)),
                          splits=splits)
    Mz = (dy.shape[1] if need_weight else 0) + dg.shape[1]
    return int(lib.palora_emu_lora_conv2d_wgrad_workspace(ctypes.byref(a))) // (Mz * x.shape[1] * kernel_hw[0] * kernel_hw[1])


def _ranks_array(ranks):
    if not 1 <= len(ranks) <= _MT_MAX:
        raise ValueError(f"ranks: cuda_sim runs 1 .. {_MT_MAX} adapters, got {len(ranks)}")
    return (ctypes.c_int64 * _MT_MAX)(*ranks)


def _pointers(ts):
    return (ctypes.c_void_p * max(len(ts), 1))(*[t.data_ptr() for t in ts])


def mtlora_mm_sim(x, xs, weight, bias, A, B, ranks, scales, groups, shared_to_tasks, p=0.0, seed=0, offset=0, lib=None,
                  verify=True):
    """(Y, H) of palora::mtlora_mm via the emulated kernels (the layout of the cuda backend); p > 0: LoRA
    dropout in the kernels (the workspace of dropped x starts as NaN, so an unwritten element shows)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: cuda_sim supports float32, float16, bfloat16, got {x.dtype}")
    for name, t in ([("x", x), ("weight", weight), ("A", A), ("B", B)] + [(f"xs[{i}]", t) for i, t in enumerate(xs)]
                    + ([("bias", bias)] if bias is not None else [])):
        _check(name, t, x.dtype)
    lib = lib or build()
    xs = [t.contiguous() for t in xs]            # one set of strides for every task input
    N, K = x.shape
    M, T1, GR = weight.shape[0], len(ranks), A.shape[0]
    s32 = scales.float().contiguous()
    ybuf, y = _guarded((T1, N, M), (N * M, M, 1), x.dtype)
    hbuf, h = _guarded((N, GR), (RECORD.h_row_stride(GR), 1), x.dtype)
    xp = _pointers(xs)
    work = torch.full((groups * N * K if p > 0 else 1,), float("nan"), dtype=x.dtype)
    a = MTLoraMMArgs(
        x=_ptr(x), xs=ctypes.cast(xp, ctypes.c_void_p).value if xs else None, weight=_ptr(weight), bias=_ptr(bias),
        A=_ptr(A), B=_ptr(B), scales=_ptr(s32), y=_ptr(y), h=_ptr(h), dtype=_DTYPES[x.dtype], N=N, K=K, M=M,
        G=groups, T1=T1, n_xs=len(xs), s2t=int(bool(shared_to_tasks)), ranks=_ranks_array(ranks),
        stride_xn=x.stride(0), stride_xk=x.stride(1), stride_xsn=xs[0].stride(0) if xs else 0,
        stride_xsk=xs[0].stride(1) if xs else 0, stride_wm=weight.stride(0), stride_wk=weight.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0, stride_ar=A.stride(0), stride_ak=A.stride(1),
        stride_bm=B.stride(0), stride_br=B.stride(1), stride_yo=y.stride(0), stride_yn=y.stride(1),
        stride_ym=y.stride(2), stride_hn=h.stride(0), work=_ptr(work) if p > 0 else None, seed=seed, offset=offset,
        p=float(p))
    _run(lib, "palora_emu_mtlora_mm", a)
    if verify:
        _verify_output(ybuf, y, "mtlora_mm", "Y")
        _verify_output(hbuf, h, "mtlora_mm", "H")
    return y, h


def mtlora_mm_dgrad_sim(dys, dbase, weight, A, B, ranks, col_scales, groups, shared_to_tasks, need_x, n_xs, p=0.0,
                        seed=0, offset=0, lib=None, verify=True):
    """(dX, dXs, dG) of palora::mtlora_mm_dgrad via the emulated kernels, from contiguous dys, their sum dbase
    (or None when neither need_x nor shared_to_tasks) and the column scale rows (cuda/mtlora.py); p > 0: the
    mask of x regenerated in the kernels (its workspace starts as NaN, as in mtlora_mm_sim)."""
    d0 = dys[0]
    if d0.dtype not in _DTYPES:
        raise TypeError(f"dys[0]: cuda_sim supports float32, float16, bfloat16, got {d0.dtype}")
    for name, t in ([(f"dys[{i}]", t) for i, t in enumerate(dys)] + [("weight", weight), ("A", A), ("B", B)]
                    + ([("dbase", dbase)] if dbase is not None else [])):
        _check(name, t, d0.dtype)
        if name.startswith("d") and t.stride() != d0.stride():
            raise ValueError(f"{name}: expected the strides of dys[0] {d0.stride()}, got {t.stride()}")
    lib = lib or build()
    N, M = d0.shape
    K, T1, GR = weight.shape[1], len(ranks), A.shape[0]
    cs = col_scales.float().contiguous()
    nx = N if need_x else 0
    xbuf, dx = _guarded((nx, K), (K, 1), d0.dtype)
    sbuf, dxs = _guarded((n_xs if need_x else 0, N, K), (N * K, K, 1), d0.dtype)
    gbuf, dg = _guarded((N, GR), (GR, 1), d0.dtype)
    dp = _pointers(dys)
    work = torch.full((N * K if p > 0 and need_x else 1,), float("nan"), dtype=d0.dtype)
    a = MTLoraDgradArgs(
        dys=ctypes.cast(dp, ctypes.c_void_p).value, dbase=_ptr(dbase), weight=_ptr(weight), A=_ptr(A), B=_ptr(B),
        col_scales=_ptr(cs), dx=_ptr(dx) if need_x else None, dxs=_ptr(dxs) if need_x and n_xs else None,
        dg=_ptr(dg), dtype=_DTYPES[d0.dtype], N=N, K=K, M=M, G=groups, T1=T1, n_xs=n_xs,
        s2t=int(bool(shared_to_tasks)), need_x=int(bool(need_x)), ranks=_ranks_array(ranks),
        stride_dyn=d0.stride(0), stride_dym=d0.stride(1), stride_wm=weight.stride(0), stride_wk=weight.stride(1),
        stride_ar=A.stride(0), stride_ak=A.stride(1), stride_bm=B.stride(0), stride_br=B.stride(1),
        stride_dxn=K, stride_dxso=N * K, stride_dxsn=K, stride_gn=dg.stride(0),
        work=_ptr(work) if p > 0 and need_x else None, seed=seed, offset=offset, p=float(p))
    _run(lib, "palora_emu_mtlora_mm_dgrad", a)
    if verify:
        _verify_output(xbuf, dx, "mtlora_mm_dgrad", "dX")
        _verify_output(sbuf, dxs, "mtlora_mm_dgrad", "dXs")
        _verify_output(gbuf, dg, "mtlora_mm_dgrad", "dG")
    return dx, dxs, dg


def unavailable_reason() -> Optional[str]:
    if _compiler() is None:
        return "no C++ compiler (g++ or $CXX) on PATH"
    if not (CSRC / "emu" / "emu_capi.cpp").exists():
        return f"the kernel sources are not there ({CSRC}); cuda_sim needs a source checkout"
    return None


def lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale):
    return lora_mm_sim(x, wm, bias, down, up, pref, rows_per_sample, scale)


def lora_conv2d(x, weight, down, bias, up, pref, stride, padding, dilation, scale):
    return lora_conv2d_sim(x, weight, down, bias, up, pref, stride, padding, dilation, scale)


def lora_conv2d_dgrad(dy, weight, down, up, pref, x_hw, stride, padding, dilation, scale):
    return lora_conv2d_dgrad_sim(dy, weight, down, up, pref, x_hw, stride, padding, dilation, scale)


def lora_conv2d_wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight):
    return lora_conv2d_wgrad_sim(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight)


def pref_grad(h, dg, pref, rows_per_sample, rank, scale):
    return pref_grad_sim(h, dg, pref, rows_per_sample, rank, scale)


def lora_conv2d_pref_grad(h, dg, pref, rank, scale):
    """dp (P, T) of the conv: h, dg (N, R, Ho, Wo), P == 1 or N."""
    return pref_grad_sim(h, dg, pref, h.shape[2] * h.shape[3], rank, scale)


def mtlora_mm(x, xs, weight, bias, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset):
    return mtlora_mm_sim(x, list(xs), weight, bias, A, B, list(ranks), scales, groups, shared_to_tasks, p, seed, offset)


def mtlora_mm_dgrad(dys, x, xs, weight, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset, need_x,
                    need_base):
    from ..cuda.mtlora import dgrad_inputs
    dys, dbase, cs = dgrad_inputs(dys, ranks, scales, groups, xs, shared_to_tasks, need_x, need_base)
    dx, dxs, dg = mtlora_mm_dgrad_sim(dys, dbase, weight, A, B, list(ranks), cs, groups, shared_to_tasks, need_x,
                                      len(xs), p, seed, offset)
    return dx, dxs, (dbase if need_base else dys[0].new_empty((0, dys[0].shape[1]))), dg
