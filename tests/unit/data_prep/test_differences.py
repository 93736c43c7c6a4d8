"""`first_difference`, and the three errors that name the key it finds."""

from __future__ import annotations

import pytest

from data_prep import output_dir
from data_prep.differences import first_difference
from data_prep.errors import UserError
from data_prep.manifest import describe_difference
from pipeline.train.config import dump, load_config
from pipeline.train.rundir import COMMAND, CONFIG, resolve_run_config


def test_the_first_differing_key_in_sorted_order_with_both_values():
    assert first_difference({"b": 1, "a": 1, "c": 1}, {"c": 2, "b": 2, "a": 1}) == ("b", 1, 2)
    assert first_difference({"a": 1}, {"a": 1}) is None


def test_nested_mappings_are_named_by_their_dotted_key():
    old = {"read": {"text_field": "text", "txt_docs": "line"}, "seq_len": 64}
    new = {"read": {"text_field": "text", "txt_docs": "blank"}, "seq_len": 64}
    assert first_difference(old, new) == ("read.txt_docs", "line", "blank")
    assert first_difference({"x": {"a": None}}, {"x": {}}) == ("x", {"a": None}, {})  # equal keys, unequal mappings


def test_a_missing_key_counts_as_none_and_other_values_are_compared_whole():
    assert first_difference({"a": 1}, {}) == ("a", 1, None)
    assert first_difference({"a": None}, {}) is None
    assert first_difference({"inputs": [{"path": "a"}]}, {"inputs": [{"path": "b"}]}) == (
        "inputs",
        [{"path": "a"}],
        [{"path": "b"}],
    )


def test_dataset_identities_name_the_setting_and_its_flag():
    assert (
        describe_difference({"val_fraction": 0.1}, {"val_fraction": 0.2})
        == "val_fraction 0.1 then, 0.2 now: --val-fraction"
    )
    assert describe_difference({"seq_len": 64}, {"seq_len": 64}) == "same settings"


def test_a_run_directory_refuses_a_changed_setting_but_not_a_changeable_one(tmp_path):
    (tmp_path / CONFIG).write_text(dump(load_config("tiny", ["train.lr=0.001"])))
    output_dir.mark(tmp_path, COMMAND)
    assert resolve_run_config(None, ["train.max_steps=7", "wandb.mode=offline"], tmp_path).train.max_steps == 7
    with pytest.raises(UserError, match=r"this run was started with train\.lr=0\.001, not 0\.1; use a new --run-dir"):
        resolve_run_config(None, ["train.lr=0.1"], tmp_path)


def test_a_run_started_with_a_renamed_value_resumes(tmp_path):
    # adversarial.update: paper is what normalised was called when the run was started.
    started = dump(load_config("tiny", ["adversarial.method=alum"])).replace("update: normalised", "update: paper")
    assert "update: paper" in started
    (tmp_path / CONFIG).write_text(started)
    output_dir.mark(tmp_path, COMMAND)
    assert resolve_run_config(None, [], tmp_path).adversarial.update == "normalised"
    with pytest.raises(UserError, match=r"adversarial\.update='normalised', not 'projected'"):
        resolve_run_config(None, ["adversarial.update=projected"], tmp_path)
