"""A local copy of a model repository for Triton: the aliased versions, then their config, atomically.

Triton can read ``gs://`` itself, but then a TensorRT version's engine cache (an absolute local
path in its config) is not where Triton downloaded it, and a poll that catches the config
between two object writes may load a version whose files it has only half seen. So Triton
reads a local folder (``--model-repository=/mnt/models --model-control-mode=poll``) and this
loop, a sidecar in Triton's pod (``modelyard triton-sync``), keeps it current:

1. for each model, ask the repository which versions Triton should load now
   (:meth:`shared.repository.ModelRepository.served_plan`: the aliased ones that share a config);
2. download each of those versions that is not here yet into a hidden folder, then rename it
   to ``<model>/<version>`` (Triton never sees a partial version folder);
3. only then write ``<model>/config.pbtxt`` (a temporary file renamed over it), rendered from
   the same plan, so the config never names a version that is not complete here;
4. delete the local versions the config no longer lists.

The folder ends up as the repository's model-level configs describe it, with only the versions
they list: disk use does not grow with deploys.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from shared.repository import CONFIG, ModelRepository
from shared.storage.base import safe_relative

log = logging.getLogger("modelyard.triton_sync")
STAMP = ".modelyard-manifest.json"  # a copied version's manifest: present only once the copy is complete


def sync_once(repository: ModelRepository, target: Path, models: list[str] | None = None) -> dict[str, list[int]]:
    """Bring ``target`` up to date; returns the versions each model's config lists now."""
    target.mkdir(parents=True, exist_ok=True)
    listed: dict[str, list[int]] = {}
    for model in models or repository.models():
        plan = repository.served_plan(model)
        if plan is None:
            continue
        folder = target / safe_relative(model)
        for version in plan.versions:
            _copy_version(repository, model, version, folder)
        config = repository.triton_config(model, plan.primary)
        _write_atomically(folder / CONFIG, config.render(plan.versions, plan.comments(config)))
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name.isdigit() and int(entry.name) not in plan.versions:
                shutil.rmtree(entry, ignore_errors=True)
        listed[model] = list(plan.versions)
    return listed


def sync_forever(repository: ModelRepository, target: Path, *, interval: float,
                 models: list[str] | None = None) -> None:
    """sync_once every ``interval`` seconds; a failed round is logged and retried at the next."""
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    while True:
        try:
            listed = sync_once(repository, target, models)
            log.info("synced %s", ", ".join(f"{m}: {v}" for m, v in listed.items()) or "no models")
        except Exception as exc:  # the sidecar must outlive a storage hiccup
            log.error("sync of %s failed, retrying in %ss: %s", repository.uri, interval, exc)
        time.sleep(interval)


def _copy_version(repository: ModelRepository, model: str, version: int, folder: Path) -> None:
    manifest = repository.manifest(model, version)
    stamp = json.dumps(manifest, sort_keys=True)
    final = folder / str(version)
    if (final / STAMP).is_file() and (final / STAMP).read_text() == stamp:
        return
    folder.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".partial", dir=folder))
    try:
        prefix = f"{model}/{version}/"
        for key in repository.store.list(prefix):
            name = key[len(prefix):]
            if name != ".claim":
                repository.store.get_object(key, partial / safe_relative(name))
        (partial / STAMP).write_text(stamp)
        partial.chmod(0o755)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _write_atomically(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
