"""verdicts: does the MiniLM example job deploy the same variant on an idle machine and beside a CPU burner?

    python scripts/bench/verdicts.py [--quick] [--reps N] [--threads T]

Runs ``examples/minilm.yaml`` (MiniLM → ONNX → int8-dynamic, gate cosine-min 0.99, objective
latency, deploy) through a real worker process on a private Redis, ``--reps`` times on the idle
machine and ``--reps`` times beside a CPU burner (one busy-looping process per core, started
before the job is submitted, stopping by itself). Every run uses a fresh artifact store, so every
step is computed again: convert, the accuracy-aware INT8, the paired measurement and the verdict.

Per run: the variant deployed, its paired p50 ratio to fp32 with the interval and rounds, the
measurement's seconds and why it stopped, the gate's cosine-min (held-out rows) and the job's
wall time. Target (issue 17): the same variant every time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import common

BURN_S = 1800  # a burner's own deadline: it stops by itself if this script dies


def burner() -> list[subprocess.Popen]:
    code = f"import time\nend = time.monotonic() + {BURN_S}\nwhile time.monotonic() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]


def job_text(source: Path, repository: Path) -> str:
    """examples/minilm.yaml with its paths made absolute (the example's source is where demo.sh exports it)."""
    text = (common.ROOT / "examples" / "minilm.yaml").read_text()
    text = text.replace("source: ../models/minilm", f"source: '{source}'")
    return text.replace("repository: file://../model-repo", f"repository: '{repository.as_uri()}'")


def main() -> None:
    parser = common.parser(__doc__, reps=(3, 1), threads=2)
    args = common.resolve(parser.parse_args())
    report = common.Report("verdicts", args)
    from services import HOST, Stack, fresh_store, minilm_dir, run_jobs, write_job

    report.table(["run", "machine", "deployed", "ratio to fp32 (interval)", "rounds", "measured s (stopped)",
                  "gate cosine-min", "job s"])
    deployed: list[str] = []
    with Stack.start() as stack:
        stack.worker(f"cpu@{HOST}")
        stack.wait_online([f"cpu@{HOST}"])
        for condition in ("idle", "burner"):
            for rep in range(args.reps):
                repository = stack.folder / f"repo-{condition}-{rep}"
                job = write_job(stack.folder / "jobs", job_text(minilm_dir(), repository))
                burners = burner() if condition == "burner" else []
                try:
                    if burners:
                        time.sleep(1)  # the burners are spinning before the job starts
                    wall, (record,) = run_jobs([job], store=fresh_store(stack))
                    if burners and not all(p.poll() is None for p in burners):
                        raise RuntimeError("a burner stopped before the job ended")
                finally:
                    for process in burners:
                        process.terminate()
                        process.wait(timeout=30)
                select = record["stages"]["select"]
                variant = record["result"]["variant"]
                deployed.append(variant)
                row = {r["variant"]: r for r in select["table"]}[variant]
                measurement = select.get("measurement") or {}
                ratio = (f"{row['ratio']:.3f} ({row['ratio_low']:.3f}-{row['ratio_high']:.3f})"
                         if row.get("ratio") is not None else "1 (fp32)")
                report.row(rep + 1, condition, variant, ratio, row.get("rounds", "-"),
                           f"{measurement.get('seconds', 0):.1f} ({measurement.get('stopped', '-')})",
                           f"{row['cosine_min']:.4f}" if row.get("cosine_min") is not None else "-", f"{wall:.0f}")
                report.log(f"{condition} run {rep + 1}: deployed {variant} at {ratio}")
                report.data.setdefault("runs", []).append({"condition": condition, "variant": variant, "row": row,
                                                           "measurement": measurement, "wall_s": wall,
                                                           "hardware": select.get("hardware")})
    report.ratio("runs deploying the first run's variant", sum(v == deployed[0] for v in deployed) / len(deployed),
                 ">= 1.0", f"deployed: {', '.join(deployed)}")
    report.finish()


if __name__ == "__main__":
    main()
