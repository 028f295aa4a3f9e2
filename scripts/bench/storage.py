"""storage: a large artifact through the gs:// backend vs the raw google-cloud-storage calls.

    python scripts/bench/storage.py [--quick] [--size-mb MB] [--reps R]

Uploads and downloads one file of random bytes (1,000 MB; quick 100 MB) through a
gcp-storage-emulator (in memory) that the benchmark starts:

* modelyard: ``GCSStore.put_file`` (sha256 and crc32c of the file, existence check, a
  resumable session whose bytes are streamed from the file in one request) then
  ``GCSStore.get_file`` (streamed download in 1 MiB reads hashed as it is written, the sha256
  verified, then renamed into place);
* raw: ``blob.upload_from_filename`` then ``blob.download_to_filename`` with the client's
  defaults (resumable upload in 100 MiB chunks).

Both sides run in this process, alternating per repetition; each object is deleted after its
repetition. Throughput = 2 x size / (upload s + download s). Peak RSS growth: VmHWM from
/proc/self/status after the transfer minus VmRSS before it, with the peak reset first
(``echo 5 > /proc/self/clear_refs``), for the upload and the download separately.
Targets: modelyard ≥ 0.9x raw throughput; modelyard's RSS growth < 100 MB.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import common
from common import Stat


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth(call) -> tuple[float, float]:
    """Run call; its wall seconds and the growth of this process's peak RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    return seconds, (_status_kb("VmHWM") - before) * 1024


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as out:
        written = 0
        while written < size:
            piece = os.urandom(min(4 * 2**20, size - written))
            out.write(piece)
            written += len(piece)
    return path


def main() -> None:
    parser = common.parser(__doc__, reps=(5, 5), threads=1)
    parser.add_argument("--size-mb", type=int, default=None, help="artifact size in MB (1000; quick 100)")
    args = common.resolve(parser.parse_args(), size_mb=(1000, 100))
    common.pin_threads(args.threads)
    report = common.Report("storage", args)

    from services import start_gcs_emulator

    size = args.size_mb * 10**6
    results: dict[str, dict[str, list[float]]] = {side: {"up_s": [], "down_s": [], "up_rss": [], "down_rss": []}
                                                  for side in ("modelyard", "raw")}
    with tempfile.TemporaryDirectory(prefix="modelyard-storage-bench-") as tmp:
        tmp = Path(tmp)
        url, emulator = start_gcs_emulator(tmp)
        try:
            os.environ["STORAGE_EMULATOR_HOST"] = url
            os.environ["MODELYARD_GCS_CREATE_BUCKET"] = "1"
            from google.cloud import storage

            from shared.storage import open_store
            from shared.storage.base import blob_key

            store = open_store("gs://bench-modelyard/artifacts")
            client = storage.Client(project="modelyard")
            bucket = client.create_bucket("bench-raw")
            source = make_file(tmp / "artifact.bin", size)
            report.log(f"{args.size_mb} MB of random bytes written; emulator at {url}")

            def modelyard_side() -> dict:
                ref = None

                def up() -> None:
                    nonlocal ref
                    ref = store.put_file(source)

                up_s, up_rss = peak_growth(up)
                dest = tmp / "down-modelyard.bin"
                down_s, down_rss = peak_growth(lambda: store.get_file(ref, dest))
                if dest.stat().st_size != size:
                    raise RuntimeError("modelyard download has the wrong size")
                dest.unlink()
                store.delete(blob_key(ref.digest))
                return {"up_s": up_s, "down_s": down_s, "up_rss": up_rss, "down_rss": down_rss}

            def raw_side() -> dict:
                blob = bucket.blob("raw/artifact.bin")
                up_s, up_rss = peak_growth(lambda: blob.upload_from_filename(str(source)))
                dest = tmp / "down-raw.bin"
                down_s, down_rss = peak_growth(lambda: bucket.blob("raw/artifact.bin").download_to_filename(str(dest)))
                if dest.stat().st_size != size:
                    raise RuntimeError("raw download has the wrong size")
                dest.unlink()
                blob.delete()
                return {"up_s": up_s, "down_s": down_s, "up_rss": up_rss, "down_rss": down_rss}

            sides = {"modelyard": modelyard_side, "raw": raw_side}
            for side in sides.values():  # warm-up: connections, code paths (not counted)
                side()
            for rep in range(args.reps):
                for name in (("modelyard", "raw") if rep % 2 == 0 else ("raw", "modelyard")):
                    result = sides[name]()
                    for key, value in result.items():
                        results[name][key].append(value)
                    report.log(f"rep {rep + 1}/{args.reps} {name:9s} up {result['up_s']:.2f} s, "
                                f"down {result['down_s']:.2f} s, peak RSS growth up "
                                f"{result['up_rss'] / 1e6:.0f} MB / down {result['down_rss'] / 1e6:.0f} MB")
        finally:
            emulator.stop()

    throughput = {name: Stat([2 * size / 1e6 / (u + d) for u, d in zip(r["up_s"], r["down_s"])])
                  for name, r in results.items()}
    report.table(["side", "size", "upload s", "download s", "MB/s up+down", "peak RSS growth up / down, MB"])
    for name, label in (("raw", "raw google-cloud-storage"), ("modelyard", "modelyard GCSStore")):
        r = results[name]
        rss_up, rss_down = Stat([x / 1e6 for x in r["up_rss"]]), Stat([x / 1e6 for x in r["down_rss"]])
        report.row(label, f"{args.size_mb} MB", Stat(r["up_s"]).show(2), Stat(r["down_s"]).show(2),
                   throughput[name].show(0), f"{rss_up.show(0)} / {rss_down.show(0)}")
    report.ratio("throughput, modelyard / raw", throughput["modelyard"].median / throughput["raw"].median, ">= 0.9")
    worst = max(max(results["modelyard"]["up_rss"]), max(results["modelyard"]["down_rss"])) / 1e6
    report.ratio("modelyard peak RSS growth, MB (worst repetition)", worst, "< 100")
    report.notes.append("gcp-storage-emulator in memory on this machine: client, emulator and disk share the cores")
    report.data = {"results": results, "throughput_mb_s": {k: v.to_dict() for k, v in throughput.items()}}
    report.finish()


if __name__ == "__main__":
    main()
