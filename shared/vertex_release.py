"""A repository version released on Vertex AI; its alias and traffic moved by promote and rollback.

:func:`deploy_version` is what a job's ``deploy.vertex`` does once the deploy stage has published
the version (the worker calls it; ``modelyard promote`` / ``rollback`` call :func:`follow_alias`):

1. **Registry model.** ``vertex.model`` (a resource name, an id or a display name; default the
   job's model name) is found, or created by the first upload with that name as its id.
2. **Registry version.** Uploaded unless one labelled with this repository version's key
   (``modelyard-key``: a hash of repository, model, version) exists, so a retried or resubmitted
   deploy never uploads twice. It is a new version of that model (``parent_model``) with the
   job's alias as its version alias (Vertex takes an alias from the version that held it).
   ``artifact_uri`` is what the serving container reads as ``AIP_STORAGE_URI``: for Triton the
   model repository root (Triton loads a repository; its args load this one model and pin this
   version's own config, copied to ``<model>/configs/version-<n>.pbtxt`` where Triton's
   ``--model-config-name`` looks), for ``modelyard serve --vertex`` the version's own folder.
3. **Endpoint.** ``vertex.endpoint`` (id, resource name or display name; default the job's model
   name), created when a display name finds none. The version is deployed there unless it
   already is, with ``traffic_percentage`` of the traffic; the others keep the rest in their
   proportions. Versions of this model the endpoint then sends no traffic to are undeployed
   (they cost replicas), except the one the alias pointed at before: rollback is then a traffic
   change, not a new deployment.

``<model>/<version>/vertex.json`` beside the manifest records where the version went. It is
written before each long-running operation is waited on: a stage retried after a timeout waits
for the recorded operation rather than starting a second upload, endpoint or deployment.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.errors import ModelyardError, UserInputError
from shared.jobspec import VERTEX_ALIAS, JobSpec, VertexSpec
from shared.repository import ModelRepository
from shared.settings import Settings
from shared.vertex import MODEL_ID, VertexClient, allocate_traffic, check_accelerator

RECORD = "vertex.json"
KEY_LABEL = "modelyard-key"
TRITON, MODELYARD = "triton", "modelyard"
PINNED_CONFIG = "version-{version}"  # Triton's --model-config-name: <model>/configs/<name>.pbtxt


def deploy_version(repository: ModelRepository, model: str, version: int, spec: JobSpec, *, settings: Settings,
                   job_id: str, before_change: Callable[[], None] = lambda: None) -> dict:
    """Release repository version ``model``/``version`` on Vertex AI as the job's ``deploy.vertex``
    says; returns what was done (also recorded in ``vertex.json``). ``before_change`` runs before
    each change (the deploy stage checks there that the job is not cancelled)."""
    assert spec.deploy is not None and spec.deploy.vertex is not None
    vertex, alias = spec.deploy.vertex, spec.deploy.vertex_alias
    client = VertexClient.from_settings(vertex.project, vertex.region, settings)
    if vertex.accelerator_type:
        check_accelerator(vertex.accelerator_type)
    serving = serving_kind(vertex, repository.manifest(model, version).get("format"))
    registry_ref = vertex.model or model
    endpoint_ref = vertex.endpoint or model
    target = {"project": vertex.project, "region": vertex.region, "registry": registry_ref,
              "endpoint_ref": endpoint_ref}
    earlier = read_record(repository, model, version) or {}
    record: dict[str, Any] = {**target, "operations": earlier.get("operations", {}) if _same(earlier, target) else {}}

    def run_once(step: str, what: str, start: Callable[[], str]) -> Any:
        """The response of this step's operation: the one an earlier try started, else a new one."""
        pending = record["operations"].get(step)
        if pending:
            state = client.operation(what, pending)
            if not (state.done and state.HasField("error")):
                return client.wait(what, pending)
        before_change()
        record["operations"][step] = start()
        write_record(repository, model, version, record)
        response = client.wait(what, record["operations"][step])
        del record["operations"][step]  # done: only operations still running are waited for again
        return response

    key = version_key(repository.uri, model, version)
    registry = client.find_model(registry_ref)
    versions = client.versions(registry) if registry else []
    # The version the alias was on before this deploy moved it (a retry finds it recorded): kept deployed.
    holder = next((v.version_id for v in versions if alias in v.version_aliases), None)
    previous = earlier.get("previous_version_id", holder) if _same(earlier, target) else holder
    record["previous_version_id"] = previous
    mine = next((v for v in versions if v.labels.get(KEY_LABEL) == key), None)
    image = (vertex.serving_image or (settings.vertex_triton_image if serving == TRITON
                                      else settings.vertex_serving_image)).format(project=vertex.project,
                                                                                  region=vertex.region)
    if mine is None:
        pinned = serving == TRITON and pin_triton_config(repository, model, version)
        request = upload_request(client.parent, repository, model, version, registry_ref, registry, alias, key,
                                 container_spec(serving, image, model, version, pinned), job_id)
        registry, version_id = client.upload_result(run_once("upload", "upload", lambda: client.start_upload(request)))
    else:
        version_id = mine.version_id
        if alias not in mine.version_aliases:
            before_change()
            client.merge_aliases(registry, version_id, [alias])
    record.update(model=registry, model_version_id=version_id, alias=alias, repository_alias=spec.deploy.alias,
                  serving=serving, image=image)

    endpoint = client.find_endpoint(endpoint_ref)
    endpoint_name = endpoint.name if endpoint is not None else client.created_endpoint(
        run_once("endpoint", f"creating endpoint {endpoint_ref!r}", lambda: client.start_create_endpoint(endpoint_ref)))
    endpoint = client.get_endpoint(endpoint_name)
    deployed_model = deployed_model_spec(vertex, registry, version_id, model, version)
    deployed_id = _deployed_id(endpoint, registry, version_id)
    if deployed_id is None:
        split = allocate_traffic(dict(endpoint.traffic_split), "0", vertex.traffic_percentage)
        deployed_id = client.deployed_id(run_once("deploy", f"deploying {registry}@{version_id}",
                                                  lambda: client.start_deploy(endpoint_name, deployed_model, split)))
    else:
        split = allocate_traffic(dict(endpoint.traffic_split), deployed_id, vertex.traffic_percentage)
        if split != dict(endpoint.traffic_split):
            before_change()
            client.set_traffic(endpoint_name, split)
    record.update(endpoint=endpoint_name, deployed_model_id=deployed_id, deployed_model=deployed_model,
                  job_id=job_id, updated=time.time())
    kept_for_rollback = _deployed_id(endpoint, registry, previous) if previous and previous != version_id else None
    record["undeployed"], record["traffic"] = _undeploy_idle(client, endpoint_name, registry,
                                                             {deployed_id, kept_for_rollback})
    write_record(repository, model, version, record)
    return {k: record[k] for k in ("model", "model_version_id", "alias", "endpoint", "deployed_model_id", "traffic",
                                   "serving", "image", "undeployed")} | {"previous_version_id": previous}


def follow_alias(repository: ModelRepository, model: str, alias: str, version: int, *, settings: Settings,
                 previous: int | None = None) -> dict | None:
    """After ``alias`` moved to ``version`` in the repository (promote, rollback): move the Vertex
    version alias, and when the alias is the one its deploy routed traffic by, send that version
    all of the endpoint's traffic (deploying it again if it was undeployed). None: nothing on
    Vertex to move; ``{"warning": ...}``: the version before was on Vertex, this one is not."""
    record = read_record(repository, model, version)
    if record is None or "deployed_model_id" not in record:
        before = read_record(repository, model, previous) if previous is not None else None
        if before and before.get("repository_alias") == alias and "endpoint" in before:
            return {"warning": f"version {version} was never deployed to Vertex AI: endpoint {before['endpoint']} "
                               f"still serves version {previous} (deploy it with a job that has deploy.vertex)"}
        return None
    client = VertexClient.from_settings(record["project"], record["region"], settings)
    routes_traffic = record.get("repository_alias") == alias
    vertex_alias = record["alias"] if routes_traffic else alias if VERTEX_ALIAS.match(alias) else None
    result: dict[str, Any] = {"model": f"{record['model']}@{record['model_version_id']}", "alias": vertex_alias}
    if vertex_alias is not None:
        client.merge_aliases(record["model"], record["model_version_id"], [vertex_alias])
    if not routes_traffic:
        return result
    endpoint = client.get_endpoint(record["endpoint"])
    deployed_id = record["deployed_model_id"]
    if deployed_id not in {d.id for d in endpoint.deployed_models}:  # undeployed after a later deploy
        operation = client.start_deploy(endpoint.name, record["deployed_model"], {"0": 100})
        deployed_id = client.deployed_id(client.wait(f"deploying {result['model']} again", operation))
        record.update(deployed_model_id=deployed_id, updated=time.time())
        write_record(repository, model, version, record)
    elif dict(endpoint.traffic_split) != {deployed_id: 100}:
        client.set_traffic(endpoint.name, {deployed_id: 100})
    return result | {"endpoint": endpoint.name, "deployed_model_id": deployed_id, "traffic": {deployed_id: 100}}


# -- what is sent ----------------------------------------------------------------------------------


def serving_kind(vertex: VertexSpec, model_format: str | None) -> str:
    serving = vertex.serving or (TRITON if model_format == "onnx" else MODELYARD)
    if serving == TRITON and model_format != "onnx":
        raise UserInputError(f"deploy.vertex.serving 'triton' cannot serve a {model_format} version (standard "
                             "Triton images load ONNX here): use serving: modelyard")
    return serving


def container_spec(serving: str, image: str, model: str, version: int, pinned: bool) -> dict:
    """The serving container. Vertex expands ``$(AIP_STORAGE_URI)``; both servers listen on
    ``AIP_HTTP_PORT`` and answer ``AIP_HEALTH_ROUTE`` / ``AIP_PREDICT_ROUTE`` themselves."""
    if serving == MODELYARD:
        return {"image_uri": image, "command": ["modelyard", "serve", "--vertex"]}
    args = ["--model-repository=$(AIP_STORAGE_URI)", "--model-control-mode=explicit", f"--load-model={model}",
            f"--vertex-ai-default-model={model}"]
    if pinned:
        args.append(f"--model-config-name={PINNED_CONFIG.format(version=version)}")
    return {"image_uri": image, "command": ["tritonserver"], "args": args}


def upload_request(parent: str, repository: ModelRepository, model: str, version: int, registry_ref: str,
                   registry: str | None, alias: str, key: str, container: dict, job_id: str) -> dict:
    triton = container["command"] == ["tritonserver"]
    version_uri = f"{repository.uri}/{model}/{version}/"
    request: dict[str, Any] = {"parent": parent, "model": {
        "display_name": registry_ref.rsplit("/", 1)[-1],
        "artifact_uri": f"{repository.uri}/" if triton else version_uri,
        "container_spec": container,
        "version_aliases": [alias],
        "version_description": f"{version_uri} (modelyard job {job_id})"[:1000],
        "labels": {KEY_LABEL: key, "modelyard-model": _label(model), "modelyard-version": str(version)},
    }}
    if registry is not None:
        request["parent_model"] = registry
    elif MODEL_ID.match(registry_ref):
        request["model_id"] = registry_ref
    return request


def deployed_model_spec(vertex: VertexSpec, registry: str, version_id: str, model: str, version: int) -> dict:
    machine: dict[str, Any] = {"machine_type": vertex.machine_type}
    if vertex.accelerator_type:
        machine |= {"accelerator_type": vertex.accelerator_type, "accelerator_count": vertex.accelerator_count}
    return {"model": f"{registry}@{version_id}", "display_name": f"{model}-v{version}",
            "dedicated_resources": {"machine_spec": machine, "min_replica_count": vertex.min_replicas,
                                    "max_replica_count": vertex.max_replicas or vertex.min_replicas}}


def pin_triton_config(repository: ModelRepository, model: str, version: int) -> bool:
    """Copy the version's own config.pbtxt (its version_policy names it alone) to where Triton's
    ``--model-config-name`` finds it; False when the version has none (Triton then reads the
    model-level config, which names the aliased versions)."""
    source, target = f"{model}/{version}/config.pbtxt", f"{model}/configs/{PINNED_CONFIG.format(version=version)}.pbtxt"
    if not repository.store.exists(source):
        return False
    if not repository.store.exists(target):
        with tempfile.TemporaryDirectory(prefix="modelyard-vertex-") as tmp:
            repository.store.put_object(target, repository.store.get_object(source, Path(tmp) / "config.pbtxt"))
    return True


# -- the record ------------------------------------------------------------------------------------


def version_key(repository_uri: str, model: str, version: int) -> str:
    return hashlib.sha256(f"{repository_uri.rstrip('/')}/{model}/{version}".encode()).hexdigest()[:40]


def read_record(repository: ModelRepository, model: str, version: int) -> dict | None:
    return repository.store.read_json_or_none(f"{model}/{version}/{RECORD}")


def write_record(repository: ModelRepository, model: str, version: int, record: dict) -> None:
    repository.store.write_json(f"{model}/{version}/{RECORD}", record)


def _same(record: dict, target: dict) -> bool:
    return all(record.get(k) == v for k, v in target.items())


def _deployed_id(endpoint: Any, registry: str, version_id: str | None) -> str | None:
    return next((d.id for d in endpoint.deployed_models
                 if d.model == registry and d.model_version_id == version_id), None)


def _undeploy_idle(client: VertexClient, endpoint: str, registry: str,
                   keep: set[str | None]) -> tuple[list[str], dict[str, int]]:
    """Undeploy this model's versions that get no traffic, but those in ``keep`` (best effort);
    returns those undeployed and the endpoint's traffic split after."""
    current = client.get_endpoint(endpoint)
    undeployed = []
    for deployed in current.deployed_models:
        if deployed.model == registry and deployed.id not in keep and not current.traffic_split.get(deployed.id):
            try:
                client.undeploy(endpoint, deployed.id)
                undeployed.append(deployed.id)
            except ModelyardError:  # an idle version left deployed costs money, not correctness
                pass
    if undeployed:
        current = client.get_endpoint(endpoint)
    return undeployed, dict(current.traffic_split)


def _label(text: str) -> str:
    """A label value: lowercase letters, digits, '_' and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]
