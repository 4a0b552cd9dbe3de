"""``gpuq``: the command line installed with the wheel.

    gpuq info                  versions, the CUDA driver and its devices, NVRTC, the CCCL headers
                               and the CUBIN cache: what the GPU path needs, and what is missing
    gpuq demo [ARGS]           the example queue (examples/producer_consumer.py, shipped inside the
                               wheel) with a progress bar; ``gpuq demo --help`` lists its arguments
    gpuq bench [--messages N]  64 B round trip, one message at a time: the queue side by side with a
                               kernel launch per message (BatchProcessor), in one run; --json PATH
                               saves the figures.  The full benchmarks are the scripts in benchmarks/
                               of a source checkout (docs in benchmarks/NOTES.md).
    gpuq cache [--clear]       where the CUBIN cache is, its entries and size; --clear empties it

Exit status: 0 done; 1 a check failed (a demo message lost or wrong); 2 usage, or the GPU path
cannot run here (no driver or device, NVRTC or CCCL missing), with one line saying why.
Progress bars and tables come from ``rich``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
EXAMPLES = _HERE / "examples" if (_HERE / "examples").is_dir() else _HERE.parent / "examples"
"""The example scripts: ``gpuq_driver/examples`` inside a wheel, ``<repo>/examples`` in a checkout."""


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def gpu_report() -> tuple[list[tuple[str, str]], str | None]:
    """``(rows, problem)``: (what, value) rows about the GPU path, and the first reason it cannot run
    here (None when it can).  Makes no CUDA call beyond cuInit and device queries."""
    from . import __version__, compiler, driver, hostpath
    from .errors import GpuqError

    rows = [
        ("gpuq_driver", __version__),
        ("Python", platform.python_version()),
        ("numpy", np.__version__),
        ("cuda-bindings", _version("cuda-bindings")),
        ("redis-py", _version("redis")),
    ]
    problem = None
    try:
        rows.append(("CUDA driver", "{}.{}".format(*divmod(driver.driver_version() // 10, 100))))
        for i in range(driver.device_count()):
            d = driver.device_info(i)
            rows.append(
                (
                    f"device {i}",
                    f"{d.name}, {d.arch}, {d.sm_count} SMs, cooperative launch {'yes' if d.cooperative else 'NO'}",
                )
            )
    except GpuqError as exc:
        problem = (
            f"no usable CUDA GPU ({getattr(exc, 'text', exc)}); QueueConfig(backend='sim') and "
            "`gpuq demo --backend sim` run on the CPU simulator"
        )
        rows.append(("CUDA driver / devices", "none usable"))
    try:
        rows.append(("NVRTC", "{}.{}".format(*compiler.nvrtc_version())))
    except Exception as exc:  # the library missing, or not loadable
        problem = problem or f"NVRTC not usable ({type(exc).__name__}: {exc}): pip install nvidia-cuda-nvrtc"
        rows.append(("NVRTC", "not usable"))
    try:
        rows.append(("CCCL headers", compiler.include_dirs()[1]))
    except GpuqError as exc:
        problem = problem or str(exc)
        rows.append(("CCCL headers", "not found"))
    try:  # only precompiled plugins (Plugin.from_object) need it: its absence is no problem
        rows.append(("nvJitLink", compiler.nvjitlink_info() + " (links precompiled plugins)"))
    except GpuqError:
        rows.append(("nvJitLink", "not found: only precompiled plugins need it (pip install 'gpuq-driver[link]')"))
    try:  # enqueue and the take in C where a compiler and Python's headers are found (hostpath.py)
        host, mode = hostpath.status(), hostpath.mode()
        if host != "compiled" and mode == "compiled":
            host += " (GPUQ_HOST_PATH=compiled: a GpuQueue here raises GpuqError)"
        elif host != "compiled" and mode == "auto":
            host += " (the Python methods run: install a C compiler and python3-dev for the compiled ones)"
    except GpuqError as exc:  # a bad GPUQ_HOST_PATH: a GpuQueue raises it too
        host = str(exc)
    rows.append(("host path", host))
    rows.append(("kernel sources", str(compiler.DEVICE_SRC)))
    rows.append(("plugins", ", ".join(compiler.plugins())))
    folder = compiler.cache_dir()
    entries = compiler.cache_entries(folder) if folder is not None else []
    rows.append(
        (
            "CUBIN cache",
            "off (GPUQ_CACHE_DIR)"
            if folder is None
            else f"{folder}: {len(entries)} entries, {sum(p.stat().st_size for p in entries) / 1e6:.1f} MB",
        )
    )
    return rows, problem


def cmd_info(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    rows, problem = gpu_report()
    table = Table(title="gpuq_driver", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths whole, on a narrow terminal or through a pipe
    for what, value in rows:
        table.add_row(escape(what), escape(value))  # "[link]" is text, not rich markup
    console = _console()
    console.print(table)
    if problem:
        console.print(f"[bold]the GPU path cannot run here:[/bold] {escape(problem)}")
        return 2
    console.print("ready: `gpuq demo` runs the example queue on GPU 0")
    return 0


def cmd_cache(args) -> int:
    from . import compiler

    folder = compiler.cache_dir()
    if folder is None:
        print("the CUBIN cache is off (GPUQ_CACHE_DIR is empty, 0, off, none or false)")
        return 0
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        print(f"gpuq cache: {blocker} is not a folder, so nothing is cached (check GPUQ_CACHE_DIR)", file=sys.stderr)
        return 2
    entries = compiler.cache_entries(folder)
    size = sum(p.stat().st_size for p in entries)
    if args.clear:
        for p in entries:
            p.unlink(missing_ok=True)
        print(f"{folder}: removed {len(entries)} entries ({size / 1e6:.1f} MB)")
    else:
        print(f"{folder}: {len(entries)} entries, {size / 1e6:.1f} MB")
    return 0


def _load_example(name: str):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gpuq_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cmd_demo(argv: list[str]) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    example, console = _load_example("producer_consumer"), _console()
    if not console.is_terminal:  # a log or a pipe: the example's own progress lines, no bar
        return example.main(argv, prog="gpuq demo")
    columns = (TextColumn("messages"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, console=console) as bar:
        task = bar.add_task("demo", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return example.main(argv, progress=progress, prog="gpuq demo")


def _round_trips(send_and_wait, n: int, bar, task) -> np.ndarray:
    out = np.empty(n, np.int64)
    clock = time.perf_counter_ns
    for i in range(n):
        t = clock()
        send_and_wait()
        out[i] = clock() - t
        if i % 256 == 0:
            bar.update(task, completed=i)
    bar.update(task, completed=n)
    return out / 1e3


def cmd_bench(args) -> int:
    from rich.progress import Progress
    from rich.table import Table

    from .batch import BatchProcessor
    from .errors import CudaUnavailable
    from .queue import GpuQueue, QueueConfig

    payload = bytes(range(64))
    n, warm = args.messages, max(100, args.messages // 10)
    results = {}
    try:
        with Progress(console=_console(), transient=True) as bar:
            # The baseline first: its module load must not wait behind a running queue kernel.
            with BatchProcessor(slot_bytes=64, max_batch=1, backend="cuda") as bp:
                task = bar.add_task("launch per message", total=n)
                for _ in range(warm):
                    bp.process([payload])
                results["launch per message (H2D copy, launch, D2H copy, sync)"] = _round_trips(
                    lambda: bp.process([payload]), n, bar, task
                )
            with GpuQueue(QueueConfig(capacity=64, slot_bytes=64)) as q:
                task = bar.add_task("gpuq queue", total=n)

                def one():
                    q.wait_result(q.enqueue(payload))

                for _ in range(warm):
                    one()
                results["gpuq queue (enqueue, wait_result)"] = _round_trips(one, n, bar, task)
    except CudaUnavailable as exc:
        print(f"gpuq bench: needs an NVIDIA GPU with its driver; none usable here ({exc.text})", file=sys.stderr)
        return 2
    table = Table(title=f"64 B round trip, one message at a time, {n:,} each (µs)")
    for col in ("path", "p50", "p99", "mean"):
        table.add_column(col, justify="left" if col == "path" else "right")
    summary = {}
    for name, us in results.items():
        p50, p99 = np.percentile(us, [50, 99])
        summary[name] = {"p50_us": float(p50), "p99_us": float(p99), "mean_us": float(us.mean()), "n": n}
        table.add_row(name, f"{p50:.2f}", f"{p99:.2f}", f"{us.mean():.2f}")
    _console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": dict(gpu_report()[0]), "round_trip_64B": summary}, indent=2))
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpuq`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="gpuq",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, NVRTC, CCCL headers, CUBIN cache")
    sub.add_parser("demo", help="the example queue with a progress bar (gpuq demo --help)", add_help=False)
    bench = sub.add_parser("bench", help="64 B round trip: the queue beside a launch per message")
    bench.add_argument("--messages", type=int, default=20_000, help="round trips per path (default 20,000)")
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    cache = sub.add_parser("cache", help="the CUBIN cache: where, entries, size")
    cache.add_argument("--clear", action="store_true", help="remove every cached CUBIN")
    if argv[:1] == ["demo"]:  # the example parses its own arguments (and --help)
        return cmd_demo(argv[1:])
    args = ap.parse_args(argv)
    if args.command == "bench" and not 100 <= args.messages <= 10_000_000:
        bench.error(f"--messages {args.messages}: 100 .. 10,000,000 round trips")
    return {"info": cmd_info, "bench": cmd_bench, "cache": cmd_cache}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
