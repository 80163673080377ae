"""Run every benchmark and print markdown tables: ``python -m bench [--quick]``.

Sections: overhead (Lightning vs plain PyTorch), balancers (every method and mode, growth with
the number of tasks), adapters (parameters, FLOPs, step time, MoE experts and top-k), decoders
(parameters, FLOPs, step time and memory of every decoder config), data (loader throughput
against the training step rate), memory (peak of a step per balancer and adapter), gpu (bf16
ViT throughput and share of peak; skipped without CUDA). Machine-dependent figures are ratios
measured in the same run; timings are medians after warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.table import Table


def _overhead(quick: bool) -> list[Table]:
    from bench import overhead

    return [overhead.overhead_table(overhead.Settings.quick() if quick else overhead.Settings())]


def _balancers(quick: bool) -> list[Table]:
    from bench import balancers

    settings = balancers.Settings.quick() if quick else balancers.Settings()
    return [balancers.method_table(settings), balancers.growth_table(settings)]


def _adapters(quick: bool) -> list[Table]:
    from bench import adapters

    settings = adapters.Settings.quick() if quick else adapters.Settings()
    return [
        adapters.cost_table(settings),
        adapters.moe_table(settings),
        adapters.extraction_table(settings),
    ]


def _decoders(quick: bool) -> list[Table]:
    from bench import decoders

    return [decoders.cost_table(decoders.Settings.small() if quick else decoders.Settings())]


def _data(quick: bool) -> list[Table]:
    from bench import data

    settings = data.Settings.quick() if quick else data.Settings()
    tables = [] if quick else [data.pipeline_table(settings)]
    return [*tables, data.loader_table(settings)]


def _memory(quick: bool) -> list[Table]:
    from bench import memory

    return memory.tables_in_subprocess(quick)


def _gpu(quick: bool) -> list[Table]:
    from bench import gpu

    return [gpu.gpu_table(gpu.Settings.quick() if quick else gpu.Settings())]


#: Section name -> the function returning its tables (memory runs in a fresh process).
SECTIONS: dict[str, Callable[[bool], list[Table]]] = {
    "overhead": _overhead,
    "balancers": _balancers,
    "adapters": _adapters,
    "decoders": _decoders,
    "data": _data,
    "gpu": _gpu,
    "memory": _memory,
}


def machine() -> str:
    """CPU model, cores, threads, load, torch version and GPU of this machine, one line."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {gpu}, load average {load}"
    )


def run(sections: list[str], quick: bool, emit: Callable[[str], None] = print) -> list[Table]:
    """Run the named sections in order, emitting each table as soon as it is measured."""
    tables = []
    for name in sections:
        start = time.perf_counter()
        for table in SECTIONS[name](quick):
            emit(table.markdown())
            tables.append(table)
        emit(f"_{name}: {time.perf_counter() - start:.0f} s_\n")
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings, < 5 min on 2 cores")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of torch (default 1: ratios stay stable on a shared, loaded machine)",
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"# Benchmarks{' (quick)' if args.quick else ''}\n\nMachine: {machine()}\n", flush=True)
    run(sections, args.quick, emit=lambda text: print(text, flush=True))
    print(f"Total: {time.perf_counter() - start:.0f} s; at the end: {machine()}")


if __name__ == "__main__":
    main()
