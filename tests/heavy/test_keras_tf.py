"""Keras and TensorFlow SavedModel sources: conversion to ONNX and TFLite, and unsafe inputs.

A small CNN is trained once per module on scikit-learn's digits (a few seconds). Tests marked
heavy load TensorFlow; the archive tests need nothing but the standard library.
"""

from __future__ import annotations

import io
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from shared.errors import UserInputError
from shared.jobspec import ConvertSpec, ModelSpec
from shared.settings import Settings
from tests import digits as digits_data
from tests.conftest import require

heavy = pytest.mark.heavy
GIB = 2**30


# --- helpers ---------------------------------------------------------------------------------


def convert(fmt: str, source: Path, workdir: Path, to: str, *, samples=None, settings: Settings | None = None):
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    workdir.mkdir(parents=True, exist_ok=True)
    request = ConvertRequest(
        source=source,
        model=ModelSpec(name="digits", source=source.name, format=fmt),
        convert=ConvertSpec(to=to),
        workdir=workdir,
        settings=settings or Settings(),
        samples=samples,
    )
    return registry.converter(fmt).convert(request)


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    from shared.inference.runtime import load_session

    outputs = load_session(path, threads=2).run({digits_data.INPUT: x})
    assert len(outputs) == 1  # the logits (Keras's own SavedModel export calls them output_0)
    return next(iter(outputs.values()))


def tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, data: bytes = b"x", **fields) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if fields.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data if info.type == tarfile.REGTYPE else None


def gzip_tar_of_zeros(path: Path, name: str, size: int) -> Path:
    """A valid .tar.gz with one ``size``-byte zero-filled member, built without writing ``size`` bytes.

    After the 512-byte header the whole tar stream is zeros (data, padding, end blocks), so it is
    deflated as one 1 MiB block of zeros, full-flushed (which makes the block's bytes
    independent of what came before) and repeated: ~1 KiB per MiB on disk.
    """
    header = tarfile.TarInfo(name)
    header.size = size
    head = header.tobuf(format=tarfile.GNU_FORMAT)
    tail = size + (-size % 512) + 1024
    tail += -(len(head) + tail) % tarfile.RECORDSIZE
    chunk = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block_compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = block_compressor.compress(bytes(chunk)) + block_compressor.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(head)
    zeros = bytes(chunk)
    with open(path, "wb") as out:
        out.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff")
        out.write(compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH))
        full, rest = divmod(tail, chunk)
        for _ in range(full):
            out.write(block)
            crc = zlib.crc32(zeros, crc)
        out.write(compressor.compress(bytes(rest)) + compressor.flush(zlib.Z_FINISH))
        crc = zlib.crc32(bytes(rest), crc)
        out.write(struct.pack("<II", crc & 0xFFFFFFFF, (len(head) + tail) & 0xFFFFFFFF))
    return path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> digits_data.Digits:
    require("tensorflow")
    require("tf2onnx")
    require("ai_edge_litert")
    require("sklearn")
    return digits_data.train(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def saved_model_dir(digits, tmp_path_factory) -> Path:
    """The digits model exported the way Keras users ship a SavedModel: ``model.export(dir)``."""
    import keras

    folder = tmp_path_factory.mktemp("savedmodel") / "digits_savedmodel"
    keras.saving.load_model(digits.keras_file).export(str(folder), verbose=False)
    return folder


@pytest.fixture(scope="module")
def converted(digits, saved_model_dir, tmp_path_factory):
    """Convert on demand, once per (format, source kind, target)."""
    cache: dict[tuple[str, str, str], tuple] = {}

    def get(fmt: str, kind: str, to: str):
        key = (fmt, kind, to)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{fmt}-{kind}-{to}")
            if kind == "keras":
                source = digits.keras_file
            elif kind == "folder":
                source = saved_model_dir
            else:
                source = root / "digits_savedmodel.tar.gz"
                with tarfile.open(source, "w:gz") as tar:
                    tar.add(saved_model_dir, arcname="digits_savedmodel")
            samples = {digits_data.INPUT: digits.x_test}
            result = convert(fmt, source, root / "out", to, samples=samples)
            cache[key] = (result, root / "out")
        return cache[key]

    return get


# --- conversions -----------------------------------------------------------------------------


@heavy
@pytest.mark.parametrize("to", ["onnx", "tflite"])
def test_keras_conversion_keeps_test_accuracy_within_half_a_point(digits, converted, to):
    result, out = converted("keras", "keras", to)

    accuracy = digits.accuracy(run_model(out / result.model_file, digits.x_test))

    assert digits.keras_accuracy > 0.8  # the model learned something: the comparison means something
    assert abs(accuracy - digits.keras_accuracy) <= 0.005


@heavy
@pytest.mark.parametrize("to", ["onnx", "tflite"])
def test_keras_reference_outputs_are_keras_own(digits, converted, to):
    result, _ = converted("keras", "keras", to)

    np.testing.assert_allclose(result.reference[digits_data.OUTPUT], digits.keras_logits, atol=1e-5)


@heavy
@pytest.mark.parametrize("to", ["onnx", "tflite"])
def test_converted_model_has_the_source_names_and_a_symbolic_batch(converted, to):
    from shared.inference.runtime import load_session

    result, out = converted("keras", "keras", to)
    session = load_session(out / result.model_file)

    assert [(t.name, t.shape) for t in session.inputs] == [(digits_data.INPUT, ["batch", 8, 8, 1])]
    assert [t.name for t in session.outputs] == [digits_data.OUTPUT]


@heavy
def test_tflite_model_runs_at_any_batch_size(digits, converted):
    result, out = converted("keras", "keras", "tflite")
    from shared.inference.runtime import load_session

    session = load_session(out / result.model_file)
    one = session.run({digits_data.INPUT: digits.x_test[:1]})[digits_data.OUTPUT]
    many = session.run({digits_data.INPUT: digits.x_test[:33]})[digits_data.OUTPUT]

    assert one.shape == (1, 10) and many.shape == (33, 10)
    np.testing.assert_allclose(many[:1], one, atol=1e-5)


@heavy
def test_tflite_conversion_stores_the_saved_model_for_the_optimizers(converted):
    result, out = converted("keras", "keras", "tflite")

    assert result.model_file == "model.tflite"
    assert (out / "saved_model" / "saved_model.pb").is_file()


@heavy
def test_onnx_conversion_stores_no_saved_model(converted):
    _result, out = converted("keras", "keras", "onnx")

    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


@heavy
@pytest.mark.parametrize("kind", ["folder", "tar.gz"])
@pytest.mark.parametrize("to", ["onnx", "tflite"])
def test_savedmodel_conversion_keeps_test_accuracy_within_half_a_point(digits, converted, kind, to):
    result, out = converted("tf-savedmodel", kind, to)

    accuracy = digits.accuracy(run_model(out / result.model_file, digits.x_test))

    assert abs(accuracy - digits.keras_accuracy) <= 0.005


@heavy
@pytest.mark.parametrize("to", ["float16", "dynamic-range", "int8"])
def test_tflite_variant_keeps_accuracy_within_one_point(digits, converted, tmp_path, to):
    from worker.plugins import registry
    from worker.plugins.base import OptimizeRequest

    result, out = converted("keras", "keras", "tflite")
    variant = registry.optimizer(to).optimize(OptimizeRequest(
        model=out / result.model_file, workdir=tmp_path, samples=result.samples, task=None,
        inputs=result.inputs, outputs=result.outputs,
    ))

    assert abs(digits.accuracy(run_model(variant, digits.x_test)) - digits.keras_accuracy) <= 0.01
    assert variant.stat().st_size < (out / result.model_file).stat().st_size


@heavy
def test_tflite_optimizer_without_a_saved_model_is_refused(converted, tmp_path):
    from worker.plugins import registry
    from worker.plugins.base import OptimizeRequest

    result, out = converted("keras", "keras", "tflite")
    lonely = tmp_path / "alone" / "model.tflite"
    lonely.parent.mkdir()
    lonely.write_bytes((out / result.model_file).read_bytes())

    with pytest.raises(UserInputError, match="needs the SavedModel"):
        registry.optimizer("int8").optimize(OptimizeRequest(
            model=lonely, workdir=tmp_path, samples=result.samples, task=None,
            inputs=result.inputs, outputs=result.outputs,
        ))


# --- unsafe Keras files ----------------------------------------------------------------------


@heavy
def test_h5_model_is_refused_because_safe_mode_does_not_cover_it(digits, tmp_path):
    import keras

    h5 = tmp_path / "digits.h5"
    keras.saving.load_model(digits.keras_file).save(h5)

    with pytest.raises(UserInputError, match=r"HDF5 \(\.h5\).*safe_mode does not protect"):
        convert("keras", h5, tmp_path / "out", "onnx")


@heavy
def test_hdf5_file_renamed_to_keras_is_refused(digits, tmp_path):
    import keras

    h5 = tmp_path / "digits.h5"
    keras.saving.load_model(digits.keras_file).save(h5)
    disguised = h5.rename(tmp_path / "digits.keras")

    with pytest.raises(UserInputError, match="legacy HDF5"):
        convert("keras", disguised, tmp_path / "out", "onnx")


def _lambda_model(tmp_path: Path) -> tuple[Path, Path]:
    """A .keras file whose Lambda layer creates a marker file when it runs."""
    import keras

    marker = tmp_path / "pwned"
    # The path is a constant in the lambda's bytecode, which Keras marshals into the file.
    payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    model = keras.Sequential([keras.Input((8, 8, 1), name="pixels"), keras.layers.Lambda(payload),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    path = tmp_path / "evil.keras"
    model.save(path)
    marker.unlink(missing_ok=True)  # building the model ran the payload once, here in the test
    return path, marker


@heavy
def test_lambda_payload_runs_when_safe_mode_is_off(digits, tmp_path):
    # The control: proves the crafted file is live, so the next test's refusal means something.
    import keras

    path, marker = _lambda_model(tmp_path)

    keras.saving.load_model(path, safe_mode=False)

    assert marker.exists()


@heavy
def test_lambda_layer_is_refused_by_safe_mode_and_never_runs(digits, tmp_path):
    path, marker = _lambda_model(tmp_path)

    with pytest.raises(UserInputError, match="safe_mode"):
        convert("keras", path, tmp_path / "out", "onnx")
    assert not marker.exists()


@heavy
def test_config_naming_a_foreign_module_is_refused(digits, tmp_path):
    evil = tmp_path / "evil.keras"
    with zipfile.ZipFile(digits.keras_file) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                data = data.replace(b'"module": "keras.layers"', b'"module": "subprocess"', 1)
                assert b"subprocess" in data
            dst.writestr(item, data)

    with pytest.raises(UserInputError, match="module 'subprocess'"):
        convert("keras", evil, tmp_path / "out", "onnx")


# --- unsafe SavedModels ----------------------------------------------------------------------


def _file_writing_saved_model(tmp_path: Path) -> tuple[Path, Path]:
    import tensorflow as tf

    marker = tmp_path / "pwned"

    class Evil(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            tf.io.write_file(str(marker), "owned")
            return {"y": x * 2.0}

    module = Evil()
    folder = tmp_path / "evil_savedmodel"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve.get_concrete_function()})
    return folder, marker


@heavy
def test_file_writing_saved_model_writes_when_run_unchecked(digits, tmp_path):
    # The control: calling the signature really writes the marker.
    import tensorflow as tf

    folder, marker = _file_writing_saved_model(tmp_path)

    tf.saved_model.load(str(folder)).signatures["serving_default"](x=tf.ones([1, 4]))

    assert marker.exists()


@heavy
def test_saved_model_with_file_operations_is_refused_and_never_runs(digits, tmp_path):
    folder, marker = _file_writing_saved_model(tmp_path)

    with pytest.raises(UserInputError, match="'WriteFile'"):
        convert("tf-savedmodel", folder, tmp_path / "out", "onnx")
    assert not marker.exists()


# --- archives --------------------------------------------------------------------------------


def test_archive_member_with_dotdot_is_refused_and_nothing_lands_outside(tmp_path):
    from worker.support.archives import extract_tar

    archive = tar_with(tmp_path / "a.tar.gz", [member("model/../../escape.txt")])

    with pytest.raises(UserInputError, match=r"'\.\.' is refused"):
        extract_tar(archive, tmp_path / "x" / "dest", max_bytes=GIB)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "x" / "escape.txt").exists()


def test_archive_member_with_absolute_path_is_refused(tmp_path):
    from worker.support.archives import extract_tar

    target = tmp_path / "absolute.txt"
    archive = tar_with(tmp_path / "a.tar.gz", [member(str(target))])

    with pytest.raises(UserInputError, match="absolute paths are refused"):
        extract_tar(archive, tmp_path / "dest", max_bytes=GIB)
    assert not target.exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_archive_link_member_is_refused(tmp_path, kind):
    from worker.support.archives import extract_tar

    archive = tar_with(tmp_path / "a.tar.gz", [member("saved_model.pb", type=kind, linkname="/etc/passwd")])

    with pytest.raises(UserInputError, match="links are refused"):
        extract_tar(archive, tmp_path / "dest", max_bytes=GIB)
    assert not (tmp_path / "dest" / "saved_model.pb").exists()


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_archive_device_or_fifo_member_is_refused(tmp_path, kind):
    from worker.support.archives import extract_tar

    archive = tar_with(tmp_path / "a.tar.gz", [member("dev", type=kind)])

    with pytest.raises(UserInputError, match="special file"):
        extract_tar(archive, tmp_path / "dest", max_bytes=GIB)


def test_archive_members_adding_up_over_the_cap_are_refused(tmp_path):
    from worker.support.archives import extract_tar

    archive = tar_with(tmp_path / "a.tar.gz", [member("a", b"1" * 600), member("b", b"2" * 600)])

    with pytest.raises(UserInputError, match="decompression bomb"):
        extract_tar(archive, tmp_path / "dest", max_bytes=1000)


def test_decompression_bomb_is_refused_before_unpacking(tmp_path):
    from worker.support.archives import extract_tar

    bomb = gzip_tar_of_zeros(tmp_path / "bomb.tar.gz", "saved_model/variables/variables.data", 3 * 10**9)
    assert bomb.stat().st_size < 8 * 2**20  # a few MB on disk, 3 GB unpacked

    with pytest.raises(UserInputError, match="decompression bomb"):
        extract_tar(bomb, tmp_path / "dest", max_bytes=GIB)
    assert folder_bytes(tmp_path / "dest") == 0


def test_bomb_builder_writes_a_valid_archive(tmp_path):
    # The control: the same builder at a readable size gives a tar.gz that unpacks whole (CRC checked).
    size = 3 * 2**20 + 5
    archive = gzip_tar_of_zeros(tmp_path / "small.tar.gz", "big", size)

    with tarfile.open(archive, "r:gz") as tar:
        data = tar.extractfile("big").read()
        names = tar.getnames()

    assert names == ["big"] and data == bytes(size)


def test_savedmodel_job_with_a_bomb_archive_fails_without_filling_the_disk(tmp_path):
    bomb = gzip_tar_of_zeros(tmp_path / "bomb.tar.gz", "digits/variables/variables.data-00000-of-00001", 3 * 10**9)
    started = time.monotonic()

    with pytest.raises(UserInputError, match="decompression bomb"):
        convert("tf-savedmodel", bomb, tmp_path / "out", "onnx", settings=Settings(max_archive_bytes=GIB))
    assert folder_bytes(tmp_path) < 16 * 2**20
    print(f"bomb refused in {time.monotonic() - started:.2f} s")
