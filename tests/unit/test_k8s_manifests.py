"""deploy/k8s: the manifests agree with each other and with the settings they run under.

deploy/k8s/*.yaml are the workers (one kustomization); deploy/k8s/serving/ serves the model
repository (Triton, `modelyard serve`; a kustomization of its own) and serving/kserve/ holds a
KServe InferenceService example (a custom resource: checked field by field).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
SERVING = K8S / "serving"
KSERVE = SERVING / "kserve"
NAMESPACE = "modelyard"
WORKERS = {"worker-cpu": "cpu", "worker-gpu": "gpu"}


def load(folder: Path = K8S) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCS = load()
SERVING_DOCS = load(SERVING)
KSERVE_DOCS = load(KSERVE)
ALL_DOCS = DOCS + SERVING_DOCS + KSERVE_DOCS


def resources(kind: str, docs: list[tuple[str, dict]] = DOCS) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in docs if doc.get("kind") == kind and "metadata" in doc}


def containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def configmap_data(name: str) -> dict[str, str]:
    return resources("ConfigMap")[name]["data"]


def defined_env(container: dict) -> set[str]:
    names = set(env_of(container))
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(configmap_data(source["configMapRef"]["name"]))
    return names


def arg(container: dict, flag: str) -> str | None:
    args = container.get("args", [])
    return args[args.index(flag) + 1] if flag in args else None


def settings_from_configmap(monkeypatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("MODELYARD_")]:
        monkeypatch.delenv(key)
    for key, value in configmap_data("modelyard-settings").items():
        if key.startswith("MODELYARD_"):
            monkeypatch.setenv(key, value)
    return Settings()


@pytest.mark.parametrize("folder", [K8S, SERVING], ids=["workers", "serving"])
def test_every_document_parses_and_is_kustomized(folder):
    docs = load(folder)
    assert docs
    for name, doc in docs:
        assert {"apiVersion", "kind"} <= set(doc), name
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_everything_is_in_the_namespace():
    assert "modelyard" in resources("Namespace")
    for name, doc in ALL_DOCS:
        if doc["kind"] in ("Namespace", "Kustomization"):
            continue
        assert doc["metadata"].get("namespace") == NAMESPACE, (name, doc["kind"], doc["metadata"]["name"])


def test_the_configmap_is_a_valid_modelyard_configuration(monkeypatch):
    settings = settings_from_configmap(monkeypatch)  # Settings' own validators: soft < hard < visibility
    assert settings.visibility_timeout_s > settings.stage_time_limit_s


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_grace_period_outlasts_a_stage(name, monkeypatch):
    deployment = resources("Deployment")[name]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings().stage_time_limit_s
    assert grace > settings_from_configmap(monkeypatch).stage_time_limit_s
    (worker,) = deployment["spec"]["template"]["spec"]["containers"]
    # no preStop hook: SIGTERM goes to Celery itself ('modelyard worker' execs it), a warm shutdown
    assert "preStop" not in worker.get("lifecycle", {})
    assert worker["args"][0] == "worker" and arg(worker, "--pool") == WORKERS[name]


def test_the_gpu_worker_gets_one_gpu_and_one_process():
    (worker,) = resources("Deployment")["worker-gpu"]["spec"]["template"]["spec"]["containers"]
    assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert arg(worker, "--concurrency") == "1"
    (cpu,) = resources("Deployment")["worker-cpu"]["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu.get("resources", {}).get("limits", {})


def test_each_scaled_object_targets_a_worker_deployment_and_its_queue_list():
    deployments = resources("Deployment")
    auths = resources("TriggerAuthentication")
    scaled = resources("ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == set(WORKERS)
    for name, obj in scaled.items():
        target = obj["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target["name"] in deployments
        (worker,) = deployments[target["name"]]["spec"]["template"]["spec"]["containers"]
        pool = arg(worker, "--pool")
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        assert meta["listName"] == pool == WORKERS[target["name"]], name
        assert int(meta["listLength"]) >= 1
        assert meta.get("addressFromEnv") in defined_env(worker)  # KEDA reads it from the target's env
        assert meta.get("databaseIndex", "0") == re.search(r"/(\d+)$", env_of(worker)["MODELYARD_BROKER_URL"]
                                                           ["value"]).group(1)
        assert "password" not in meta  # from the Secret, through the TriggerAuthentication
        auth = auths[trigger["authenticationRef"]["name"]]
        (ref,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "password"]
        assert env_of(worker)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": ref["name"],
                                                                                  "key": ref["key"]}


def test_the_broker_url_is_built_from_the_secret_in_order():
    for name, deployment in resources("Deployment").items():
        for container in containers(deployment):
            env = container.get("env", [])
            names = [e["name"] for e in env]
            url = env_of(container)["MODELYARD_BROKER_URL"]["value"]
            # $(VAR) expands only variables defined before it (envFrom, then earlier env entries)
            for var in re.findall(r"\$\((\w+)\)", url):
                assert var in defined_env(container), (name, var)
                if var in names:
                    assert names.index(var) < names.index("MODELYARD_BROKER_URL"), (name, var)
            assert "REDIS_PASSWORD" in url


def test_no_secret_is_written_in_a_manifest():
    for name, deployment in resources("Deployment", ALL_DOCS).items():
        for container in containers(deployment):
            for entry in container.get("env", []):
                if re.search(r"PASSWORD|AUTH|TOKEN|SECRET", entry["name"]):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (name, entry["name"])
    assert not resources("Secret", ALL_DOCS), "Secrets are created with kubectl, not committed"
    for key in configmap_data("modelyard-settings"):
        assert not re.search(r"PASSWORD|AUTH|TOKEN|SECRET", key), key


def test_flower_has_basic_auth_and_a_service():
    flower = resources("Deployment")["flower"]
    (container,) = flower["spec"]["template"]["spec"]["containers"]
    auth = env_of(container)["FLOWER_BASIC_AUTH"]
    assert "secretKeyRef" in auth["valueFrom"] and "value" not in auth
    assert not any("--basic_auth" in a or "--basic-auth" in a for a in container.get("args", []))
    service = resources("Service")["flower"]
    labels = flower["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    port_names = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in port_names or p["targetPort"] in {c["containerPort"] for c in container["ports"]}
               for p in service["spec"]["ports"])


def test_no_container_runs_as_root():
    for name, deployment in resources("Deployment", ALL_DOCS).items():
        pod = deployment["spec"]["template"]["spec"]
        pod_ctx = pod.get("securityContext", {})
        for container in containers(deployment):
            ctx = container.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, (name, container["name"])
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 1)) != 0, (name, container["name"])
            assert ctx.get("allowPrivilegeEscalation") is False, (name, container["name"])
            assert ctx.get("privileged", False) is False, (name, container["name"])
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), (name, container["name"])


def test_deployment_selectors_match_their_pods():
    for name, deployment in resources("Deployment", ALL_DOCS).items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items(), name


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_workers_expose_the_metrics_port_they_serve(name):
    deployment = resources("Deployment")[name]
    (worker,) = deployment["spec"]["template"]["spec"]["containers"]
    port = int(env_of(worker)["MODELYARD_METRICS_PORT"]["value"])
    assert port in {p["containerPort"] for p in worker["ports"]}
    assert int(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == port
    flower = resources("Deployment")["flower"]["spec"]["template"]["spec"]["containers"][0]
    assert "MODELYARD_METRICS_PORT" not in defined_env(flower)  # Flower serves its own /metrics


def test_core_resources_match_the_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate for schema checks")
    checked = 0
    for _name, doc in ALL_DOCS:
        if doc["apiVersion"].startswith(("keda.sh/", "kustomize.config.k8s.io/", "serving.kserve.io/")):
            continue  # custom resources: checked field by field
        kv.validate(doc, "1.30.0", strict=True)
        checked += 1
    assert checked >= 10


# -- serving the model repository --------------------------------------------------------------

def serving_pod(name: str) -> dict:
    return resources("Deployment", SERVING_DOCS)[name]["spec"]["template"]["spec"]


def by_name(items: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in items}


def test_serving_pods_read_the_repository_the_workers_deploy_to(monkeypatch):
    import fnmatch

    settings = settings_from_configmap(monkeypatch)
    repository = configmap_data("modelyard-settings")["MODELYARD_REPOSITORY"]
    assert repository.startswith("gs://")
    assert any(fnmatch.fnmatchcase(repository, pattern) for pattern in settings.allowed_repositories)
    accounts = resources("ServiceAccount", SERVING_DOCS)
    for name in ("triton", "modelyard-serve"):
        pod = serving_pod(name)
        assert pod["serviceAccountName"] in accounts, name
        for container in pod.get("initContainers", []) + pod["containers"]:
            if container["image"].startswith("ghcr.io/example/modelyard"):
                assert "MODELYARD_REPOSITORY" in defined_env(container), (name, container["name"])


def test_triton_reads_the_local_copy_triton_sync_keeps_where_the_configs_say(monkeypatch):
    settings = settings_from_configmap(monkeypatch)
    pod = serving_pod("triton")
    containers = by_name(pod["containers"])
    (first_sync,) = pod["initContainers"]
    triton, sync = containers["triton"], containers["sync"]
    root = settings.triton_model_root  # where a TensorRT version's config puts its engine cache
    assert f"--model-repository={root}" in triton["args"] and "--model-control-mode=poll" in triton["args"]
    assert "--strict-readiness=false" in triton["args"]  # a model Triton cannot load does not unready it
    for container in (first_sync, sync):
        assert container["args"][:2] == ["triton-sync", root]
    assert "--once" in first_sync["args"] and "--once" not in sync["args"]
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (first_sync, sync, triton)}
    assert {m[root] for m in mounts.values()} == {"models"}  # one volume, seen at the same path by all three
    assert str(triton["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert {p["httpGet"]["path"] for p in (triton["livenessProbe"], triton["readinessProbe"])} == {
        "/v2/health/live", "/v2/health/ready"}
    service = resources("Service", SERVING_DOCS)["triton"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in triton["ports"]}


def test_modelyard_serve_takes_its_token_from_a_mounted_secret_and_probes_the_open_routes():
    pod = serving_pod("modelyard-serve")
    (serve,) = pod["containers"]
    assert serve["args"][0] == "serve" and arg(serve, "--host") == "0.0.0.0"
    token_dir = str(Path(arg(serve, "--token-file")).parent)
    mount = next(m for m in serve["volumeMounts"] if m["mountPath"] == token_dir)
    volume = by_name(pod["volumes"])[mount["name"]]
    assert volume["secret"]["secretName"] == "modelyard-serve-token" and mount.get("readOnly") is True
    # the health routes answer without the token (serving.auth); everything else needs it
    assert {serve["livenessProbe"]["httpGet"]["path"], serve["readinessProbe"]["httpGet"]["path"]} == {
        "/v2/health/live", "/v2/health/ready"}
    assert arg(serve, "--device") in ("cpu", "cuda", "tensorrt")


def test_the_kserve_example_serves_the_same_repository_with_triton():
    (name, isvc), = KSERVE_DOCS
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["namespace"] == NAMESPACE
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "triton" and model["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == configmap_data("modelyard-settings")["MODELYARD_REPOSITORY"]
    assert predictor["serviceAccountName"] in resources("ServiceAccount", SERVING_DOCS)
    # KServe's storage initializer downloads storageUri to /mnt/models: the engine cache paths match
    assert configmap_data("modelyard-settings")["MODELYARD_TRITON_MODEL_ROOT"] == "/mnt/models"
