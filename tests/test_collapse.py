"""A run that learned nothing says so: in its log and in summary.json ("did not learn"), with
the reason and the setting to change, instead of passing off a majority-class score as a result."""
from __future__ import annotations

import json
import math

import pytest

from deltatune.training.collapse import did_not_learn, label_facts, message, no_information
from deltatune.training.loop import train_from_config
from tiny_runs import classification_config, one_thread, tiny_bert_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_label_facts_are_the_majority_share_and_the_label_entropy():
    facts = label_facts([0, 0, 0, 1])
    assert facts["majority_share"] == 0.75
    assert facts["label_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_one_predicted_class_or_a_no_information_loss_is_flagged():
    base = {"accuracy": 0.6, "majority_share": 0.6, "label_entropy": 0.673, "label_classes": 2}
    assert "one class" in no_information({**base, "loss": 0.5, "predicted_classes": 1})
    assert "label frequencies" in no_information({**base, "loss": 0.70, "predicted_classes": 2})
    assert no_information({**base, "loss": 0.50, "predicted_classes": 2}) is None
    # a causal LM: only a loss no better than a uniform guess over the vocabulary
    assert "uniform guess" in no_information({"loss": math.log(100)}, vocab_size=100)
    assert no_information({"loss": 2.0}, vocab_size=100) is None


def test_the_last_evaluations_decide_and_one_flagged_evaluation_among_several_is_not_enough():
    assert did_not_learn([]) is None
    assert did_not_learn([[10, "x"]])["evaluations"] == [10]          # the only evaluation
    assert did_not_learn([[10, None], [20, "x"]]) is None              # one bad evaluation of two
    assert did_not_learn([[10, "x"], [20, None]]) is None              # it recovered
    verdict = did_not_learn([[10, None], [20, "x"], [30, "y"]])
    assert verdict["evaluations"] == [20, 30] and verdict["reason"] == "y"
    assert "train.lr" in verdict["advice"] and "train.group_by_length" in verdict["advice"]
    assert message(verdict).startswith("did not learn: at steps 20, 30, y;")


def test_a_forced_collapse_is_reported_as_did_not_learn(tmp_path, capsys):
    model_dir = tiny_bert_dir(tmp_path)
    # an absurd learning rate for full fine-tuning: every weight moves by ~lr per step
    config = classification_config(tmp_path / "cfg", model_dir, rows=64, epochs=3, eval_every=4,
                                   lr=30.0, on_nan="skip")
    out = tmp_path / "collapsed"
    summary = train_from_config(str(config), [f"output_dir={out}", "method.name=full"])
    assert summary["learned"] is False
    verdict = summary["did_not_learn"]
    assert len(verdict["evaluations"]) >= 2 and verdict["evaluations"][-1] == summary["steps"]
    assert "train.lr" in verdict["advice"]
    assert json.loads((out / "summary.json").read_text())["did_not_learn"] == verdict
    shown = capsys.readouterr()
    assert "did not learn" in shown.out + shown.err


def test_a_run_that_learns_is_not_flagged(tmp_path):
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=256, epochs=3,
                                   eval_every=16, lr=1e-3)
    summary = train_from_config(str(config), [f"output_dir={tmp_path / 'full'}", "method.name=full"])
    assert summary["final_eval"]["accuracy"] >= 0.75
    assert summary["learned"] is True and summary["did_not_learn"] is None
