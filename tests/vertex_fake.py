"""A local fake of the Vertex AI REST API (v1) for the Model Registry and endpoints.

Enough of the API for ``shared.vertex``, called through the real ``google-cloud-aiplatform``
clients over REST: models (upload, get, list, listVersions, mergeVersionAliases), endpoints
(create, get, list, deployModel, undeployModel, patch of the traffic split) and the
long-running operations they return. Every request is recorded (:attr:`FakeVertex.requests`)
so a test can assert on the bodies the client sent and print the sequence.

It behaves as the documentation says Vertex does where ``shared.vertex`` relies on it: a new
version gets the next version id; the first version of a model gets the ``default`` alias; an
alias given to one version is taken from the version that held it; a deploy's traffic split
names the model being deployed ``"0"`` and must add up to 100. An operation is not done when
it is returned and done when it is first polled (``stall(method, polls)``: later).
``fail(method, code, message)`` makes the next call of that method fail: its operation ends with
that error (an LRO) or the call answers with that HTTP status (the others).

Use it with pytest-httpserver::

    fake = FakeVertex().install(httpserver)
    settings = Settings(vertex_api_endpoint=fake.url)
"""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from werkzeug import Request, Response

TYPE = "type.googleapis.com/google.cloud.aiplatform.v1."
GRPC_CODES = {400: 3, 403: 7, 404: 5, 409: 10, 429: 8, 500: 13, 503: 14}
LONG_RUNNING = ("upload", "createEndpoint", "deployModel", "undeployModel")  # fail in their operation
LOCATION = re.compile(r"^/(?:v1|ui)/(projects/[^/]+/locations/[^/]+)/(.+)$")  # the clients poll under /ui/


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    body: dict | None

    def line(self) -> str:
        """One line for a printed sequence: method, path (without the project prefix), body."""
        path = LOCATION.sub(r"\2", self.path)
        query = "?" + "&".join(f"{k}={v}" for k, v in self.query.items()) if self.query else ""
        body = " " + json.dumps(self.body, sort_keys=True) if self.body else ""
        return f"{self.method} {path}{query}{body}"


@dataclass
class FakeVertex:
    project: str = "demo-project"
    region: str = "us-central1"
    url: str = ""
    requests: list[RecordedRequest] = field(default_factory=list)
    models: dict[str, list[dict]] = field(default_factory=dict)  # model id -> its versions, in order
    endpoints: dict[str, dict] = field(default_factory=dict)
    operations: dict[str, dict] = field(default_factory=dict)
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)
    stalls: dict[str, int] = field(default_factory=dict)
    _ids: int = 1000
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def install(self, httpserver) -> FakeVertex:
        httpserver.expect_request(re.compile(r"^/(v1|ui)/.*")).respond_with_handler(self.handle)
        self.url = httpserver.url_for("").rstrip("/")
        return self

    def stall(self, method: str, polls: int) -> None:
        """Keep the next operation of ``method`` running for ``polls`` polls (a slow deploy)."""
        self.stalls[method] = polls

    def fail(self, method: str, code: int, message: str) -> None:
        """Make the next call of ``method`` (``upload``, ``deployModel``, ``get_endpoint``, ...) fail."""
        self.failures[method] = (code, message)

    def calls(self, *, skip_reads: bool = False) -> list[str]:
        """The recorded requests as lines; ``skip_reads`` leaves out GETs (lookups and polls)."""
        return [r.line() for r in self.requests if not (skip_reads and r.method == "GET")]

    def bodies(self, suffix: str) -> list[dict]:
        """The bodies of the recorded requests whose path ends with ``suffix``."""
        return [r.body for r in self.requests if r.path.endswith(suffix) and r.body is not None]

    # -- dispatch ------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        body = request.get_json(silent=True) if request.data else None
        query = {k: v for k, v in request.args.items() if not k.startswith("$")}  # $alt: the clients' encoding
        self.requests.append(RecordedRequest(request.method, request.path, query, body))
        with self._lock:
            try:
                return self._json(self._route(request.method, request.path, query, body or {}))
            except FakeError as exc:
                status = {"code": exc.code, "message": exc.message, "status": exc.status}
                return self._json({"error": status}, exc.code)

    def _route(self, method: str, path: str, query: dict, body: dict) -> dict:
        match = LOCATION.match(path)
        if not match or match.group(1) != self.parent:
            raise FakeError(404, f"unknown location in {path}")
        rest = match.group(2)
        routes = [
            ("POST", r"models:upload", "upload", lambda: self._upload(body)),
            ("GET", r"models", "listModels", lambda: self._list_models(query)),
            ("GET", r"models/([^/:@]+)(?:@([^/:]+))?", "getModel", self._model),
            ("GET", r"models/([^/:@]+):listVersions", "listVersions", self._list_versions),
            ("POST", r"models/([^/:@]+)@([^/:]+):mergeVersionAliases", "mergeVersionAliases",
             lambda m, v: self._merge(m, v, body)),
            ("POST", r"endpoints", "createEndpoint", lambda: self._create_endpoint(body)),
            ("GET", r"endpoints", "listEndpoints", lambda: self._list_endpoints(query)),
            ("GET", r"endpoints/([^/:]+)", "getEndpoint", self._endpoint),
            ("PATCH", r"endpoints/([^/:]+)", "updateEndpoint", lambda e: self._patch_endpoint(e, body, query)),
            ("POST", r"endpoints/([^/:]+):deployModel", "deployModel", lambda e: self._deploy(e, body)),
            ("POST", r"endpoints/([^/:]+):undeployModel", "undeployModel", lambda e: self._undeploy(e, body)),
            ("GET", r"operations/([^/:]+)", "getOperation", self._poll),
        ]
        for verb, pattern, name, action in routes:
            found = re.fullmatch(pattern, rest)
            if verb == method and found:
                if name in self.failures and name not in LONG_RUNNING:
                    code, message = self.failures.pop(name)
                    raise FakeError(code, message)
                return action(*found.groups())
        raise FakeError(404, f"no route for {method} {path}")

    # -- models --------------------------------------------------------------------------------

    def _upload(self, body: dict) -> dict:
        if "upload" in self.failures:  # a failed upload creates nothing
            return self._operation("upload", {})
        model = copy.deepcopy(body.get("model", {}))
        parent_model = body.get("parentModel")
        if parent_model:
            model_id = parent_model.rsplit("/", 1)[-1]
            if model_id not in self.models:
                raise FakeError(404, f"parent model {parent_model} not found")
        else:
            model_id = body.get("modelId") or self._new_id()
            if model_id in self.models:
                raise FakeError(409, f"model {model_id} already exists")
        versions = self.models.setdefault(model_id, [])
        version_id = str(len(versions) + 1)
        aliases = list(model.get("versionAliases", []))
        if not versions and "default" not in aliases:
            aliases.append("default")
        for alias in aliases:
            for other in versions:
                if alias in other["versionAliases"]:
                    other["versionAliases"].remove(alias)
        model.update(name=f"{self.parent}/models/{model_id}", versionId=version_id, versionAliases=aliases)
        versions.append(model)
        response = {"@type": TYPE + "UploadModelResponse", "model": model["name"], "modelVersionId": version_id}
        return self._operation("upload", response)

    def _model(self, model_id: str, version: str | None = None) -> dict:
        versions = self.models.get(model_id)
        if not versions:
            raise FakeError(404, f"Model {self.parent}/models/{model_id} is not found.")
        if version is None:
            version = "default"
        for candidate in versions:
            if candidate["versionId"] == version or version in candidate["versionAliases"]:
                return candidate
        raise FakeError(404, f"Model {self.parent}/models/{model_id}@{version} is not found.")

    def _list_models(self, query: dict) -> dict:
        wanted = _display_name_filter(query.get("filter", ""))
        found = [self._model(model_id) for model_id in self.models]
        return {"models": [m for m in found if wanted is None or m.get("displayName") == wanted]}

    def _list_versions(self, model_id: str) -> dict:
        self._model(model_id)
        return {"models": self.models[model_id]}

    def _merge(self, model_id: str, version: str, body: dict) -> dict:
        target = self._model(model_id, version)
        for alias in body.get("versionAliases", []):
            if alias.startswith("-"):
                if alias[1:] in target["versionAliases"]:
                    target["versionAliases"].remove(alias[1:])
                continue
            for other in self.models[model_id]:
                if alias in other["versionAliases"] and other is not target:
                    other["versionAliases"].remove(alias)
            if alias not in target["versionAliases"]:
                target["versionAliases"].append(alias)
        return target

    # -- endpoints -----------------------------------------------------------------------------

    def _create_endpoint(self, body: dict) -> dict:
        if "createEndpoint" in self.failures:
            return self._operation("createEndpoint", {})
        endpoint_id = self._new_id()
        endpoint = {**body, "name": f"{self.parent}/endpoints/{endpoint_id}", "deployedModels": [],
                    "trafficSplit": {}}
        self.endpoints[endpoint_id] = endpoint
        return self._operation("createEndpoint", {"@type": TYPE + "Endpoint", **endpoint})

    def _endpoint(self, endpoint_id: str) -> dict:
        if endpoint_id not in self.endpoints:
            raise FakeError(404, f"Endpoint {self.parent}/endpoints/{endpoint_id} is not found.")
        return self.endpoints[endpoint_id]

    def _list_endpoints(self, query: dict) -> dict:
        wanted = _display_name_filter(query.get("filter", ""))
        return {"endpoints": [e for e in self.endpoints.values() if wanted is None or e.get("displayName") == wanted]}

    def _patch_endpoint(self, endpoint_id: str, body: dict, query: dict) -> dict:
        endpoint = self._endpoint(endpoint_id)
        if "trafficSplit" in query.get("updateMask", ""):
            split = {k: int(v) for k, v in body.get("trafficSplit", {}).items()}
            self._check_split(endpoint, split)
            endpoint["trafficSplit"] = split
        return endpoint

    def _deploy(self, endpoint_id: str, body: dict) -> dict:
        endpoint = self._endpoint(endpoint_id)
        deployed = copy.deepcopy(body["deployedModel"])
        model_name, _, version = deployed["model"].partition("@")
        model_id = model_name.rsplit("/", 1)[-1]
        version_id = self._model(model_id, version or None)["versionId"]
        deployed.update(id=self._new_id(), model=model_name, modelVersionId=version_id)
        split = {(deployed["id"] if k == "0" else k): int(v) for k, v in body.get("trafficSplit", {"0": 100}).items()}
        failure = self.failures.pop("deployModel", None)
        if failure is None:
            endpoint["deployedModels"].append(deployed)
            self._check_split(endpoint, split)
            endpoint["trafficSplit"] = split
        response = {"@type": TYPE + "DeployModelResponse", "deployedModel": deployed}
        return self._operation("deployModel", response, failure)

    def _undeploy(self, endpoint_id: str, body: dict) -> dict:
        endpoint = self._endpoint(endpoint_id)
        target = body["deployedModelId"]
        if endpoint["trafficSplit"].get(target):
            raise FakeError(400, f"Deployed model {target} still has traffic; set it to 0 before undeploying.")
        endpoint["deployedModels"] = [d for d in endpoint["deployedModels"] if d["id"] != target]
        endpoint["trafficSplit"] = {k: v for k, v in endpoint["trafficSplit"].items() if k != target}
        return self._operation("undeployModel", {"@type": TYPE + "UndeployModelResponse"})

    def _check_split(self, endpoint: dict, split: dict[str, int]) -> None:
        known = {d["id"] for d in endpoint["deployedModels"]}
        unknown = sorted(set(split) - known)
        if unknown:
            raise FakeError(400, f"traffic_split names deployed models not on the endpoint: {unknown}")
        if split and sum(split.values()) != 100:
            raise FakeError(400, f"The traffic split percentages must add up to 100, not {sum(split.values())}.")

    # -- long-running operations ---------------------------------------------------------------

    def _operation(self, kind: str, response: dict, failure: tuple[int, str] | None = None) -> dict:
        failure = failure or self.failures.pop(kind, None)
        name = f"{self.parent}/operations/{self._new_id()}"
        result: dict[str, Any] = {"response": response}
        if failure is not None:
            code, message = failure
            result = {"error": {"code": GRPC_CODES.get(code, 2), "message": message}}
        self.operations[name] = {"name": name, "polls_left": self.stalls.pop(kind, 0), "result": result}
        return {"name": name, "done": False}

    def _poll(self, operation_id: str) -> dict:
        operation = self.operations.get(f"{self.parent}/operations/{operation_id}")
        if operation is None:
            raise FakeError(404, f"operation {operation_id} not found")
        if operation["polls_left"] > 0:
            operation["polls_left"] -= 1
            return {"name": operation["name"], "done": False}
        return {"name": operation["name"], "done": True, **operation["result"]}

    # -- helpers -------------------------------------------------------------------------------

    def _new_id(self) -> str:
        self._ids += 1
        return str(self._ids)

    @staticmethod
    def _json(data: dict, status: int = 200) -> Response:
        return Response(json.dumps(data), status=status, content_type="application/json")


class FakeError(Exception):
    STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
              429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = self.STATUS.get(code, "UNKNOWN")


def _display_name_filter(text: str) -> str | None:
    found = re.fullmatch(r'\s*display_name\s*=\s*"([^"]*)"\s*', text)
    return found.group(1) if found else None


def main() -> None:
    """``python -m tests.vertex_fake [--port 8765]``: the fake as a server, printing each request it gets."""
    import argparse

    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--project", default="my-project")
    parser.add_argument("--region", default="us-central1")
    options = parser.parse_args()
    fake = FakeVertex(project=options.project, region=options.region, url=f"http://127.0.0.1:{options.port}")

    @Request.application
    def application(request: Request) -> Response:
        response = fake.handle(request)
        print(fake.requests[-1].line(), flush=True)
        return response

    print(f"fake Vertex AI API for {fake.parent} on {fake.url}", flush=True)
    run_simple("127.0.0.1", options.port, application, threaded=True)


if __name__ == "__main__":
    main()
