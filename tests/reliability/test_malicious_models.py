"""A model file is untrusted input: crafted files fail the job with a clear message, and nothing runs.

Each pickle payload here would call ``open(marker, 'w')`` when unpickled (tests/models/
torch_files.py), so the marker file's absence after the job shows the payload never ran on the
worker. The jobs go through the queue to the test cluster's worker processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from producer import api
from shared.errors import UserInputError

pytestmark = [pytest.mark.integration, pytest.mark.heavy,
              pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")]

torch = pytest.importorskip("torch")

from tests.models import torch_files  # noqa: E402  (imports torch: after the skips above)

INPUTS = "inputs: [{name: x, dtype: float32, shape: [batch, 3, 64, 64]}]"


def run_job(folder: Path, text: str) -> dict:
    job = folder / "job.yaml"
    job.write_text(text)
    return api.wait(api.submit(job), timeout=300)


def assert_failed_in_convert(job: dict, *phrases: str) -> None:
    assert job["state"] == "FAILED", job
    assert job["stages"]["convert"]["state"] == "failed"
    for phrase in phrases:
        assert phrase in job["error"], job["error"]


@pytest.fixture(scope="module")
def resnet():
    return torch_files.seeded_resnet18(0)


def test_pt_state_dict_with_a_pickle_payload_fails_and_the_payload_never_runs(cluster, producer_env, tmp_path,
                                                                              resnet):
    marker = tmp_path / "pwned"
    torch_files.poisoned_state_dict(resnet, tmp_path / "resnet18.pt", marker)
    job = run_job(tmp_path, f"model: {{name: evil-pt, source: ./resnet18.pt, format: torch-state-dict, "
                            f"factory: 'tests.models.resnet:resnet18', {INPUTS}}}\n")
    assert_failed_in_convert(job, "weights_only=True", "io.open")
    assert not marker.exists()


def test_torchscript_archive_importing_outside_torch_fails_and_the_payload_never_runs(cluster, producer_env,
                                                                                     tmp_path):
    marker = tmp_path / "pwned"
    honest, _ = torch_files.save_torchscript(tmp_path / "honest.pt")
    torch_files.poisoned_torchscript(honest, tmp_path / "evil.pt", marker)
    job = run_job(tmp_path, f"model: {{name: evil-ts, source: ./evil.pt, format: torchscript, {INPUTS}}}\n")
    assert_failed_in_convert(job, "data.pkl imports io.open, outside torch")
    assert not marker.exists()


def test_pt2_with_a_pickle_payload_in_its_sample_inputs_fails_and_the_payload_never_runs(cluster, producer_env,
                                                                                        tmp_path, resnet):
    marker = tmp_path / "pwned"
    honest = torch_files.save_program(resnet, tmp_path / "honest.pt2")
    torch_files.poisoned_program(honest, tmp_path / "evil.pt2", marker)
    job = run_job(tmp_path, "model: {name: evil-pt2, source: ./evil.pt2, format: torch-exported}\n")
    assert_failed_in_convert(job, "sample inputs", "io.open", "refused as unsafe")
    assert not marker.exists()


def test_factory_outside_the_allow_list_fails_naming_the_setting(cluster, producer_env, tmp_path, resnet):
    torch_files.save_safetensors(resnet, tmp_path / "w.safetensors")
    job = run_job(tmp_path, f"model: {{name: evil-factory, source: ./w.safetensors, format: torch-state-dict, "
                            f"factory: 'os:system', {INPUTS}}}\n")
    assert_failed_in_convert(job, "'os:system' is not allowed", "MODELYARD_ALLOWED_FACTORIES")


# ---------------------------------------------------------------------------------------------
# ONNX external data that points outside the model's folder


def onnx_with_external_weights(path: Path, location: str, *, sparse: bool = False) -> Path:
    """A MatMul whose weight tensor says its bytes are in ``location`` (a sparse initializer's values if ``sparse``)."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [12] if sparse else [4, 3],
                                np.zeros(12, dtype=np.float32).tolist())
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        weight.external_data.add(key=key, value=value)
    initializers: dict = {"initializer": [weight]}
    if sparse:
        indices = helper.make_tensor("w_indices", TensorProto.INT64, [12], list(range(12)))
        initializers = {"sparse_initializer": [helper.make_sparse_tensor(weight, indices, [4, 3])]}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], **initializers,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize(("location", "phrase"), [
    ("../../etc/passwd", "'..' is refused"),
    ("/etc/passwd", "absolute paths are refused"),
])
def test_onnx_external_data_outside_the_model_folder_fails_the_job(cluster, producer_env, tmp_path, location,
                                                                   phrase, sparse):
    onnx_with_external_weights(tmp_path / "model" / "model.onnx", location, sparse=sparse)
    job = run_job(tmp_path, "model: {name: evil-onnx, source: ./model, format: onnx}\n")
    assert_failed_in_convert(job, f"external data location {location!r}", phrase)


@pytest.mark.parametrize(("location", "phrase"), [
    ("../outside.bin", "'..' is refused"),
    ("/etc/passwd", "absolute paths are refused"),
    ("linked.bin", "symlinks are refused"),
])
def test_onnx_sparse_initializer_with_external_data_outside_the_folder_is_refused_by_the_converter(
        tmp_path, location, phrase):
    from tests.reliability.crafted_jobs import convert

    model = onnx_with_external_weights(tmp_path / "model" / "model.onnx", location, sparse=True)
    (tmp_path / "outside.bin").write_bytes(bytes(48))
    (model.parent / "linked.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(UserInputError, match=f"tensor 'w' has external data location {location!r}: {phrase}"):
        convert("onnx", model.parent, tmp_path / "out")


def test_onnx_sparse_initializer_with_external_data_beside_it_converts_self_contained(tmp_path):
    import onnx

    from tests.reliability.crafted_jobs import convert

    model = onnx_with_external_weights(tmp_path / "model" / "model.onnx", "weights.bin", sparse=True)
    weights = np.arange(12, dtype=np.float32)
    (model.parent / "weights.bin").write_bytes(weights.tobytes())

    result = convert("onnx", model.parent, tmp_path / "out")

    x = result.samples["x"]
    np.testing.assert_allclose(result.reference["y"], x @ weights.reshape(4, 3), rtol=1e-5)
    copy = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]
    assert copy.graph.sparse_initializer[0].values.data_location == onnx.TensorProto.DEFAULT


def test_onnx_folder_with_a_symlinked_data_file_is_refused_at_submit(producer_env, tmp_path):
    model = onnx_with_external_weights(tmp_path / "model" / "model.onnx", "weights.bin")
    (model.parent / "weights.bin").symlink_to("/etc/passwd")
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: evil-link, source: ./model, format: onnx}\n")
    with pytest.raises(UserInputError, match="weights.bin is a symbolic link"):
        api.submit(job)


def test_onnx_external_data_through_a_symlink_is_refused_by_the_converter(tmp_path):
    # the same folder arriving at a worker some other way: the converter refuses the link itself
    from shared.jobspec import ConvertSpec, ModelSpec
    from shared.settings import Settings
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    model = onnx_with_external_weights(tmp_path / "model" / "model.onnx", "weights.bin")
    (model.parent / "weights.bin").symlink_to("/etc/passwd")
    request = ConvertRequest(source=model.parent, model=ModelSpec(name="m", source="model", format="onnx"),
                             convert=ConvertSpec(), workdir=tmp_path, settings=Settings())
    with pytest.raises(UserInputError, match="symlinks are refused"):
        registry.converter("onnx").convert(request)


# ---------------------------------------------------------------------------------------------
# .pt2 graphs that torch.export.load would evaluate: refused before anything is loaded


def _chars(text: str) -> str:
    return "+".join(f"chr({ord(c)})" for c in text)


def _guard_opens(marker: Path):
    def edit(model: dict) -> None:
        model["guards_code"] = [f"L['x'].size()[1] == 3 and open('{marker}', 'w') is not None"]
    return edit


def _expression_opens(marker: Path):
    def edit(model: dict) -> None:
        for value in model["graph_module"]["graph"]["tensor_values"].values():
            for size in value["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = f"open({_chars(str(marker))}, chr(119)) and s77"
    return edit


def _target_is_os_system(_marker: Path):
    def edit(model: dict) -> None:
        model["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
    return edit


@pytest.mark.parametrize(("edit", "phrase"), [
    (_guard_opens, "is not a shape check"),
    (_expression_opens, "is not a plain expression"),
    (_target_is_os_system, "'torch.os.system', which is not a torch operator"),
], ids=["guard", "shape-expression", "node-target"])
def test_pt2_whose_graph_would_run_code_is_refused_before_loading(tmp_path, resnet, edit, phrase):
    from shared.jobspec import ConvertSpec, ModelSpec
    from shared.settings import Settings
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    marker = tmp_path / "pwned"
    honest = torch_files.save_program(resnet, tmp_path / "honest.pt2")
    evil = torch_files.tampered_program_json(honest, tmp_path / "evil.pt2", edit(marker))
    request = ConvertRequest(source=evil, model=ModelSpec(name="m", source="evil.pt2", format="torch-exported"),
                             convert=ConvertSpec(samples={"batch": 2}), workdir=tmp_path, settings=Settings())
    with pytest.raises(UserInputError, match="refused"):
        try:
            registry.converter("torch-exported").convert(request)
        except UserInputError as exc:
            assert phrase in str(exc)
            raise
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_torchscript_payload_is_caught_whichever_pickle_protocol_names_it(tmp_path, protocol):
    # protocol 2 names the callable with GLOBAL, protocol 4 with STACK_GLOBAL from memoized strings
    import pickle

    from worker.support.pickle_scan import check_torchscript_archive
    from worker.support.zip_check import open_checked_zip

    marker = tmp_path / "pwned"
    honest, _ = torch_files.save_torchscript(tmp_path / "honest.pt")
    payload = pickle.dumps(torch_files.OpenMarker(marker), protocol=protocol)
    evil = torch_files.rewrite_zip(honest, tmp_path / "evil.pt", {"/constants.pkl": payload})
    with open_checked_zip(evil, "evil.pt", max_bytes=2**30) as archive, pytest.raises(
            UserInputError, match=r"constants\.pkl imports io\.open, outside torch"):
        check_torchscript_archive(archive, "evil.pt")
    assert not marker.exists()
