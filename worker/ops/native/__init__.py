"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

Float32 kernels for where PyTorch's CPU path moves far more memory, or
spends far more time in dispatch, than the work needs:
  - `paged_attention.c`: decode attention that reads a paged KV cache in
    place (PyTorch gathers each sequence's blocks into a dense copy first,
    which moves the cache three times per decode step);
  - `moe_experts.c`: a layer's routed experts in one call, straight from the
    router's choices, on weights laid out once in panels (`pack_experts`) or
    in the checkpoint layout (the library path runs two GEMMs per expert, at
    a handful of rows each in a decode step); its dot-product tile
    also serves the dense projections of small decode batches (`linear`)
    and the router's logits (`route`, with the softmax and top-k);
  - `layer_ops.c`: RMSNorm with the residual add, and rotary embedding with
    the KV cache write, each one call instead of tens of small operators.
They are plain C with OpenMP, AVX-512 intrinsics where the CPU has them
(`simd.h`), AVX2 forms of the panel and dot-product tiles (experts, dense
projections, the router) on CPUs with AVX2 and FMA only, and portable loops
elsewhere, built here rather than at install
time so that they are tuned for the CPU they run on (`-march=native`) and
the package stays pure Python.

The build is cached under `$MOEMESH_CACHE_DIR/native` (default
`~/.cache/moemesh/native`), keyed by the source, the compiler, the flags and
the CPU, and written atomically so that concurrent workers share it. Where no
compiler is found or the build fails, `load_kernels` returns no library, with
the reason, and the operations (worker/ops) choose their other backends at
load; `MOEMESH_NATIVE_KERNELS=0` turns the kernels off.

The library links the OpenMP runtime by its soname, `libgomp.so.1`. PyTorch
(imported first, here) has already loaded its own copy under that soname,
so the dynamic loader binds the kernels to it: one thread pool for both,
rather than two pools fighting over the same cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCES = ("paged_attention.c", "moe_experts.c", "layer_ops.c")
HEADERS = ("simd.h",)
# -ffast-math lets the compiler vectorize reductions and call glibc's vector expf. It is a compile
# flag only: linked with it, gcc adds a start-up routine that flushes subnormal floats to zero for
# the whole process (every thread, PyTorch included), so the library is linked in a second step.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
LINK_FLAGS = ("-shared", "-fopenmp", "-lm")


@dataclass(frozen=True)
class Kernels:
    """The loaded library, or why there is none."""

    library: ctypes.CDLL | None
    reason: str = ""  # why `library` is None

    @property
    def available(self) -> bool:
        return self.library is not None


def _cpu_identity() -> str:
    """What `-march=native` depends on: the machine and, on Linux, the CPU model and flags."""
    parts = [platform.machine()]
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                parts.append(line)
            if len(parts) == 3:
                break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("MOEMESH_CACHE_DIR") or pathlib.Path.home() / ".cache" / "moemesh"
    return pathlib.Path(root) / "native"


def build_library(compiler: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Compile the kernels (or reuse a cached build); returns the shared library's path."""
    here = pathlib.Path(__file__).resolve().parent
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256()
    sources = [(here / name).read_bytes() for name in SOURCES + HEADERS]
    for part in (*sources, version, " ".join(COMPILE_FLAGS + LINK_FLAGS), _cpu_identity()):
        digest.update(part if isinstance(part, bytes) else part.encode())
    target = out_dir / digest.hexdigest()[:20] / "libmoemesh_kernels.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        objects = []
        for source in SOURCES:
            objects.append(str(pathlib.Path(work) / f"{source}.o"))
            _run([compiler, *COMPILE_FLAGS, "-c", str(here / source), "-o", objects[-1]])
        partial = pathlib.Path(work) / target.name
        _run([compiler, *objects, "-o", str(partial), *LINK_FLAGS])
        os.replace(partial, target)  # atomic: a concurrent build of the same key is harmless
    return target


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = library.moemesh_paged_decode_attention
    fn.argtypes = [ptr] * 6 + [i64] * 8 + [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = library.moemesh_moe_experts
    fn.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = library.moemesh_linear
    fn.argtypes = [ptr, i64, ptr, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = library.moemesh_route
    fn.argtypes = [ptr, i64, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, ptr, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = library.moemesh_split_routing
    fn.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr]
    fn.restype = ctypes.c_int
    fn = library.moemesh_map_held
    fn.argtypes = [ptr, i64, i64, ptr, i64, ptr]
    fn.restype = ctypes.c_int
    fn = library.moemesh_rms_norm
    fn.argtypes = [ptr] * 5 + [i64, i64, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = library.moemesh_rotary_store
    fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64, ctypes.c_int]
    fn.restype = ctypes.c_int


@functools.cache
def load_kernels() -> Kernels:
    """The native kernels for this process, built on first call; never raises."""
    if os.environ.get("MOEMESH_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return Kernels(None, "turned off by MOEMESH_NATIVE_KERNELS")
    if platform.system() != "Linux":
        return Kernels(None, f"native kernels are built on Linux only, not {platform.system()}")
    compiler = _compiler()
    if compiler is None:
        return Kernels(None, "no C compiler found (set CC, or install gcc)")
    try:
        path = build_library(compiler, _cache_dir())
        library = ctypes.CDLL(str(path))
        _declare(library)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("native CPU kernels unavailable, using the PyTorch path: %s", exc)
        return Kernels(None, str(exc))
    log.info("native CPU kernels loaded from %s", path)
    return Kernels(library)


def kernels_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the native kernels handle tensors of `dtype` on `device`: float32 on the CPU, with the kernels loaded."""
    return device.type == "cpu" and dtype == torch.float32 and load_kernels().available


_scratch = threading.local()


def _scratch_floats(count: int) -> torch.Tensor:
    """A float32 work buffer of at least `count` elements, kept per thread and reused across calls.

    Fresh large buffers come from the OS page by page: for a 2,048-token prefill chunk the experts' work
    buffer is 32 MB, and faulting it in on every call cost about a quarter of the kernel's time.
    """
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < count:
        buffer = _scratch.buffer = torch.empty(max(count, 2 * (0 if buffer is None else buffer.numel())))
    return buffer[:count]


def _library() -> ctypes.CDLL:
    kernels = load_kernels()
    if kernels.library is None:
        raise RuntimeError(f"native kernels unavailable: {kernels.reason}")
    return kernels.library


def paged_decode_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """One query per sequence attending to its cached keys: q [B, nh, D] -> [B, nh, D].

    cache_k, cache_v [num_blocks, block_size, n_kv, D]; block_tables [B, nb]
    int64; seq_lens [B] int64 (keys [0, seq_len), the query at seq_len - 1);
    `window` limits each query to its last `window` keys.
    """
    library = _library()
    B, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = cache_k.shape
    if num_heads % num_kv_heads or cache_k.shape != cache_v.shape or cache_k.shape[3] != head_dim:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, cache {tuple(cache_k.shape)}")
    q, tables, lens = q.contiguous(), block_tables.contiguous(), seq_lens.contiguous()
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    if q.dtype != torch.float32 or cache_k.dtype != torch.float32 or cache_v.dtype != torch.float32:
        raise ValueError(f"the kernel reads float32 only: q {q.dtype}, cache {cache_k.dtype}")
    if tables.dtype != torch.int64 or lens.dtype != torch.int64 or tables.shape[0] != B or lens.shape != (B,):
        raise ValueError("block_tables [B, nb] and seq_lens [B] must be int64")
    out = torch.empty_like(q)
    failed = library.moemesh_paged_decode_attention(
        q.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
        B, num_heads, num_kv_heads, head_dim, block_size, tables.shape[1], num_blocks, window or 0, head_dim**-0.5,
        torch.get_num_threads(),
    )
    if failed == 2:
        raise ValueError(f"a sequence length or block id is out of range ({num_blocks} blocks of {block_size})")
    if failed:
        raise MemoryError("paged decode attention could not allocate its scratch memory")
    return out


def experts_packable(hidden_size: int, intermediate_size: int) -> bool:
    """Whether experts of these sizes can take the panel layout of `pack_experts`."""
    return hidden_size % 32 == 0 and intermediate_size % 16 == 0 and hidden_size > 0 and intermediate_size > 0


def pack_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay the experts out in panels for `moe_experts`: (p13 [E, I/16, H, 32], p2 [E, H/32, I, 32]).

    Panel p of p13 holds, for each of the H inputs, the gate weights of
    intermediate columns [16p, 16p + 16) and then their up weights; panel p of
    p2 the down weights of output columns [32p, 32p + 32). The copies hold the
    same values; `unpack_experts` gives back the checkpoint layout.
    """
    E, I2, H = w13.shape
    inter = I2 // 2
    if w2.shape != (E, H, inter) or not experts_packable(H, inter):
        raise ValueError(f"experts of shapes w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} cannot be packed "
                         "(the hidden size must be a multiple of 32 and the intermediate size of 16)")
    gate = w13[:, :inter].reshape(E, inter // 16, 16, H)
    up = w13[:, inter:].reshape(E, inter // 16, 16, H)
    p13 = torch.cat([gate, up], dim=2).transpose(2, 3).contiguous()
    p2 = w2.reshape(E, H // 32, 32, inter).transpose(2, 3).contiguous()
    return p13, p2


def unpack_experts(p13: torch.Tensor, p2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint layout (w13 [E, 2I, H], w2 [E, H, I]) of panels made by `pack_experts`."""
    E, panels, H, _ = p13.shape
    inter = panels * 16
    columns = p13.transpose(2, 3)  # [E, I/16, 32, H]
    w13 = torch.cat([columns[:, :, :16].reshape(E, inter, H), columns[:, :, 16:].reshape(E, inter, H)], dim=1)
    w2 = p2.transpose(2, 3).reshape(E, H, inter)
    return w13.contiguous(), w2.contiguous()


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_ids: Iterable[int] | None = None,
) -> torch.Tensor:
    """The weighted sum of each token's experts, in one native call: x [T, H] -> [T, H].

    topk_ids [T, k] and topk_weights [T, k] are the router's choices (an id of
    -1 is a choice not taken: its row has fewer than k). The
    weights are either as the checkpoint has them, w13 [E, 2I, H] (each
    expert's gate then up rows) and w2 [E, H, I], or the panels of
    `pack_experts` (p13 [E, I/16, H, 32], p2 [E, H/32, I, 32]), which the
    kernel reads faster. With `expert_ids`, only those experts contribute.
    """
    library = _library()
    T, H = x.shape
    packed = w13.dim() == 4
    if packed:
        E, inter = w13.shape[0], w13.shape[1] * 16
        expected = ((E, inter // 16, H, 32), (E, H // 32, inter, 32))
    else:
        E, inter = w13.shape[0], w13.shape[1] // 2
        expected = ((E, 2 * inter, H), (E, H, inter))
    if (tuple(w13.shape), tuple(w2.shape)) != expected or (packed and H % 32) or topk_ids.shape != topk_weights.shape \
            or topk_ids.shape[0] != T:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, topk {tuple(topk_ids.shape)}, "
                         f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    ids, weights = topk_ids.to(torch.int64).contiguous(), topk_weights.to(torch.float32).contiguous()
    wanted = None
    if expert_ids is not None:
        chosen = {int(e) for e in expert_ids}
        wanted = torch.tensor([e in chosen for e in range(E)], dtype=torch.uint8)
    scratch = _scratch_floats(max(ids.numel(), 1) * 2 * inter)
    out = torch.empty_like(x)
    failed = library.moemesh_moe_experts(
        x.data_ptr(), T, ids.data_ptr(), weights.data_ptr(), ids.shape[1], None if wanted is None else wanted.data_ptr(),
        E, w13.data_ptr(), w2.data_ptr(), H, inter, scratch.data_ptr(), out.data_ptr(), int(packed),
        torch.get_num_threads(),
    )
    if failed == 2:
        raise ValueError(f"topk_ids must name experts in [0, {E}) or be -1")
    if failed:
        raise MemoryError("the experts kernel could not allocate its working memory")
    return out


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """A projection's weight [out, in] in panels for `linear`: [out / 32, in, 32], panel p holding output
    columns [32p, 32p + 32) for each input. out must be a multiple of 32."""
    out_features, in_features = weight.shape
    if out_features % 32 or not out_features:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} cannot be packed: out_features must be a multiple of 32")
    return weight.reshape(out_features // 32, 32, in_features).transpose(1, 2).contiguous()


def unpack_linear(panels: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] of panels made by `pack_linear` ([out / 32, in, 32])."""
    count, in_features, width = panels.shape
    return panels.transpose(1, 2).reshape(count * width, in_features)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in one native call: x [..., in] -> [..., out].

    weight is [out, in], or its panels from `pack_linear` ([out / 32, in, 32]),
    which the kernel reads faster (1.1x at 8 to 64 rows).
    """
    library = _library()
    packed = weight.dim() == 3
    if packed:
        out_features, in_features = weight.shape[0] * weight.shape[2], weight.shape[1]
        ok = weight.shape[2] == 32
    else:
        (out_features, in_features), ok = weight.shape, True
    if x.shape[-1] != in_features or not ok:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    rows, weight = x.reshape(-1, in_features).contiguous(), weight.contiguous()
    out = x.new_empty(rows.shape[0], out_features)
    if rows.shape[0]:
        library.moemesh_linear(rows.data_ptr(), rows.shape[0], weight.data_ptr(), in_features, out_features, out.data_ptr(),
                               int(packed), torch.get_num_threads())
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], out_features)


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An MoE router in one native call: softmax(x @ weight.T) and its top-k.

    x [T, H], weight [E, H] -> (topk_ids [T, k] int64, topk_weights [T, k]
    float32), highest first, the weights rescaled to sum to 1 when `renormalize`.
    """
    library = _library()
    T, H = x.shape
    E = weight.shape[0]
    if weight.shape != (E, H):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, router weight {tuple(weight.shape)}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    x, weight = x.contiguous(), weight.contiguous()
    probs = x.new_empty(T, E)
    ids = torch.empty(T, top_k, dtype=torch.int64)
    weights = x.new_empty(T, top_k)
    if T:
        library.moemesh_route(x.data_ptr(), T, weight.data_ptr(), E, H, top_k, int(renormalize), probs.data_ptr(),
                              ids.data_ptr(), weights.data_ptr(), torch.get_num_threads())
    return ids, weights


_split_buffers = threading.local()


def split_routing(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, owner_of: torch.Tensor, wanted: torch.Tensor | None,
    ranks: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """A layer's routing split by the rank holding each chosen expert, in one native call.

    topk_ids [T, k] (int64, CPU), topk_weights [T, k] (float32, CPU),
    owner_of [E] (int64: each expert's rank, -1 for none), wanted [E] (uint8:
    0 leaves the choice out) or None. Returns host arrays rows [R * T] (int64),
    ids [R * T * k] (int32), weights [R * T * k] (float32) and, flat, per rank
    [n, width, choices]: rank r's tokens are rows[r * T:][:n], and their
    choices on r, in router order then -1 (weight 0), are ids[r * T * k:]
    [:n * width] viewed [n, width] (weights likewise).

    The arrays are this thread's work buffers, reused by its next call: a
    layer consumes them before the next layer splits (a decode step's split
    is a few microseconds, which fresh buffers would double).
    """
    library = _library()
    T, k = topk_ids.shape
    E = owner_of.shape[0]
    if topk_ids.dtype != torch.int64 or topk_weights.dtype != torch.float32 or topk_weights.shape != (T, k) \
            or owner_of.dtype != torch.int64 or owner_of.dim() != 1 \
            or (wanted is not None and (wanted.dtype != torch.uint8 or wanted.shape != (E,))):
        raise ValueError(f"split_routing takes int64 ids and owners, float32 weights and a uint8 mask of the "
                         f"experts, got {topk_ids.dtype} {tuple(topk_ids.shape)}, {topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}, {owner_of.dtype} {tuple(owner_of.shape)}"
                         + ("" if wanted is None else f", {wanted.dtype} {tuple(wanted.shape)}"))
    topk_ids, topk_weights, owner_of = topk_ids.contiguous(), topk_weights.contiguous(), owner_of.contiguous()
    buffers = getattr(_split_buffers, "arrays", None)
    if buffers is None or buffers[0].size < ranks * T * k or buffers[3].size < 3 * ranks:
        size = max(ranks * T * k, 2 * (0 if buffers is None else buffers[0].size))
        counts = max(3 * ranks, 0 if buffers is None else buffers[3].size)
        buffers = _split_buffers.arrays = (np.empty(size, dtype=np.int32), np.empty(size, dtype=np.float32),
                                           np.empty(size, dtype=np.int64), np.empty(counts, dtype=np.int64),
                                           np.empty(counts, dtype=np.int64))
        _split_buffers.pointers = tuple(array.ctypes.data for array in buffers)
    ids, weights, rows, counts, _ = buffers
    p_ids, p_weights, p_rows, p_counts, p_work = _split_buffers.pointers
    status = library.moemesh_split_routing(topk_ids.data_ptr(), topk_weights.data_ptr(), T, k, owner_of.data_ptr(),
                                           None if wanted is None else wanted.data_ptr(), E, ranks, p_rows, p_ids,
                                           p_weights, p_counts, p_work)
    if status:
        raise ValueError(f"topk_ids: an expert id outside [0, {E}), or an owner outside [-1, {ranks})")
    return rows, ids, weights, counts[:3 * ranks].tolist()


def map_held(ids: np.ndarray, rows_of: np.ndarray) -> np.ndarray | None:
    """A shard's choices as rows of its held weights, in one native call: ids [n, k] (int32, global expert ids,
    each row's valid ones first, -1 after) through rows_of [E] (int64, -1: not held) -> [n, k] int64, -1 kept.
    None when the ids are not for these weights (an id out of range or not held, a row without a first choice,
    a valid choice after a -1)."""
    library = _library()
    if ids.dtype != np.int32 or ids.ndim != 2 or rows_of.dtype != np.int64 or rows_of.ndim != 1:
        raise ValueError(f"map_held takes int32 ids [n, k] and int64 rows [E], got {ids.dtype} {ids.shape} and "
                         f"{rows_of.dtype} {rows_of.shape}")
    ids, rows_of = np.ascontiguousarray(ids), np.ascontiguousarray(rows_of)
    out = np.empty(ids.shape, dtype=np.int64)
    failed = library.moemesh_map_held(ids.ctypes.data, ids.shape[0], ids.shape[1], rows_of.ctypes.data,
                                      rows_of.shape[0], out.ctypes.data)
    return None if failed else out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., D] by weight [D] in one native call.

    With `residual`, the norm is of x + residual, and the call returns
    (normed, x + residual): the residual add of a decoder layer and the
    next norm in one pass.
    """
    library = _library()
    dim = weight.shape[0]
    if x.shape[-1] != dim or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
                         + ("" if residual is None else f", residual {tuple(residual.shape)}"))
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    summed = None if residual is None else torch.empty_like(x)
    rows = x.numel() // dim if dim else 0
    if rows:
        library.moemesh_rms_norm(
            x.data_ptr(), None if residual is None else residual.contiguous().data_ptr(),
            None if summed is None else summed.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, dim, eps,
            torch.get_num_threads(),
        )
    return out if summed is None else (out, summed)


def rotary_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
) -> torch.Tensor:
    """Rotary embedding of q and k with the cache write, in one native call; returns the rotated q.

    q [N, nh, D], k and v [N, n_kv, D] (each token's heads contiguous; rows
    may be views into a fused qkv output); cos, sin [N, D]; slots [N] int64
    flat cache positions. The rotated k and v are stored at `slots` in
    cache_k and cache_v ([num_blocks, block_size, n_kv, D]), as
    `PagedKVCache.write` does. Returns the rotated q [N, nh, D], contiguous.
    """
    library = _library()
    N, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if (k.shape != (N, num_kv_heads, head_dim) or v.shape != k.shape or cos.shape != (N, head_dim)
            or sin.shape != cos.shape or slots.shape != (N,) or cache_k.shape[2:] != (num_kv_heads, head_dim)
            or cache_v.shape != cache_k.shape or head_dim % 2):
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"cos {tuple(cos.shape)}, slots {tuple(slots.shape)}, cache {tuple(cache_k.shape)}")
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    f32 = torch.float32
    if q.dtype != f32 or k.dtype != f32 or v.dtype != f32 or cache_k.dtype != f32 or cache_v.dtype != f32:
        raise ValueError(f"the kernel writes float32 only: q {q.dtype}, cache {cache_k.dtype}")
    q, k, v = (t if t.stride()[1:] == (head_dim, 1) else t.contiguous() for t in (q, k, v))
    cos, sin, slots = cos.contiguous(), sin.contiguous(), slots.to(torch.int64).contiguous()
    out = torch.empty(N, num_heads, head_dim, dtype=q.dtype)
    num_slots = cache_k.shape[0] * cache_k.shape[1]
    failed = library.moemesh_rotary_store(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(), sin.data_ptr(),
        slots.data_ptr(), N, num_heads, num_kv_heads, head_dim, out.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(),
        num_slots, torch.get_num_threads(),
    )
    if failed:
        raise ValueError(f"a cache slot is out of range [0, {num_slots})")
    return out
