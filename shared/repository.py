"""A versioned model repository in object storage that Triton and KServe can load.

Layout under the repository URI (file:// or gs://)::

    <model>/config.pbtxt              Triton's config: the versions aliases point to (shared.triton)
    <model>/aliases.json              alias → version, with each alias's history
    <model>/<version>/model.onnx      (or model.tflite; external data, trt_cache/ beside it)
    <model>/<version>/config.pbtxt    this version's own config (Triton ignores it; a record)
    <model>/<version>/manifest.json   lineage and config; written last, so a version with it is complete
    <model>/<version>/.claim          who claimed the version number (exclusive create)

Version numbers are claimed with an exclusive create (a GCS ``ifGenerationMatch=0``
precondition on gs://, a locked check on file://), so racing deploys never share one.
Aliases move by compare-and-swap on the generation of ``aliases.json``.

The model-level ``config.pbtxt`` is rewritten after every publish, alias move and rollback
(:meth:`ModelRepository.write_triton_config`): one object replaced whole (an atomic rename on
file://, an object write on gs://), by compare-and-swap on its generation, with the aliases
read *after* that generation, so the last writer always wrote from the newest aliases. It lists
only versions that aliases point to, and an alias can only point to a complete version, so
Triton never loads a version being uploaded or one a crashed deploy left claimed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from shared.errors import NotFound, PreconditionFailed, UserInputError
from shared.storage import ArtifactStore, open_store
from shared.triton import ServedPlan, TritonConfig, plan_served

VERSION_DIR = re.compile(r"^([^/]+)/(\d+)/manifest\.json$")
CONFIG = "config.pbtxt"


class ModelRepository:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    @classmethod
    def open(cls, uri: str) -> ModelRepository:
        return cls(open_store(uri))

    @property
    def uri(self) -> str:
        return self.store.uri

    # -- reading -----------------------------------------------------------------------
    def models(self) -> list[str]:
        names = {m.group(1) for key in self.store.list("") if (m := VERSION_DIR.match(key))}
        return sorted(names)

    def versions(self, model: str) -> list[int]:
        """Complete versions (their manifest is written), ascending."""
        found = []
        for key in self.store.list(f"{model}/"):
            match = VERSION_DIR.match(key)
            if match and match.group(1) == model:
                found.append(int(match.group(2)))
        return sorted(found)

    def manifest(self, model: str, version: int) -> dict:
        try:
            return self.store.read_json(f"{model}/{version}/manifest.json")
        except NotFound:
            raise UserInputError(f"{self.uri}: model {model!r} has no version {version}") from None

    def aliases(self, model: str) -> dict[str, Any]:
        return self._aliases(model)[0].get("aliases", {})

    def resolve(self, model: str, ref: str) -> int:
        """A version number from '3', 'latest' or an alias name."""
        if ref.isdigit():
            version = int(ref)
            self.manifest(model, version)
            return version
        if ref == "latest":
            versions = self.versions(model)
            if not versions:
                raise UserInputError(f"{self.uri}: model {model!r} has no versions")
            return versions[-1]
        alias = self.aliases(model).get(ref)
        if alias is None:
            raise UserInputError(f"{self.uri}: model {model!r} has no alias {ref!r}")
        return int(alias["version"])

    def find_version(self, model: str, artifact_digest: str) -> int | None:
        """A complete version already holding this artifact (makes a redelivered deploy harmless)."""
        for version in reversed(self.versions(model)):
            if self.manifest(model, version).get("artifact_digest") == artifact_digest:
                return version
        return None

    # -- writing -----------------------------------------------------------------------
    def claim_version(self, model: str, claim: dict) -> int:
        claimed = [
            int(parts[1]) for key in self.store.list(f"{model}/")
            if len(parts := key.split("/")) == 3 and parts[1].isdigit()
        ]
        version = max(claimed, default=0) + 1
        for _ in range(1000):
            try:
                self.store.write_json(f"{model}/{version}/.claim", {**claim, "at": time.time()}, if_generation=0)
                return version
            except PreconditionFailed:
                version += 1
        raise PreconditionFailed(f"{self.uri}: could not claim a version of {model!r}")

    def publish(self, model: str, version: int, files: dict[str, Path], manifest: dict, *,
                config: TritonConfig | None = None) -> None:
        """Upload a version's files and its own config, the manifest last, then Triton's config.

        ``config`` defaults to one derived from the manifest's format, inputs and outputs; the
        manifest gains it (``triton``) and who can serve the version (``served_by``).
        """
        config = config or TritonConfig.from_manifest(model, manifest)
        manifest = {**manifest, "triton": config.to_dict(), "served_by": config.served_by}
        for name, path in files.items():
            self.store.put_object(f"{model}/{version}/{name}", path)
        own = config.render([version], [f"Version {version}'s own config; Triton reads ../{CONFIG}."])
        self.store._write_bytes(f"{model}/{version}/{CONFIG}", own.encode(), if_generation=None)
        self.store.write_json(f"{model}/{version}/manifest.json", manifest)
        self.write_triton_config(model)

    def triton_config(self, model: str, version: int) -> TritonConfig:
        return TritonConfig.from_manifest(model, self.manifest(model, version))

    def served_plan(self, model: str) -> ServedPlan | None:
        """Which versions Triton should load now (see shared.triton.plan_served)."""
        versions = self.versions(model)
        latest = versions[-1] if versions else None
        # An alias on a version whose manifest is gone (deleted by hand) cannot be served: left out.
        aliases = {name: entry for name, entry in self.aliases(model).items()
                   if entry.get("version") is not None and int(entry["version"]) in versions}
        wanted = {int(entry["version"]) for entry in aliases.values()} | ({latest} if latest is not None else set())
        configs = {version: self.triton_config(model, version) for version in wanted}
        return plan_served(aliases, configs, latest)

    def write_triton_config(self, model: str) -> ServedPlan | None:
        """Rewrite ``<model>/config.pbtxt`` from the aliases as they are now; unchanged text is not rewritten."""
        key = f"{model}/{CONFIG}"
        for _ in range(100):
            try:
                current, generation = self.store._read_bytes(key)
            except NotFound:
                current, generation = None, 0
            plan = self.served_plan(model)  # read after the generation: a newer writer makes ours fail
            if plan is None:
                return None
            config = self.triton_config(model, plan.primary)
            text = config.render(plan.versions, plan.comments(config)).encode()
            if text == current:
                return plan
            try:
                self.store._write_bytes(key, text, if_generation=generation)
                return plan
            except PreconditionFailed:
                time.sleep(0.05)
        raise PreconditionFailed(f"{self.uri}: the Triton config of {model!r} kept changing; try again")

    def set_alias(self, model: str, alias: str, version: int, *, reason: str = "deploy") -> int | None:
        """Point alias at version; returns the version it pointed at before (None if new)."""
        self.manifest(model, version)  # refuse to alias a version that does not exist

        def change(aliases: dict) -> int | None:
            entry = aliases.setdefault(alias, {"version": None, "history": []})
            previous = entry["version"]
            if previous != version:
                entry["history"].append({"from": previous, "to": version, "at": time.time(), "reason": reason})
                entry["version"] = version
            return previous

        previous = self._update_aliases(model, change)
        self.write_triton_config(model)
        return previous

    def rollback(self, model: str, alias: str) -> tuple[int, int]:
        """Move alias back to the version it pointed at before its last change."""

        def change(aliases: dict) -> tuple[int, int]:
            entry = aliases.get(alias)
            if not entry or entry.get("version") is None:
                raise UserInputError(f"model {model!r} has no alias {alias!r} to roll back")
            moves = [h for h in entry["history"] if h["reason"] != "rollback"]
            previous = next((h["from"] for h in reversed(moves) if h["to"] == entry["version"] and h["from"]), None)
            if previous is None:
                raise UserInputError(f"alias {alias!r} of {model!r} has no earlier version to roll back to")
            current = entry["version"]
            entry["history"].append({"from": current, "to": previous, "at": time.time(), "reason": "rollback"})
            entry["version"] = previous
            return current, previous

        moved = self._update_aliases(model, change)
        self.write_triton_config(model)
        return moved

    def _aliases(self, model: str) -> tuple[dict, int]:
        try:
            return self.store.read_json_generation(f"{model}/aliases.json")
        except NotFound:
            return {"aliases": {}}, 0

    def _update_aliases(self, model: str, change):
        for _ in range(100):
            document, generation = self._aliases(model)
            result = change(document.setdefault("aliases", {}))
            try:
                self.store.write_json(f"{model}/aliases.json", document, if_generation=generation)
                return result
            except PreconditionFailed:
                time.sleep(0.05)
        raise PreconditionFailed(f"{self.uri}: aliases of {model!r} kept changing; try again")
