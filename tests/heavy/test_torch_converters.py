"""The PyTorch converters on real models: ResNet-18 (seeded random init) and a small TorchScript CNN.

Each model is converted once per module; the converted ONNX is run with ONNX Runtime at the
sample batch and at batch 1 and 3, and compared with the torch module itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from shared.errors import UserInputError
from shared.jobspec import ConvertSpec, ModelSpec, TensorSpec
from shared.settings import Settings

pytestmark = [pytest.mark.heavy, pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")]

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

from tests.models import torch_files  # noqa: E402  (imports torch: after the skips above)

IMAGE_INPUT = [TensorSpec(name="x", dtype="float32", shape=["batch", 3, 64, 64])]
TEST_FACTORIES = ["torchvision.models:*", "tests.models.resnet:*"]


def convert(fmt: str, source: Path, workdir: Path, *, inputs=IMAGE_INPUT, factory=None, samples=None,
            factories=TEST_FACTORIES):
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    workdir.mkdir(parents=True, exist_ok=True)
    request = ConvertRequest(
        source=source,
        model=ModelSpec(name="m", source=source.name, format=fmt, inputs=inputs, factory=factory),
        convert=ConvertSpec(samples={"batch": 2, "seed": 0}),
        workdir=workdir,
        settings=Settings(allowed_factories=factories),
        samples=samples,
    )
    result = registry.converter(fmt).convert(request)
    return result, workdir / result.model_file


def run_onnx(model: Path, x: np.ndarray) -> np.ndarray:
    from shared.inference.runtime import load_session

    session = load_session(model, threads=2)
    return session.run({session.inputs[0].name: x})[session.outputs[0].name]


def run_torch(module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def resnet():
    return torch_files.seeded_resnet18(0)


@pytest.fixture(scope="module")
def state_dict_conversion(resnet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("state-dict")
    weights = torch_files.save_safetensors(resnet, folder / "resnet18.safetensors")
    return convert("torch-state-dict", weights, folder / "out", factory="tests.models.resnet:resnet18")


@pytest.fixture(scope="module")
def exported_conversion(resnet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    program = torch_files.save_program(resnet, folder / "resnet18.pt2")
    return convert("torch-exported", program, folder / "out", inputs=None)


@pytest.fixture(scope="module")
def torchscript_conversion(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchscript")
    archive, module = torch_files.save_torchscript(folder / "small.pt")
    return convert("torchscript", archive, folder / "out"), module


def test_state_dict_reference_is_the_torch_modules_output_and_onnx_matches_it(state_dict_conversion, resnet):
    result, model = state_dict_conversion
    x = result.samples["x"]
    assert x.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(result.reference["output"], run_torch(resnet, x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(run_onnx(model, x), result.reference["output"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_state_dict_onnx_runs_at_other_batch_sizes(state_dict_conversion, resnet, batch):
    _, model = state_dict_conversion
    x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(model, x), run_torch(resnet, x), rtol=0, atol=1e-4)


def test_state_dict_records_inputs_outputs_and_factory(state_dict_conversion):
    result, _ = state_dict_conversion
    assert [t.to_dict() for t in result.inputs] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 64, 64]}]
    assert [t.to_dict() for t in result.outputs] == [{"name": "output", "dtype": "float32", "shape": ["batch", 1000]}]
    assert result.extra["factory"] == "tests.models.resnet:resnet18"


def test_state_dict_from_a_plain_torch_save_file_loads_with_weights_only(resnet, tmp_path):
    weights = tmp_path / "resnet18.pt"
    torch.save(resnet.state_dict(), weights)
    result, model = convert("torch-state-dict", weights, tmp_path / "out", factory="tests.models.resnet:resnet18")
    np.testing.assert_allclose(run_onnx(model, result.samples["x"]), result.reference["output"], rtol=0, atol=1e-4)


def test_exported_program_takes_its_inputs_from_the_program(exported_conversion):
    result, _ = exported_conversion
    assert [t.to_dict() for t in result.inputs] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 64, 64]}]


def test_exported_program_onnx_matches_the_torch_model(exported_conversion, resnet):
    result, model = exported_conversion
    x = result.samples["x"]
    np.testing.assert_allclose(result.reference["output"], run_torch(resnet, x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(run_onnx(model, x), result.reference["output"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_program_onnx_runs_at_other_batch_sizes(exported_conversion, resnet, batch):
    _, model = exported_conversion
    x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(model, x), run_torch(resnet, x), rtol=0, atol=1e-4)


def test_torchscript_onnx_matches_the_torch_model(torchscript_conversion):
    (result, model), module = torchscript_conversion
    x = result.samples["x"]
    np.testing.assert_allclose(result.reference["output"], run_torch(module, x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(run_onnx(model, x), result.reference["output"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_torchscript_onnx_runs_at_other_batch_sizes(torchscript_conversion, batch):
    (_, model), module = torchscript_conversion
    x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(model, x), run_torch(module, x), rtol=0, atol=1e-5)


def test_torchscript_takes_user_samples_and_their_shape(torchscript_conversion, tmp_path):
    (_, _), module = torchscript_conversion
    archive, _ = torch_files.save_torchscript(tmp_path / "small.pt")
    x = np.random.default_rng(7).standard_normal((4, 3, 16, 16)).astype(np.float32)
    result, model = convert("torchscript", archive, tmp_path / "out", inputs=None, samples={"x": x})
    assert result.inputs[0].shape == ["batch", 3, 16, 16] and result.extra["samples"] == "user"
    np.testing.assert_array_equal(result.samples["x"], x)
    np.testing.assert_allclose(run_onnx(model, x), run_torch(module, x), rtol=0, atol=1e-5)


def test_torchscript_without_inputs_or_samples_is_refused_naming_model_inputs(tmp_path):
    archive, _ = torch_files.save_torchscript(tmp_path / "small.pt")
    with pytest.raises(UserInputError, match=r"model\.inputs is required for format torchscript"):
        convert("torchscript", archive, tmp_path / "out", inputs=None)


def test_torchscript_traced_at_a_fixed_batch_is_refused_as_not_batch_dynamic(tmp_path):
    archive = torch_files.save_traced_fixed_batch(tmp_path / "fixed.pt")
    inputs = [TensorSpec(name="x", dtype="float32", shape=["batch", 3, 8, 8])]
    with pytest.raises(UserInputError, match="does not handle another batch size"):
        convert("torchscript", archive, tmp_path / "out", inputs=inputs)


def test_torchscript_traced_at_a_fixed_batch_converts_when_the_batch_is_declared_fixed(tmp_path):
    archive = torch_files.save_traced_fixed_batch(tmp_path / "fixed.pt")
    inputs = [TensorSpec(name="x", dtype="float32", shape=[2, 3, 8, 8])]
    result, _ = convert("torchscript", archive, tmp_path / "out", inputs=inputs)
    assert result.inputs[0].shape == [2, 3, 8, 8]


def test_state_dict_without_a_factory_is_refused_naming_model_factory(resnet, tmp_path):
    weights = torch_files.save_safetensors(resnet, tmp_path / "w.safetensors")
    with pytest.raises(UserInputError, match=r"model\.factory is required"):
        convert("torch-state-dict", weights, tmp_path / "out")


def test_state_dict_with_weights_of_another_architecture_names_the_mismatch(tmp_path):
    _, module = torch_files.save_torchscript(tmp_path / "small.pt")
    weights = torch_files.save_safetensors(module, tmp_path / "small.safetensors")
    with pytest.raises(UserInputError, match="do not fit the architecture from tests.models.resnet:resnet18"):
        convert("torch-state-dict", weights, tmp_path / "out", factory="tests.models.resnet:resnet18")


def test_exported_program_with_inputs_naming_a_fixed_dim_symbolic_is_refused(tmp_path):
    # the program fixes the image size at 64x64; declaring it symbolic would export a wrong dynamic axis
    program = torch_files.save_program(torch_files.SmallCNN().eval(), tmp_path / "small.pt2")
    inputs = [TensorSpec(name="x", dtype="float32", shape=["batch", 3, "height", 64])]
    with pytest.raises(UserInputError, match="fixes it at 64"):
        convert("torch-exported", program, tmp_path / "out", inputs=inputs)


# --- a torch.export program that computes with its batch size -----------------------------------


class GruAttention(torch.nn.Module):
    """A GRU and multi-head attention: the exported graph reads the batch size (the GRU's initial
    state, the attention's reshapes), so its shape expressions are ``Mul(Integer(64), Symbol(...))``."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(16, 64, batch_first=True)
        self.attention = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        self.head = torch.nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.gru(x)
        attended, _ = self.attention(hidden, hidden, hidden)
        return self.head(attended.mean(dim=1))


@pytest.fixture(scope="module")
def gru_attention_conversion(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gru-attention")
    torch.manual_seed(0)
    model = GruAttention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the tensor attributes self.gru._flat_weights were assigned during export"
        program = torch.export.export(model, (torch.randn(3, 10, 16),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(folder / "gru_attention.pt2"))
    result, onnx_model = convert("torch-exported", folder / "gru_attention.pt2", folder / "out", inputs=None)
    return model, result, onnx_model


def test_gru_attention_program_shape_expressions_are_accepted(gru_attention_conversion):
    _, result, _ = gru_attention_conversion
    assert [t.to_dict() for t in result.inputs] == [{"name": "x", "dtype": "float32", "shape": ["batch", 10, 16]}]
    assert [t.to_dict() for t in result.outputs] == [{"name": "output", "dtype": "float32", "shape": ["batch", 5]}]


@pytest.mark.parametrize("batch", [2, 1, 7])
def test_gru_attention_program_converts_with_cosine_at_least_0_999_against_torch(gru_attention_conversion, batch):
    from shared.inference.fidelity import compare

    model, result, onnx_model = gru_attention_conversion
    x = result.samples["x"] if batch == 2 else \
        np.random.default_rng(batch).standard_normal((batch, 10, 16)).astype(np.float32)

    figures = compare({"output": run_torch(model, x)}, {"output": run_onnx(onnx_model, x)})

    assert figures["cosine_min"] >= 0.999, figures
