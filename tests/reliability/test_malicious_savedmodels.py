"""Crafted SavedModels through the queue: the job fails in convert with a clear message, nothing is written.

Each SavedModel's init op would write ``marker`` (``WriteFile``) or ``marker.index`` / ``marker.data-*``
(``SaveV2``) inside ``tf.saved_model.load`` (tests/heavy/test_savedmodel_checks.py shows the
crafted files write when loaded unchecked).
"""

from __future__ import annotations

import pytest

from tests.conftest import require
from tests.models import tf_files
from tests.reliability.crafted_jobs import assert_failed_in_convert, run_job

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


@pytest.fixture(scope="module", autouse=True)
def tensorflow():
    return require("tensorflow")


@pytest.mark.parametrize(("init", "phrase"), [
    ("write", "the init op (saved_model_main_op) runs operation 'WriteFile' (node 'WriteFile'), which reads or "
              "writes files"),
    ("save", "the init op (saved_model_main_op) runs operation 'SaveV2' (writes checkpoint files)"),
])
def test_savedmodel_whose_init_op_writes_a_file_fails_and_writes_nothing(cluster, producer_env, tmp_path, init,
                                                                         phrase):
    marker = tmp_path / "pwned"
    tf_files.tf1_saved_model(tmp_path / "evil_savedmodel", ["serve"], init=init, marker=marker)

    job = run_job(tmp_path, f"model: {{name: evil-init-{init}, source: ./evil_savedmodel, format: tf-savedmodel}}\n")

    assert_failed_in_convert(job, "MetaGraph 0 (tags ['serve'])", phrase)
    assert not tf_files.written(marker)


def test_savedmodel_hiding_a_crafted_metagraph_behind_a_harmless_one_fails(cluster, producer_env, tmp_path):
    marker = tmp_path / "pwned"
    harmless = tf_files.tf1_saved_model(tmp_path / "harmless", ["serve", "gpu"])
    evil = tf_files.tf1_saved_model(tmp_path / "evil", ["serve"], init="save", marker=marker)
    tf_files.with_second_meta_graph(harmless, evil, tmp_path / "twin_savedmodel")

    job = run_job(tmp_path, "model: {name: evil-twin, source: ./twin_savedmodel, format: tf-savedmodel}\n")

    assert_failed_in_convert(job, "MetaGraph 1 (tags ['serve']): the init op (saved_model_main_op) runs "
                                  "operation 'SaveV2'")
    assert not tf_files.written(marker)
