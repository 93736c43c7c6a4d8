"""`alum finetune`: GLUE/AdvGLUE loading against known rows, the ALUM fine-tuning loss by hand,
a short real fine-tuning run on SST-2 with two seeds, and one-line errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, data_file, launch_command
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from data_prep.errors import UserError
from pipeline.data.glue import load_task, read_advglue, read_tsv
from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.tasks import finetune

SST2_COLUMNS, SST2_LABELS = ("sentence",), ("0", "1")


@pytest.fixture(scope="module")
def sst2() -> Path:
    return data_file("sst2/train.tsv").parent


@pytest.fixture(scope="module")
def advglue() -> Path:
    return data_file("advglue/dev.json")


# 1. Loading


def test_sst2_rows_labels_and_quotes(sst2):
    train = read_tsv(sst2 / "train.tsv", SST2_COLUMNS, SST2_LABELS)
    dev = read_tsv(sst2 / "dev.tsv", SST2_COLUMNS, SST2_LABELS)
    assert (len(train), len(dev)) == (67_349, 872)
    assert (train[0].text, train[0].text_pair, train[0].label) == (
        "hide new secretions from the parental units",
        None,
        0,
    )
    assert (dev[0].text, dev[0].label) == ("it 's a charming and often affecting journey .", 1)
    assert sum(e.label for e in dev) == 444  # GLUE SST-2 dev: 444 positive, 428 negative


def test_rte_string_labels_map_to_glue_ids(tmp_path):
    rte = data_file("rte/train.tsv").parent
    task = load_task("rte", rte)
    assert (len(task.train), len(task.dev)) == (2_490, 277)
    first = task.train[0]
    assert first.text == "No Weapons of Mass Destruction Found in Iraq Yet."
    assert first.text_pair == "Weapons of Mass Destruction Found in Iraq."
    assert first.label == 1 and task.labels[1] == "not_entailment"
    assert sum(e.label == 0 for e in task.train) == 1_249  # entailment
    # Split on tabs without CSV quoting: the quotes stay part of the text.
    assert (
        task.train[12].text == 'Valero Energy Corp., on Monday, said it found "extensive" additional damage at its '
        "250,000-barrel-per-day Port Arthur refinery."
    )
    assert sum('"' in e.text or '"' in e.text_pair for e in task.train) > 100


def test_advglue_subsets(advglue):
    sst = read_advglue(advglue, "sst2", SST2_COLUMNS, 2)
    rte = read_advglue(advglue, "rte", ("sentence1", "sentence2"), 2)
    assert (len(sst), len(rte)) == (148, 81)
    assert (
        sst[0].text.startswith("it 's an uneven treat that bores fun at the democratic exercise") and sst[0].label == 1
    )
    assert rte[0].text_pair == "Doctors Without Borders is an international aid organization ." and rte[0].label == 0


def test_an_empty_dev_file_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "good", "label": "pos"}) + "\n")
    (tmp_path / "dev.jsonl").write_text("")
    with pytest.raises(UserError, match=r"dev.jsonl: no examples"):
        load_task(str(tmp_path), None)


def test_own_jsonl_task_takes_sorted_labels(tmp_path):
    rows = [
        {"text": "good", "label": "pos"},
        {"text": "bad", "label": "neg"},
        {"text": "fine", "text_pair": "ok", "label": "pos"},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text(json.dumps({"text": "meh", "label": "neg"}) + "\n")
    task = load_task(str(tmp_path), None)
    assert task.labels == ("neg", "pos")
    assert [e.label for e in task.train] == [1, 0, 1] and task.train[2].text_pair == "ok"


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence\tlabel\ngood movie\t2\n", r"train.tsv:2: label '2' is not in the label set \(0, 1\)"),
        ("text\tlabel\ngood movie\t1\n", r"train.tsv: no column 'sentence' in the header"),
        ("sentence\tlabel\ngood movie\n", r"train.tsv:2: 1 tab-separated fields, the header has 2"),
    ],
)
def test_bad_tsv_rows_name_file_and_line(tmp_path, content, message):
    (tmp_path / "train.tsv").write_text(content)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(UserError, match=message):
        load_task("sst2", tmp_path)


def test_blank_lines_in_a_tsv_are_skipped_and_later_rows_keep_their_line_numbers(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n\nbad\t0\n\n")  # one inside, one trailing
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n\n\tx\n")
    with pytest.raises(UserError, match=r"dev.tsv:4: label 'x' is not in the label set"):
        load_task("sst2", tmp_path)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n\n")
    task = load_task("sst2", tmp_path)
    assert [(e.text, e.label) for e in task.train] == [("good", 1), ("bad", 0)] and len(task.dev) == 1


def test_an_unknown_task_name_lists_the_known_ones(tmp_path):
    with pytest.raises(
        UserError, match=r"^--task: sst3: neither a task this command knows \(sst2, rte\) nor a directory of your own"
    ):
        load_task("sst3", None)


def test_missing_files_and_bad_model_dirs(tmp_path, sst2):
    shutil.copy(sst2 / "train.tsv", tmp_path / "train.tsv")
    with pytest.raises(UserError, match=r"dev.tsv: no such file"):
        load_task("sst2", tmp_path)
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match=r"model type 'gpt2' is not BERT or RoBERTa"):
        finetune.check_model_dir(tmp_path / "gpt")
    with pytest.raises(UserError, match=r"no readable config.json"):
        finetune.check_model_dir(tmp_path / "nothing")


def test_cli_reports_one_line_and_exit_2(tmp_path, sst2, capsys):
    code = finetune.main(
        ["--model", str(tmp_path / "missing"), "--task", "sst2", "--data", str(sst2), "--out", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("finetune: error: --model:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--alpha", "inf", "--alpha: must be a finite number >= 0, got inf"),
        ("--alpha", "-1", "--alpha: must be a finite number >= 0, got -1.0"),
        ("--max-steps", "-2", "--max-steps: must not be negative, got -2"),
        ("--precision", "bf16", "--precision bf16: needs --deepspeed (a run without it trains in fp32)"),
    ],
)
def test_bad_numbers_are_refused_in_one_line(tmp_path, sst2, capsys, option, value, message):
    code = finetune.main(
        ["--model", str(tmp_path), "--task", "sst2", "--data", str(sst2), "--out", str(tmp_path / "out"), option, value]
    )
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [f"finetune: error: {message}"]


# 2. A small model in the layout `alum export` writes: the `small_model` fixture (conftest.py)


def test_alum_loss_is_cross_entropy_plus_alpha_times_symmetric_kl(small_model, sst2):
    model, tokenizer = finetune.load_model(small_model, 2, seed=0)
    model.eval()  # no dropout, so the hand computation sees the same predictions
    examples = read_tsv(sst2 / "dev.tsv", SST2_COLUMNS, SST2_LABELS)[:8]
    ids, labels = finetune.encode(tokenizer, examples, 64)
    input_ids, mask = finetune.padded(ids, tokenizer.pad_token_id)
    deltas = []

    def forward(delta):
        deltas.append(delta)
        return model(input_ids, mask, delta)

    config = AdversarialConfig(method="alum", alpha=1.0)
    out = compute_losses(
        forward, lambda d: model(input_ids, mask, d)[0], labels, config=config, step=0, real_tokens=mask
    )
    with torch.no_grad():
        clean = model(input_ids, mask)[0].double()
        perturbed = model(input_ids, mask, deltas[-1])[0].double()
    log_p, log_q = clean.log_softmax(-1), perturbed.log_softmax(-1)
    ce = -log_p[torch.arange(8), labels].mean()
    kl = ((log_p.exp() * (log_p - log_q)).sum(-1) + (log_q.exp() * (log_q - log_p)).sum(-1)).mean()
    # Large enough to see at the tolerance below, which CE alone would fail (measured: KL 4e-5, CE 0.69).
    assert out.loss.item() != pytest.approx(ce.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((ce + 1.0 * kl).item(), rel=1e-5)
    assert out.loss_adv.item() == pytest.approx(kl.item(), rel=1e-4)


# 3. A real run: two seeds, standard fine-tuning, SST-2 dev and AdvGLUE


def args(model: Path, data: Path, advglue: Path, out: Path, **changes) -> list[str]:
    options = {
        "--model": model,
        "--task": "sst2",
        "--data": data,
        "--advglue": advglue,
        "--out": out,
        "--seeds": "1,2",
        "--max-steps": 150,
        "--eval-every": 75,
        "--lr": 1e-3,
        "--batch-size": 32,
        **changes,
    }
    return [str(item) for pair in options.items() for item in pair]


@pytest.mark.parametrize("method, weight", [("fgm", 1.0), ("fgsm", 0.5)])
def test_fgm_and_fgsm_train_on_clean_plus_adversarial_cross_entropy(small_model, sst2, method, weight):
    model, tokenizer = finetune.load_model(small_model, 2, seed=0)
    model.eval()
    ids, labels = finetune.encode(tokenizer, read_tsv(sst2 / "dev.tsv", SST2_COLUMNS, SST2_LABELS)[:8], 64)
    input_ids, mask = finetune.padded(ids, tokenizer.pad_token_id)
    deltas = []

    def forward(delta):
        deltas.append(delta)
        return model(input_ids, mask, delta)

    out = compute_losses(
        forward,
        lambda d: model(input_ids, mask, d)[0],
        labels,
        config=AdversarialConfig(method=method),
        step=0,
        real_tokens=mask,
    )
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(input_ids, mask)[0], labels)
        ce_adv = torch.nn.functional.cross_entropy(model(input_ids, mask, deltas[-1])[0], labels)
    assert ce_adv.item() > ce.item()  # the step went uphill
    assert out.loss.item() == pytest.approx(weight * (ce.item() + ce_adv.item()), rel=1e-5)


@pytest.fixture(scope="module")
def small_task(tmp_path_factory, sst2) -> Path:
    """48 training and 16 dev sentences of SST-2, as a task directory of one's own."""
    out = tmp_path_factory.mktemp("task")
    rows = read_tsv(sst2 / "dev.tsv", SST2_COLUMNS, SST2_LABELS)
    for name, part in (("train", rows[:48]), ("dev", rows[48:64])):
        (out / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": row.text, "label": row.label}) + "\n" for row in part)
        )
    return out


@pytest.mark.parametrize("method", ["alum_amortized", "smart", "freeat", "freelb", "yopo", "asa"])
def test_every_method_fine_tunes_from_the_cli(method, small_model, small_task, tmp_path, capsys):
    options = {
        "--model": small_model,
        "--task": small_task,
        "--out": tmp_path,
        "--seeds": "1",
        "--max-steps": 6,
        "--eval-every": 3,
        "--batch-size": 16,
        "--method": method,
    }
    assert finetune.main([str(item) for pair in options.items() for item in pair]) == 0
    # Without a terminal (here, captured) there is no progress bar: a line per evaluation says how it goes.
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"seed 1 ({method}): step ")]
    assert [line.split(" | ")[0] for line in progress] == [
        f"seed 1 ({method}): step 3/6",
        f"seed 1 ({method}): step 6/6",
    ]
    (seed,) = json.loads((tmp_path / "results.json").read_text())["seeds"]
    assert [h["step"] for h in seed["history"]] == [3, 6]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in seed["history"])
    # The saved model is a plain HF classifier: no ASA attention implementation, no adversary.
    assert "asa" not in (tmp_path / "seed-1" / "config.json").read_text()
    assert not any("adversar" in key for key in load_file(tmp_path / "seed-1" / "model.safetensors"))


@pytest.mark.slow
def test_short_finetuning_beats_chance_and_reports_every_seed(small_model, sst2, advglue, tmp_path):
    out = tmp_path / "sst2"
    assert finetune.main(args(small_model, sst2, advglue, out)) == 0
    summary = json.loads((out / "results.json").read_text())
    dev = [s["dev_accuracy"] for s in summary["seeds"]]
    assert [s["seed"] for s in summary["seeds"]] == [1, 2]
    assert all(acc > 0.6 for acc in dev), dev  # majority class: 0.509
    assert summary["dev_majority_baseline"] == pytest.approx(444 / 872)
    assert summary["dev_accuracy"]["mean"] == pytest.approx(statistics.mean(dev))
    assert summary["dev_accuracy"]["std"] == pytest.approx(statistics.stdev(dev))
    adversarial = [s["advglue_accuracy"] * 148 for s in summary["seeds"]]  # AdvGLUE-SST2 dev: 148 sentences
    assert all(abs(n - round(n)) < 1e-9 for n in adversarial) and summary["advglue_accuracy"]["n"] == 2
    assert summary["advglue_accuracy"]["mean"] == pytest.approx(
        statistics.mean(s["advglue_accuracy"] for s in summary["seeds"])
    )
    assert [h["step"] for h in summary["seeds"][0]["history"]] == [75, 150]
    # The saved model is an HF classifier with named labels that reproduces the dev accuracy.
    saved = AutoModelForSequenceClassification.from_pretrained(out / "seed-1")
    assert saved.config.id2label == {0: "0", 1: "1"}
    model, tokenizer = finetune.load_model(out / "seed-1", 2, seed=0)
    ids, labels = finetune.encode(tokenizer, read_tsv(sst2 / "dev.tsv", SST2_COLUMNS, SST2_LABELS), 128)
    predicted = finetune.predict(model, ids, pad_id=tokenizer.pad_token_id)
    assert finetune.share_correct(predicted, labels) == pytest.approx(dev[0])
    # A re-run skips the finished seeds.
    stamp = (out / "seed-1" / "result.json").stat().st_mtime_ns
    assert finetune.main(args(small_model, sst2, advglue, out)) == 0
    assert (out / "seed-1" / "result.json").stat().st_mtime_ns == stamp


# 4. Under DeepSpeed


@pytest.fixture(scope="module")
def dropout_free_model(tmp_path_factory, small_model) -> Path:
    """The small model without dropout: then 1 process and 2 ranks compute the same steps."""
    out = tmp_path_factory.mktemp("model") / "no-dropout"
    shutil.copytree(small_model, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.slow
def test_two_deepspeed_ranks_match_one_process(dropout_free_model, sst2, tmp_path):
    from pipeline.train.distributed import free_port

    options = args(
        dropout_free_model,
        sst2,
        data_file("advglue/dev.json"),
        tmp_path / "one",
        **{"--seeds": "3", "--max-steps": 150, "--eval-every": 75},
    )
    assert finetune.main(options) == 0
    two = [
        *launch_command("deepspeed", 2, free_port(), module="pipeline.finetune"),
        *args(
            dropout_free_model,
            sst2,
            data_file("advglue/dev.json"),
            tmp_path / "two",
            **{"--seeds": "3", "--max-steps": 150, "--eval-every": 75, "--deepspeed": "configs/deepspeed/zero2.json"},
        ),
    ]
    result = subprocess.run(
        two, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one_result = json.loads((tmp_path / "one" / "results.json").read_text())["seeds"][0]
    two_result = json.loads((tmp_path / "two" / "results.json").read_text())["seeds"][0]
    assert two_result["ranks"] == 2 and one_result["ranks"] == 1
    assert one_result["dev_accuracy"] > 0.6  # past the majority class (0.509): the comparison means something
    assert [h["step"] for h in one_result["history"]] == [h["step"] for h in two_result["history"]] == [75, 150]
    for a, b in zip(one_result["history"], two_result["history"]):
        # Rank 0's last micro-batch loss is half of the global batch: compare accuracies, the global quantity.
        assert abs(a["dev_accuracy"] - b["dev_accuracy"]) <= 2 / 872, (a, b)
    assert abs(one_result["advglue_accuracy"] - two_result["advglue_accuracy"]) <= 2 / 148
    dev_labels = "".join(str(e.label) for e in read_tsv(sst2 / "dev.tsv", SST2_COLUMNS, SST2_LABELS))
    predicted = two_result["predictions"]["dev"]  # rank 0's: every rank evaluates all of dev, in order
    assert len(predicted) == 872 and sum(map(str.__eq__, predicted, dev_labels)) / 872 == two_result["dev_accuracy"]


@pytest.mark.slow
def test_a_bf16_deepspeed_run_saves_its_float32_master_weights(small_model, small_task, tmp_path):
    """DeepSpeed bf16 casts the module in place; the saved model holds the optimizer's float32
    master weights (partitioned over 2 ZeRO-2 ranks), of which the bf16 module is the cast."""
    from pipeline.train.distributed import free_port

    options = {
        "--model": small_model,
        "--task": small_task,
        "--out": tmp_path,
        "--seeds": "1",
        "--max-steps": 4,
        "--eval-every": 4,
        "--batch-size": 16,
        "--deepspeed": "configs/deepspeed/zero2.json",
        "--precision": "bf16",
    }
    command = [
        *launch_command("deepspeed", 2, free_port(), module="pipeline.finetune"),
        *(str(item) for pair in options.items() for item in pair),
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(tmp_path / "seed-1" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    embeddings = weights["bert.embeddings.word_embeddings.weight"]
    assert (embeddings != embeddings.bfloat16().float()).float().mean() > 0.9  # not bf16 values: the master copy
    assert json.loads((tmp_path / "seed-1" / "config.json").read_text())["dtype"] == "float32"
    # Cast to bf16 it is the module that was evaluated: the same dev accuracy, to the example.
    model, tokenizer = finetune.load_model(tmp_path / "seed-1", 2, seed=0)
    ids, labels = finetune.encode(tokenizer, load_task(str(small_task), None, None).dev, 128)
    reported = json.loads((tmp_path / "seed-1" / "result.json").read_text())["dev_accuracy"]
    predicted = finetune.predict(model.to(torch.bfloat16), ids, pad_id=tokenizer.pad_token_id)
    assert finetune.share_correct(predicted, labels) == reported
