"""One timer for every measurement: CUDA events with the L2 cache flushed before each
call on a GPU, perf_counter on the CPU; warm-up, then the median of repeats."""

from __future__ import annotations

import datetime as _dt
import gc
import platform
import statistics
import time

import torch

# Written before each timed call so that no operand is still in L2 (50 MiB on H100 / H200):
# a kernel is timed reading HBM, as it does inside a whole forward.
L2_FLUSH_BYTES = 256 << 20


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


class Timer:
    """Times `fn()` on `device`: {"median_ms", "min_ms", "max_ms", "repeats"}.

    On a GPU it holds one L2_FLUSH_BYTES buffer (allocated here, so that it counts in
    neither the allocator's peak of what is timed nor its mallocs: `flush_bytes`).

    `soak_s`: on a GPU, call `fn` back to back for this many seconds before the timed repeats,
    so that every call is timed at the clocks sustained work settles at. Without it a call
    that follows an idle moment runs boosted: on an H200 one 8192^3 GEMM measured 763 TFLOP/s
    from idle and 664-690 under load (results/gemm_shapes_h200.json), and the same rank
    measured up to 10% apart between runs (results/interleaved_h200.json)."""

    def __init__(self, device, *, warmup: int = 2, repeats: int = 10, flush_l2: bool = True,
                 soak_s: float = 0.0):
        self.device, self.warmup, self.repeats = torch.device(device), warmup, repeats
        self.soak_s = soak_s
        self._flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=self.device)
                       if flush_l2 and is_cuda(self.device) else None)

    @property
    def flush_bytes(self) -> int:
        return 0 if self._flush is None else self._flush.numel()

    def __call__(self, fn, *, warmup: int | None = None, repeats: int | None = None) -> dict:
        warmup = self.warmup if warmup is None else warmup
        repeats = self.repeats if repeats is None else repeats
        for _ in range(warmup):
            fn()
        sync(self.device)
        if self.soak_s > 0 and is_cuda(self.device):
            end = time.perf_counter() + self.soak_s
            while time.perf_counter() < end:
                fn()
                sync(self.device)
        times = []
        for _ in range(repeats):
            if is_cuda(self.device):
                if self._flush is not None:
                    self._flush.zero_()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times),
                "max_ms": max(times), "repeats": repeats}


def device_info(device) -> dict:
    """Device name, torch / CUDA / cuDNN versions and the date, for a results file."""
    device = torch.device(device)
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device=p.name, sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})")
    return info


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def cuda_graphed(fn, device) -> tuple:
    """(replay, None): `fn` captured as one CUDA graph after two warm-up calls on a side stream
    (one-time allocations, such as a stub's gather buffers, stay out of the graph); or
    (None, why) on the CPU or when capture fails, to be timed eagerly (the benchmarks record
    which)."""
    if not is_cuda(device):
        return None, "CPU: eager"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, None
    except RuntimeError as e:   # noqa: BLE001  (recorded: timed eagerly)
        why = str(e).splitlines()[0][:300]
        print(f"  CUDA graph capture failed, timing eagerly: {why}", flush=True)
        torch.cuda.synchronize()
        return None, why


def loop_seconds(fn, iters: int, warmup: int, device) -> float:
    """Seconds per call of `fn()` over `iters` back-to-back calls after `warmup` (on a GPU, CUDA
    events around the whole loop: for steps of microseconds, where `Timer`'s per-call events
    would time the launch gaps)."""
    for _ in range(warmup):
        fn()
    if is_cuda(device):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters
