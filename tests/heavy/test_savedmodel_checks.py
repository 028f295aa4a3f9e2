"""SavedModels checked completely, and Keras archives read once: crafted files are refused and never run.

On main a TF1-style SavedModel whose init op (``saved_model_main_op``) was ``WriteFile`` or
``SaveV2`` wrote a file inside ``tf.saved_model.load``, and a harmless MetaGraph tagged
``{serve, gpu}`` in front of a crafted one tagged ``{serve}`` passed the check while the loader took
the crafted one. The control tests show each crafted file writes when loaded unchecked.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from shared.errors import UserInputError
from tests.conftest import require
from tests.models import tf_files
from tests.reliability.crafted_jobs import convert

pytestmark = [pytest.mark.heavy, pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")]

X = np.ones((2, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def tf():
    require("tf2onnx")
    return require("tensorflow")


def convert_saved_model(folder: Path, workdir: Path):
    return convert("tf-savedmodel", folder, workdir, samples={"batch": 2})


# --- init ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["write", "save"])
def test_control_an_init_op_writes_when_loaded_unchecked(tf, tmp_path, init):
    marker = tmp_path / "pwned"
    folder = tf_files.tf1_saved_model(tmp_path / "evil", ["serve"], init=init, marker=marker)

    tf.saved_model.load(str(folder), tags=["serve"])

    assert tf_files.written(marker)


@pytest.mark.parametrize(("init", "phrase"), [
    ("write", "the init op (saved_model_main_op) runs operation 'WriteFile' (node 'WriteFile'), which reads or "
              "writes files"),
    ("save", "the init op (saved_model_main_op) runs operation 'SaveV2' (writes checkpoint files) when the model "
             "loads"),
])
def test_an_init_op_touching_files_is_refused_and_never_runs(tf, tmp_path, init, phrase):
    marker = tmp_path / "pwned"
    folder = tf_files.tf1_saved_model(tmp_path / "evil", ["serve"], init=init, marker=marker)

    with pytest.raises(UserInputError, match="MetaGraph 0") as caught:
        convert_saved_model(folder, tmp_path / "out")
    assert phrase in str(caught.value)
    assert not tf_files.written(marker)


def test_an_init_op_restoring_another_file_is_refused(tf, tmp_path):
    folder = tf_files.tf1_saved_model(tmp_path / "honest", ["serve"])
    graph = _graph_with_init(tf, folder, lambda: tf.raw_ops.RestoreV2(
        prefix=str(tmp_path / "elsewhere"), tensor_names=["w"], shape_and_slices=[""], dtypes=[tf.float32]))

    with pytest.raises(UserInputError, match=r"runs operation 'RestoreV2' \(reads checkpoint files\)"):
        convert_saved_model(graph, tmp_path / "out")


def _graph_with_init(tf, folder: Path, make_op) -> Path:
    """The SavedModel with one more node, named in the saved_model_main_op collection."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((folder / "saved_model.pb").read_bytes())
    with tf.Graph().as_default() as extra:
        make_op()
    meta = saved.meta_graphs[0]
    for node in extra.as_graph_def().node:
        node.name = f"crafted/{node.name}"
        node.input[:] = [f"crafted/{name}" for name in node.input]
        meta.graph_def.node.append(node)
    meta.collection_def["saved_model_main_op"].node_list.value[:] = [meta.graph_def.node[-1].name]
    (folder / "saved_model.pb").write_bytes(saved.SerializeToString())
    return folder


# --- tag sets --------------------------------------------------------------------------------


@pytest.fixture
def harmless_first(tf, tmp_path):
    """A harmless MetaGraph tagged {serve, gpu}, then one tagged exactly {serve} whose init op runs SaveV2."""
    marker = tmp_path / "pwned"
    harmless = tf_files.tf1_saved_model(tmp_path / "harmless", ["serve", "gpu"])
    evil = tf_files.tf1_saved_model(tmp_path / "evil", ["serve"], init="save", marker=marker)
    return tf_files.with_second_meta_graph(harmless, evil, tmp_path / "twin"), marker


def test_control_the_loader_takes_the_metagraph_tagged_exactly_serve(tf, harmless_first):
    folder, marker = harmless_first

    tf.saved_model.load(str(folder), tags=["serve"])

    assert tf_files.written(marker)


def test_a_crafted_metagraph_behind_a_harmless_one_is_refused(tf, tmp_path, harmless_first):
    folder, marker = harmless_first

    with pytest.raises(UserInputError, match=r"MetaGraph 1 \(tags \['serve'\]\): the init op"):
        convert_saved_model(folder, tmp_path / "out")
    assert not tf_files.written(marker)


def test_two_metagraphs_tagged_exactly_serve_are_refused_as_ambiguous(tf, tmp_path):
    first = tf_files.tf1_saved_model(tmp_path / "first", ["serve"])
    second = tf_files.tf1_saved_model(tmp_path / "second", ["serve"])
    folder = tf_files.with_second_meta_graph(first, second, tmp_path / "both")

    with pytest.raises(UserInputError, match="2 MetaGraphs match the tag 'serve'.*ambiguous"):
        convert_saved_model(folder, tmp_path / "out")


def test_the_only_serving_metagraph_loads_with_exactly_its_tags(tf, tmp_path):
    folder = tf_files.tf1_saved_model(tmp_path / "gpu_only", ["serve", "gpu"])

    result = convert_saved_model(folder, tmp_path / "out")

    np.testing.assert_allclose(result.reference["y"], result.samples["x"] @ np.ones((4, 2)), rtol=1e-6)


# --- assets and links ------------------------------------------------------------------------


def test_an_asset_outside_the_assets_folder_is_refused(tf, tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2

    folder = tf_files.tf1_saved_model(tmp_path / "assets", ["serve"])
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((folder / "saved_model.pb").read_bytes())
    asset = saved.meta_graphs[0].asset_file_def.add()
    asset.filename = "../../../etc/passwd"
    asset.tensor_info.name = "x:0"
    (folder / "saved_model.pb").write_bytes(saved.SerializeToString())

    with pytest.raises(UserInputError, match=r"asset file '\.\./\.\./\.\./etc/passwd' is not a plain name"):
        convert_saved_model(folder, tmp_path / "out")


def test_a_linked_variables_file_is_refused(tf, tmp_path):
    folder = tf_files.tf1_saved_model(tmp_path / "linked", ["serve"])
    data = next((folder / "variables").glob("variables.data-*"))
    data.unlink()
    data.symlink_to("/etc/hostname")

    with pytest.raises(UserInputError, match="is a symbolic link"):
        convert_saved_model(folder, tmp_path / "out")


# --- Keras archives --------------------------------------------------------------------------


def _keras_file(tmp_path: Path) -> Path:
    import keras

    model = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(2, name="y")])
    path = tmp_path / "model.keras"
    model.save(path)
    return path


def test_a_keras_archive_listing_its_config_twice_is_refused(tf, tmp_path):
    honest = _keras_file(tmp_path)
    evil = tmp_path / "evil.keras"
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(evil, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json":
                out.writestr(zipfile.ZipInfo("config.json"), data.replace(b'"module": "keras.layers"',
                                                                          b'"module": "subprocess"', 1))
            out.writestr(zipfile.ZipInfo(info.filename), data)

    with pytest.raises(UserInputError, match="archive member 'config.json' appears twice"):
        convert("keras", evil, tmp_path / "out", samples={"batch": 2})


def test_a_keras_archive_converts_from_the_rewritten_copy(tf, tmp_path):
    result = convert("keras", _keras_file(tmp_path), tmp_path / "out", samples={"batch": 2})

    assert result.reference["y"].shape == (2, 2)
