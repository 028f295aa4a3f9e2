"""Vertex AI: the calls modelyard makes to the Model Registry and to endpoints.

:class:`VertexClient` wraps the ``google-cloud-aiplatform`` GAPIC clients (REST transport) for
one project and region: every call's failure becomes a :class:`UserInputError` (a 4xx answer:
a bad machine type, a missing permission, a model that is not there; the API's message is
kept) or a :class:`TransientError` (5xx, 408/409/429, unreachable, an operation still running
after ``MODELYARD_VERTEX_OPERATION_TIMEOUT_S``), which a stage retries. Long-running operations
are polled by name, so a retried stage can wait for the operation an earlier try started
instead of starting a second one. What a deploy, promote and rollback do with these calls is
:mod:`shared.vertex_release`.

Credentials are Application Default Credentials (a service account on the worker, or
``GOOGLE_APPLICATION_CREDENTIALS``); nothing here logs them or a request. An ``http://`` API
endpoint (``MODELYARD_VERTEX_API_ENDPOINT``, a local fake of the API in the tests) is called
with anonymous credentials, as the Cloud Storage client does for ``STORAGE_EMULATOR_HOST``.
``google.cloud.aiplatform`` is imported inside functions: it is the optional ``vertex`` extra.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any, TypeVar

from shared.errors import ModelyardError, TransientError, UserInputError, one_line
from shared.settings import Settings

T = TypeVar("T")
INSTALL_HINT = "Vertex AI support is not installed: pip install 'modelyard[vertex]' (google-cloud-aiplatform)"
TRANSIENT_STATUS = {408, 409, 429}  # timeout, a concurrent change, quota: worth another try
MODEL_ID = re.compile(r"^[a-z_][a-z0-9_-]{0,62}$")  # what UploadModelRequest.model_id accepts
POLL_FIRST_S, POLL_MAX_S = 0.5, 15.0


class VertexClient:
    """The Model Registry and endpoint calls of one project and region."""

    def __init__(self, project: str, region: str, *, api_endpoint: str | None = None,
                 operation_timeout_s: float = 1800) -> None:
        self.project = project
        self.region = region
        self.parent = f"projects/{project}/locations/{region}"
        self.api_endpoint = api_endpoint or f"{region}-aiplatform.googleapis.com"
        self.operation_timeout_s = operation_timeout_s

    @classmethod
    def from_settings(cls, project: str, region: str, settings: Settings) -> VertexClient:
        return cls(project, region, api_endpoint=settings.vertex_api_endpoint,
                   operation_timeout_s=settings.vertex_operation_timeout_s)

    # -- plumbing ------------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with the API's failures as modelyard's errors (see the module doc)."""
        try:
            return fn(*args, **kwargs)
        except ModelyardError:
            raise
        except Exception as exc:
            error = api_error(what, exc)
            if error is None:
                raise
            raise error from None

    def _client(self, kind: str) -> Any:
        try:
            from google.cloud import aiplatform_v1
        except ImportError:
            raise UserInputError(INSTALL_HINT) from None
        credentials = None
        if self.api_endpoint.startswith("http://"):
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()
        client_class = {"models": aiplatform_v1.ModelServiceClient,
                        "endpoints": aiplatform_v1.EndpointServiceClient}[kind]
        return self.call(f"connecting to {self.api_endpoint}", client_class, credentials=credentials,
                         transport="rest", client_options={"api_endpoint": self.api_endpoint})

    @cached_property
    def models(self) -> Any:
        return self._client("models")

    @cached_property
    def endpoints(self) -> Any:
        return self._client("endpoints")

    def operation(self, what: str, name: str) -> Any:
        """The operation's state now (a ``google.longrunning`` Operation)."""
        return self.call(what, self.models.get_operation, {"name": name})

    def wait(self, what: str, name: str) -> Any:
        """The response (a protobuf ``Any``) of operation ``name`` once done; its error raised."""
        deadline = time.monotonic() + self.operation_timeout_s
        delay = POLL_FIRST_S
        while True:
            operation = self.operation(what, name)
            if operation.done:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransientError(f"Vertex AI {what}: operation {name} is still running after "
                                     f"{self.operation_timeout_s:g} s (MODELYARD_VERTEX_OPERATION_TIMEOUT_S); "
                                     "a retry waits for the same operation")
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, POLL_MAX_S)
        if operation.HasField("error"):
            from google.api_core import exceptions as api

            raise api_error(what, api.from_grpc_status(operation.error.code, operation.error.message)) from None
        return operation.response

    # -- the Model Registry --------------------------------------------------------------------

    def find_model(self, ref: str) -> str | None:
        """The resource name of the registry model ``ref`` names (resource name, id or display
        name), or None when there is none yet. Several models with that display name: refused."""
        from google.api_core import exceptions as api

        if ref.startswith("projects/") or ref.isdigit():
            name = ref if ref.startswith("projects/") else f"{self.parent}/models/{ref}"
            return self.call(f"reading model {name}", self.models.get_model, name=name).name
        if MODEL_ID.match(ref):
            try:
                return self.models.get_model(name=f"{self.parent}/models/{ref}").name
            except api.NotFound:
                pass
            except Exception as exc:
                raise api_error(f"reading model {ref}", exc) or exc from None
        query = {"parent": self.parent, "filter": f"display_name={_quoted(ref)}"}
        found = self.call(f"listing models named {ref!r}", lambda: [m.name for m in self.models.list_models(query)])
        if len(found) > 1:
            raise UserInputError(f"Vertex AI has {len(found)} models named {ref!r} in {self.parent} "
                                 f"({', '.join(found)}): set deploy.vertex.model to the id of one")
        return found[0] if found else None

    def versions(self, model: str) -> list[Any]:
        """The model's versions (``Model`` messages with ``version_id``, ``version_aliases``, ``labels``)."""
        request = {"name": model}
        return self.call(f"listing the versions of {model}", lambda: list(self.models.list_model_versions(request)))

    def start_upload(self, request: dict) -> str:
        """Start an UploadModel; returns the operation's name."""
        return self.call("upload", self.models.upload_model, request=request).operation.name

    def upload_result(self, operation_response: Any) -> tuple[str, str]:
        """(model resource name, version id) from a finished upload's response."""
        from google.cloud import aiplatform_v1

        response = aiplatform_v1.UploadModelResponse.deserialize(operation_response.value)
        return response.model, response.model_version_id

    def merge_aliases(self, model: str, version_id: str, aliases: list[str]) -> list[str]:
        """Add (``name``) or remove (``-name``) aliases of a version; Vertex takes an added alias
        from the version that held it. Returns the version's aliases after."""
        result = self.call(f"moving alias {', '.join(aliases)} to {model}@{version_id}",
                           self.models.merge_version_aliases,
                           request={"name": f"{model}@{version_id}", "version_aliases": aliases})
        return list(result.version_aliases)

    # -- endpoints -----------------------------------------------------------------------------

    def get_endpoint(self, name: str) -> Any:
        return self.call(f"reading endpoint {name}", self.endpoints.get_endpoint, name=name)

    def find_endpoint(self, ref: str) -> Any | None:
        """The endpoint ``ref`` names (resource name, id or display name), or None."""
        if ref.startswith("projects/") or ref.isdigit():
            name = ref if ref.startswith("projects/") else f"{self.parent}/endpoints/{ref}"
            return self.get_endpoint(name)
        query = {"parent": self.parent, "filter": f"display_name={_quoted(ref)}"}
        found = self.call(f"listing endpoints named {ref!r}", lambda: list(self.endpoints.list_endpoints(query)))
        if len(found) > 1:
            raise UserInputError(f"Vertex AI has {len(found)} endpoints named {ref!r} in {self.parent} "
                                 f"({', '.join(e.name for e in found)}): set deploy.vertex.endpoint to the id of one")
        return found[0] if found else None

    def start_create_endpoint(self, display_name: str) -> str:
        """Start a CreateEndpoint; returns the operation's name."""
        operation = self.call(f"creating endpoint {display_name!r}", self.endpoints.create_endpoint,
                              parent=self.parent, endpoint={"display_name": display_name})
        return operation.operation.name

    def created_endpoint(self, operation_response: Any) -> str:
        """The endpoint's resource name from a finished CreateEndpoint's response."""
        from google.cloud import aiplatform_v1

        return aiplatform_v1.Endpoint.deserialize(operation_response.value).name

    def start_deploy(self, endpoint: str, deployed_model: dict, traffic_split: dict[str, int]) -> str:
        """Start a DeployModel (``"0"`` in the split is the model being deployed); the operation's name."""
        operation = self.call(f"deploying {deployed_model['model']} to {endpoint}", self.endpoints.deploy_model,
                              endpoint=endpoint, deployed_model=deployed_model, traffic_split=traffic_split)
        return operation.operation.name

    def deployed_id(self, operation_response: Any) -> str:
        from google.cloud import aiplatform_v1

        return aiplatform_v1.DeployModelResponse.deserialize(operation_response.value).deployed_model.id

    def set_traffic(self, endpoint: str, traffic_split: dict[str, int]) -> None:
        from google.protobuf import field_mask_pb2

        self.call(f"setting the traffic of {endpoint} to {traffic_split}", self.endpoints.update_endpoint,
                  endpoint={"name": endpoint, "traffic_split": traffic_split},
                  update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]))

    def undeploy(self, endpoint: str, deployed_model_id: str) -> None:
        what = f"undeploying {deployed_model_id} from {endpoint}"
        operation = self.call(what, self.endpoints.undeploy_model, endpoint=endpoint,
                              deployed_model_id=deployed_model_id)
        self.wait(what, operation.operation.name)


def api_error(what: str, exc: BaseException) -> ModelyardError | None:
    """modelyard's error for a failure of a Vertex AI call, or None for one that is not the API's."""
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    if isinstance(exc, api.GoogleAPICallError):
        status = exc.code if isinstance(exc.code, int) else 500
        message = f"Vertex AI {what}: {one_line(exc.message or exc)} (HTTP {status})"
        if status == 403:
            message += "; the credentials need roles/aiplatform.user on the project"
        return TransientError(message) if status >= 500 or status in TRANSIENT_STATUS else UserInputError(message)
    if isinstance(exc, auth.DefaultCredentialsError):
        return UserInputError(f"Vertex AI {what}: no Google Cloud credentials found (Application Default "
                              "Credentials: run with a service account or set GOOGLE_APPLICATION_CREDENTIALS)")
    if isinstance(exc, (auth.TransportError, auth.RefreshError, api.RetryError, requests.RequestException,
                        TimeoutError)):
        return TransientError(f"Vertex AI {what}: {type(exc).__name__}: {one_line(exc)}")
    return None


def check_accelerator(name: str) -> None:
    """Refuse an accelerator type the API does not know, naming those it does."""
    try:
        from google.cloud import aiplatform_v1
    except ImportError:
        raise UserInputError(INSTALL_HINT) from None
    known = [n for n in aiplatform_v1.AcceleratorType.__members__ if n != "ACCELERATOR_TYPE_UNSPECIFIED"]
    if name not in known:
        raise UserInputError(f"deploy.vertex.accelerator_type {name!r} is not a Vertex AI accelerator type "
                             f"(known: {', '.join(known)})")


def allocate_traffic(current: dict[str, int], deployed_id: str, percentage: int) -> dict[str, int]:
    """``percentage`` for ``deployed_id``; the rest shared by the others in their current proportions
    (as the SDK's ``Endpoint.deploy`` does). Alone on the endpoint, a version takes all of it."""
    others = {k: v for k, v in current.items() if k != deployed_id and v > 0}
    if not others or percentage >= 100:
        return {deployed_id: 100}
    total, rest = sum(others.values()), 100 - percentage
    split = {k: v * rest // total for k, v in others.items()}
    for k in sorted(others, key=lambda k: -others[k])[: rest - sum(split.values())]:
        split[k] += 1  # the rounding remainder, largest shares first
    split[deployed_id] = percentage
    return {k: v for k, v in split.items() if v > 0}


def _quoted(text: str) -> str:
    """A string literal for a list filter (``display_name="..."``)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
