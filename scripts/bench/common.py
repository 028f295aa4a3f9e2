"""What every benchmark shares: the machine line, pinned threads, repetitions, the table, the JSON.

A benchmark script does, in this order::

    args = common.parser(__doc__, quick=..., full=...).parse_args()
    common.pin_threads(args.threads)          # before numpy/torch/onnxruntime are imported
    report = common.Report("queue", args)     # prints the machine line
    ... measure, report.row(...), report.ratio(...) ...
    report.finish()                           # prints the table and the ratios, writes JSON

Figures are the median of the repetitions with their min and max. A ratio that misses its
target is reported, never raised: the scripts exit 0 unless something broke.

Imports only the standard library, so that importing it fixes thread counts before any
numerical library reads them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench-results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "TF_NUM_INTRAOP_THREADS", "MODELYARD_BENCH_THREADS")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def pin_threads(threads: int) -> dict[str, str]:
    """Fix the intra-op thread count of this process and of every process it starts."""
    pinned = {name: str(threads) for name in THREAD_VARS}
    pinned["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.update(pinned)
    os.environ.update(OFFLINE)
    return pinned


# -- the machine ----------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    memory_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu_model": model,
        "simd": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}),
        "memory_gb": memory_gb,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "threads": {name: os.environ.get(name) for name in THREAD_VARS},
    }


def machine_line(info: dict[str, Any]) -> str:
    load = " ".join(f"{x:.2f}" for x in info["load_average"])
    return (f"machine: {info['cores']} cores ({info['usable_cores']} usable), {info['cpu_model']} "
            f"[{' '.join(info['simd']) or 'no avx2'}], {info['memory_gb']} GB, load average {load}, "
            f"Python {info['python']}, threads pinned to {info['threads']['OMP_NUM_THREADS']} "
            f"(OMP/MKL/OpenBLAS/ORT), {info['date']}")


# -- repetitions ----------------------------------------------------------------------------

@dataclass
class Stat:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": len(self.values),
                "values": self.values}

    def show(self, digits: int = 2, unit: str = "") -> str:
        return f"{self.median:.{digits}f}{unit} ({self.min:.{digits}f}–{self.max:.{digits}f})"


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


# -- the report ------------------------------------------------------------------------------

@dataclass
class Ratio:
    name: str
    value: float | None
    target: str  # e.g. ">= 0.8"
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        op, bound = self.target.split()
        bound_value = float(bound)
        return {">=": self.value >= bound_value, "<=": self.value <= bound_value,
                "<": self.value < bound_value, ">": self.value > bound_value}[op]

    def show(self) -> str:
        if self.value is None:
            return f"{self.name}: not measured ({self.note})"
        verdict = {True: "meets", False: "MISSES"}[bool(self.met)]
        note = f"; {self.note}" if self.note else ""
        return f"{self.name}: {self.value:.3f} — {verdict} the target {self.target}{note}"


@dataclass
class Report:
    name: str
    args: argparse.Namespace
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        self.machine = machine()
        self.command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
        print(machine_line(self.machine), flush=True)
        print(f"command: {self.command}  ({'quick' if getattr(self.args, 'quick', False) else 'full'} settings)",
              flush=True)

    def log(self, message: str) -> None:
        print(f"[{self.name} {time.perf_counter() - self.started:6.0f}s] {message}", flush=True)

    def table(self, headers: list[str]) -> None:
        self.headers = headers

    def row(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def ratio(self, name: str, value: float | None, target: str, note: str = "") -> Ratio:
        ratio = Ratio(name, value, target, note)
        self.ratios.append(ratio)
        return ratio

    def finish(self) -> Path:
        self.machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        wall = time.perf_counter() - self.started
        print()
        print(f"## {self.name} ({'quick' if getattr(self.args, 'quick', False) else 'full'} settings, "
              f"{wall:.0f} s)")
        print(machine_line(self.machine))
        print(f"command: {self.command}")
        if self.headers:
            print()
            print("| " + " | ".join(self.headers) + " |")
            print("|" + "---|" * len(self.headers))
            for row in self.rows:
                print("| " + " | ".join(row) + " |")
        print()
        for ratio in self.ratios:
            print(ratio.show())
        for note in self.notes:
            print(f"note: {note}")
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"{self.name}.json"
        out.write_text(json.dumps({
            "benchmark": self.name,
            "command": self.command,
            "quick": bool(getattr(self.args, "quick", False)),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "machine": self.machine,
            "wall_s": round(wall, 1),
            "table": {"headers": self.headers, "rows": self.rows},
            "ratios": [{"name": r.name, "value": r.value, "target": r.target, "met": r.met, "note": r.note}
                       for r in self.ratios],
            "notes": self.notes,
            "data": self.data,
        }, indent=1, default=str))
        print(f"wrote {out.relative_to(ROOT)}")
        return out


# -- command line ----------------------------------------------------------------------------

def parser(doc: str | None, *, reps: tuple[int, int], threads: int) -> argparse.ArgumentParser:
    """A parser with --quick, --reps (full, quick defaults) and --threads; scripts add their own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings: a check that the benchmark runs")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"repetitions per side (default {reps[0]}, quick {reps[1]})")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"intra-op threads per process, pinned (default {threads})")
    parser.set_defaults(_reps=reps)
    return parser


def resolve(args: argparse.Namespace, **pairs: tuple[Any, Any]) -> argparse.Namespace:
    """Fill options left at None with their full or quick default: ``resolve(args, n=(2000, 300))``."""
    if args.reps is None:
        args.reps = args._reps[1] if args.quick else args._reps[0]
    for name, (full, quick) in pairs.items():
        if getattr(args, name, None) is None:
            setattr(args, name, quick if args.quick else full)
    del args._reps
    return args


# -- Optimum, in a virtual environment of its own ---------------------------------------------

OPTIMUM_VENV = RESULTS / "optimum-venv"
OPTIMUM_REQUIREMENTS = ["torch==2.13.0", "optimum[onnxruntime]"]


class OptimumUnavailable(Exception):
    """Optimum could not be installed here; the benchmark skips its rows with this reason."""


def optimum_cli() -> Path:
    """``optimum-cli`` from bench-results/optimum-venv, created on first use (about a minute)."""
    cli = OPTIMUM_VENV / "bin" / "optimum-cli"
    if cli.is_file():
        return cli
    pip = OPTIMUM_VENV / "bin" / "pip"
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(OPTIMUM_VENV)],
        [str(pip), "install", "--quiet", "--dry-run", *OPTIMUM_REQUIREMENTS],  # resolves? (nothing installed)
        [str(pip), "install", "--quiet", *OPTIMUM_REQUIREMENTS],
    ]
    print(f"setting up Optimum in {OPTIMUM_VENV} "
          f"(pip install {' '.join(OPTIMUM_REQUIREMENTS)})", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    steps[0][0] = base if Path(base).exists() else sys.executable
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise OptimumUnavailable(f"'{shlex.join(step[-3:])}' failed: {tail}")
    if not cli.is_file():
        raise OptimumUnavailable("optimum installed but has no optimum-cli")
    return cli


def optimum_version() -> str:
    python = OPTIMUM_VENV / "bin" / "python"
    code = ("from importlib.metadata import version as v; print('optimum', v('optimum'), 'optimum-onnx', "
            "v('optimum-onnx'), 'onnxruntime', v('onnxruntime'), 'transformers', v('transformers'))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def optimum_for(report: Report, skip: bool) -> Path | None:
    """Optimum's CLI (set up on first use), its versions noted in the report; None, with the
    reason noted, when skipped or when it cannot be installed."""
    if skip:
        return None
    try:
        cli = optimum_cli()
    except OptimumUnavailable as exc:
        report.notes.append(f"Optimum row skipped: {exc}")
        return None
    report.notes.append("Optimum: " + optimum_version())
    return cli


def run_checked(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    """Run a command; its wall time in seconds, or RuntimeError with its output's tail."""
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(args[:4])} ... exited {done.returncode}:\n{tail}")
    return wall


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
