"""TF1-style SavedModels for the SavedModel checks, honest and crafted, built in a second each.

Crafted: an init op (``saved_model_main_op``) that writes ``marker`` while ``tf.saved_model.load``
runs (``WriteFile``, or ``SaveV2`` which writes ``marker.index`` and ``marker.data-*``), and a file
whose first MetaGraph is harmless and tagged ``{serve, gpu}`` while the one tagged exactly
``{serve}``, the one the loader takes, is the crafted one. TensorFlow is imported inside the
functions, so collecting a test module that imports this stays light.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def tf1_saved_model(folder: Path, tags: list[str], *, init: str | None = None, marker: Path | None = None) -> Path:
    """y = x @ w (x: [batch, 4], w: ones [4, 2]) with ``init`` in (None, "write", "save") as its main op."""
    import tensorflow as tf

    shutil.rmtree(folder, ignore_errors=True)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        w = tf.compat.v1.get_variable("w", initializer=tf.ones([4, 2]))
        y = tf.identity(tf.matmul(x, w), name="y")
        main_op = None
        if init == "write":
            main_op = tf.io.write_file(str(marker), "written at load")
        elif init == "save":
            main_op = tf.raw_ops.SaveV2(prefix=str(marker), tensor_names=["a"], shape_and_slices=[""],
                                        tensors=[tf.constant(1.0)])
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(folder))
            signature = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(session, tags, signature_def_map={"serving_default": signature},
                                                 main_op=main_op)
            builder.save()
    return folder


def with_second_meta_graph(first: Path, second: Path, target: Path) -> Path:
    """``first``'s SavedModel (and variables) with ``second``'s MetaGraph appended after its own."""
    from tensorflow.core.protobuf import saved_model_pb2

    merged = saved_model_pb2.SavedModel()
    merged.ParseFromString((first / "saved_model.pb").read_bytes())
    other = saved_model_pb2.SavedModel()
    other.ParseFromString((second / "saved_model.pb").read_bytes())
    merged.meta_graphs.append(other.meta_graphs[0])
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(first, target)
    (target / "saved_model.pb").write_bytes(merged.SerializeToString())
    return target


def written(marker: Path) -> list[Path]:
    """What a crafted init op left: the marker itself, or SaveV2's ``marker.index`` / ``marker.data-*``."""
    return sorted(marker.parent.glob(marker.name + "*"))
