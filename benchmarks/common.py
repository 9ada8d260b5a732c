"""Shared helpers of the benchmark scripts: environment, timing, peak memory, tables, JSON.

Import this before anything that imports DeepSpeed: without CUDA it sets DS_ACCELERATOR=cpu and
the other offline switches (as the Makefile and tests/conftest.py do).

Peak memory of one call (`peak_memory`) is the most memory the call itself allocated at once,
above what was allocated when it started:
  cuda: torch.cuda.max_memory_allocated() - memory_allocated() at the start (peak stats reset);
  cpu : torch.profiler with profile_memory=True, the maximum of the profiler's running
        "Total Allocated" count over the call's [memory] events.  The count starts at 0 with the
        profiler, so it holds only tensors allocated during the call (frees of older tensors are
        not subtracted: an upper bound where the call frees memory it did not allocate).
        Also on Linux, `peak_rss_bytes`: the rise of the process's peak resident set (VmHWM, reset
        through /proc/self/clear_refs) over its resident set at the start, in a separate call without
        the profiler.  It counts only touched pages (an allocation that is never written costs
        nothing) and misses memory malloc reuses from earlier frees, so it is a lower bound.
tracemalloc does not see torch's allocations, so it is not used.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import re
import statistics
import tempfile
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
for _key, _value in (("WANDB_MODE", "disabled"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

MIB = 2 ** 20


def default_out(name: str) -> str:
    return f"bench_out/{name}.json"


def base_parser(doc: str, name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out(name), help="JSON result file (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return parser


def apply_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def machine() -> dict:
    """What the numbers depend on, recorded next to them: device, versions, threads and the load average."""
    import importlib.metadata as md
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg_1_5_15": list(os.getloadavg()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for name in ("deepspeed", "megatron-core"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def device_kind() -> str:
    """The machine's kind for result file names: h100 or h200 from the CUDA device's name, another GPU's name in
    lower-case letters, digits and '_', or cpu without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return next((kind for kind in ("h200", "h100") if kind in name), re.sub(r"[^a-z0-9]+", "_", name).strip("_"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device: torch.device) -> tuple[object, float, float]:
    """(fn(), wall seconds, CPU seconds of this process: all its threads, not time spent waiting for a core)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def time_interleaved(fns: dict, device: torch.device, iters: int, warmup: int = 1) -> dict:
    """Per name: wall and CPU seconds of fns[name]() after `warmup` untimed calls each.  The calls take turns
    (a, b, c, a, b, c, ...), so a change in machine load during the run falls on every function alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    walls = {name: [] for name in fns}
    cpus = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            _, wall, cpu = time_once(fn, device)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return {name: {"median_s": statistics.median(walls[name]), "min_s": min(walls[name]), "all_s": walls[name],
                   "cpu_median_s": statistics.median(cpus[name])} for name in fns}


def time_ms(fn, device: torch.device, iters: int, warmup: int = 2) -> dict:
    """Median and min wall time of fn() in ms (CUDA events on GPU, perf_counter on CPU), after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Largest absolute and relative (Frobenius) error of out against ref, in float64; whether out is finite."""
    out, ref = out.detach().double(), ref.detach().double()
    diff = out - ref
    return {"max_abs": float(diff.abs().max()), "rel": float(diff.norm() / ref.norm()),
            "finite": bool(torch.isfinite(out).all())}


def _rss_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where /proc does not allow it."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(fn, device: torch.device) -> tuple[object, dict]:
    """(fn(), {"peak_bytes", "method", ...}): the most memory fn allocated at once (module docstring).
    On CPU fn runs twice: once for the resident-set peak (where /proc allows it), once under the profiler."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, {"peak_bytes": torch.cuda.max_memory_allocated(device) - before,
                        "peak_total_bytes": torch.cuda.max_memory_allocated(device),
                        "method": "torch.cuda.max_memory_allocated - memory_allocated before"}
    from torch.profiler import ProfilerActivity, profile
    rss_peak = None
    if _reset_rss_peak():
        rss_before = _rss_kib("VmRSS")
        fn()
        rss_peak = max(0, _rss_kib("VmHWM") - rss_before) * 1024
        gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = pathlib.Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return result, {"peak_bytes": max(totals, default=0), "peak_rss_bytes": rss_peak,
                    "method": "torch.profiler(profile_memory=True): max running 'Total Allocated' of the call"}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str = "") -> str:
    """columns: (key, header, format spec); a missing or None value prints as '-'.  Returns the text."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    left = [spec == "s" for _, _, spec in columns]          # text left-aligned, numbers right-aligned
    lines = [title] if title else []
    for n, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if l else c.rjust(w) for c, w, l in zip(line, widths, left)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | os.PathLike, payload: dict) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":          # `python benchmarks/common.py`: the kind, for gpu_run.sh's file names
    print(device_kind())
