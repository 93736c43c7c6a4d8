"""`alum eval` (pipeline.tasks.mlm_eval) on a real, briefly trained tiny BERT and real WikiText-2 shards."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.corpus import ReadOptions
from data_prep.inputs import expand_inputs
from data_prep.tokenizer import train_tokenizer
from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data.batches import ShardDataset, masked_batch
from pipeline.data.masking import MaskVocab
from pipeline.model.masked_lm import MaskedLM
from pipeline.model.perturbation import token_scale
from pipeline.tasks.fill_mask import fill_mask_examples, format_examples
from pipeline.tasks.mlm_eval import evaluate_model, main
from pipeline.tasks.mlm_robustness import noise_delta, noise_signs, start_directions
from pipeline.train.validation import EVAL_SEED_OFFSET

SMALL = {"batches": 3, "batch_size": 8}  # 24 val rows of 64 tokens


def _vocab(tokenizer_dir) -> MaskVocab:
    return MaskVocab.of(load_tokenizer(tokenizer_dir))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bert_tokenizer, train_shards):
    """A tiny BERT that has memorised the first 32 val rows under ever-changing masks (a few
    seconds), so its predictions depend on the context, as a real model's do; saved with the
    tokenizer files the way `alum export` writes them."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=2048,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dataset, vocab = ShardDataset(train_shards, "val"), _vocab(bert_tokenizer)
    for step in range(150):
        batch = masked_batch(dataset, np.arange(32), step=step + 1, seed=1, rate=0.25, vocab=vocab)
        states = model.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        optimizer.zero_grad()
        F.cross_entropy(model.cls(states[batch.masked]), batch.labels).backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("mlm-eval") / "model"
    model.save_pretrained(str(out))
    for path in bert_tokenizer.iterdir():
        shutil.copy2(path, out / path.name)
    return out


@pytest.fixture(scope="module")
def results(model_dir, train_shards):
    return evaluate_model(model_dir, train_shards, radii=(0.05, 0.2, 0.5), substitution_rates=(0.0, 0.3), **SMALL)


def test_clean_metrics_equal_a_direct_hf_computation(results, model_dir, train_shards, bert_tokenizer):
    from transformers import BertForMaskedLM

    hf = BertForMaskedLM.from_pretrained(str(model_dir)).eval()
    dataset, vocab = ShardDataset(train_shards, "val"), _vocab(bert_tokenizer)
    loss = correct = 0.0
    labels, predictions = [], []
    with torch.no_grad():
        for start in range(0, SMALL["batches"] * SMALL["batch_size"], SMALL["batch_size"]):
            batch = masked_batch(
                dataset,
                np.arange(start, start + SMALL["batch_size"]),
                step=0,
                seed=EVAL_SEED_OFFSET,
                rate=0.15,
                vocab=vocab,
            )
            logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.masked]
            loss += F.cross_entropy(logits, batch.labels, reduction="sum").item()
            correct += (logits.argmax(-1) == batch.labels).sum().item()
            labels.append(batch.labels)
            predictions.append(logits.argmax(-1))
    labels = torch.cat(labels)
    n = len(labels)
    clean = results["clean"]
    assert clean["tokens"] == n and results["rows"] == 24
    assert clean["loss"] == pytest.approx(loss / n, abs=1e-5)
    assert clean["ppl"] == pytest.approx(math.exp(loss / n), rel=1e-5)
    assert clean["accuracy"] == pytest.approx(correct / n, abs=1e-5)
    assert clean["commonest_token_accuracy"] == pytest.approx(torch.bincount(labels).max().item() / n, abs=1e-12)
    # Trained: better than guessing the commonest token, and not always the same guess.
    assert clean["accuracy"] > clean["commonest_token_accuracy"] + 0.1
    assert len(set(torch.cat(predictions).tolist())) > 1


def test_pgd_loss_exceeds_the_clean_loss_and_grows_with_the_radius(results):
    losses = [p["loss"] for p in results["perturbation"]]
    assert [p["radius"] for p in results["perturbation"]] == [0.05, 0.2, 0.5]
    assert results["clean"]["loss"] < losses[0] < losses[1] < losses[2]
    assert results["perturbation"][2]["accuracy"] < results["clean"]["accuracy"]


def test_each_radius_reports_its_increase_and_pgd_finds_more_than_noise_of_its_size(results):
    clean = results["clean"]["loss"]
    assert [n["radius"] for n in results["noise"]] == [0.05, 0.2, 0.5]
    for attack, noise in zip(results["perturbation"], results["noise"]):
        assert attack["start"] == "random" and attack["steps"] == 3
        assert attack["increase"] == attack["loss"] - clean and noise["increase"] == noise["loss"] - clean
        # On this model the attack's increase is tens of times the noise's (0.70 against 0.017 at r=0.05).
        assert attack["increase"] > 5 * noise["increase"] > 0
    assert [n["loss"] for n in results["noise"]] == sorted(n["loss"] for n in results["noise"])


def test_at_a_tiny_radius_neither_attack_nor_noise_moves_the_loss(model_dir, train_shards):
    tiny = evaluate_model(model_dir, train_shards, radii=(1e-6,), substitution_rates=(), **SMALL)
    assert abs(tiny["perturbation"][0]["increase"]) < 1e-4 and abs(tiny["noise"][0]["increase"]) < 1e-4


def test_the_random_start_is_seeded_per_row_and_differs_from_the_zero_start(results, model_dir, train_shards, tmp_path):
    out = tmp_path / "zero.json"
    argv = ["--model", model_dir, "--shards", train_shards, "--batches", "3", "--batch-size", "8"]
    argv += ["--radius", "0.05", "0.2", "--substitution-rate", "--pgd-start", "zero", "--no-noise", "--out", out]
    assert main(list(map(str, argv))) == 0
    zero = json.loads(out.read_text())
    assert zero["noise"] == [] and [p["start"] for p in zero["perturbation"]] == ["zero", "zero"]
    for from_zero, from_random in zip(zero["perturbation"], results["perturbation"]):
        assert abs(from_zero["loss"] - from_random["loss"]) > 1e-4, (from_zero, from_random)
    # The draws themselves: a row's whatever the rows drawn with it, in [-1, 1), and 0 for zero.
    rows, shape, like = np.arange(16), (64, 32), torch.empty(0)
    together = start_directions(rows, 0, "random", shape, like)
    assert torch.equal(together[8:], start_directions(rows[8:], 0, "random", shape, like))
    assert together.dtype == torch.float32 and -1 <= together.min() < -0.99 and 0.99 < together.max() < 1
    assert not torch.equal(together, start_directions(rows, 1, "random", shape, like))
    assert not start_directions(rows, 0, "zero", shape, like).any()


def test_the_noise_is_a_corner_of_the_attack_ball_and_gives_the_noise_loss(results, model_dir, train_shards):
    """On the model's own embeddings: every element of delta is +-R x r_t exactly, so its
    per-token linf norm is R x r_t; scoring the rows under it gives the reported noise loss."""
    from transformers import BertForMaskedLM

    model = MaskedLM(BertForMaskedLM.from_pretrained(str(model_dir))).eval().requires_grad_(False)
    dataset, vocab = ShardDataset(train_shards, "val"), _vocab(model_dir)
    sums, tokens = np.zeros(3), 0
    for start in range(0, 24, 8):
        indices = np.arange(start, start + 8)
        batch = masked_batch(dataset, indices, step=0, seed=EVAL_SEED_OFFSET, rate=0.15, vocab=vocab)
        with torch.no_grad():
            _, embedded = model(batch.input_ids, batch.attention_mask, batch.masked_index)
        unit = token_scale(embedded, "relative")
        signs = noise_signs(indices, 0, embedded.shape[1:], unit)
        assert torch.equal(signs[4:], noise_signs(indices[4:], 0, embedded.shape[1:], unit))  # batch-independent
        assert 0.45 < (signs > 0).double().mean() < 0.55
        for i, radius in enumerate((0.05, 0.2, 0.5)):
            delta = noise_delta(unit, signs, radius)
            assert torch.equal(delta.abs(), (radius * unit).expand_as(delta))  # a corner: every element at the bound
            assert torch.equal(delta.abs().amax(-1, keepdim=True), radius * unit)
            with torch.no_grad():
                logits, _ = model(batch.input_ids, batch.attention_mask, batch.masked_index, delta)
            sums[i] += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        tokens += len(batch.labels)
    for noise, total in zip(results["noise"], sums):
        assert noise["loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_substitution_at_rate_zero_is_clean_and_at_a_positive_rate_hurts(results):
    zero, some = results["substitution"]
    assert zero["substituted_share"] == 0 and 0.25 < some["substituted_share"] < 0.35
    assert zero["loss"] == results["clean"]["loss"] and zero["accuracy"] == results["clean"]["accuracy"]
    assert some["loss"] > results["clean"]["loss"]


def same(a, b, rel: float = 1e-12) -> bool:
    """Equal nested results, floats equal to a relative tolerance."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=rel)
    return a == b


def test_results_are_deterministic_and_need_not_batch_alike(results, model_dir, train_shards):
    """Same rows, masks and perturbations whatever the batch size: masking, the PGD start, the
    noise and substitution are keyed by row."""
    again = evaluate_model(
        model_dir, train_shards, batches=2, batch_size=12, radii=(0.05, 0.2, 0.5), substitution_rates=(0.0, 0.3)
    )
    for key in ("clean", "perturbation", "noise", "substitution"):
        assert same(again[key], results[key], rel=1e-5), key


def refused(capsys, argv, out, *fragments) -> str:
    """main() returned 2, printed exactly one `eval: error:` line holding every fragment, wrote nothing."""
    assert main([*map(str, argv), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eval: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    return err


def test_bad_inputs_are_one_line_errors_and_write_nothing(
    capsys, tmp_path, model_dir, train_shards, bert_tokenizer, wikitext_valid
):
    out = tmp_path / "eval.json"
    base = ["--model", model_dir, "--shards", train_shards]
    refused(
        capsys,
        ["--model", tmp_path / "no-model", "--shards", train_shards],
        out,
        str(tmp_path / "no-model"),
        "no config.json",
    )
    refused(
        capsys, ["--model", model_dir, "--shards", tmp_path / "no-shards"], out, "--shards", str(tmp_path / "no-shards")
    )
    refused(capsys, [*base, "--split", "test"], out, "'test'")
    # Options are checked first: these name the option even though the model directory is missing.
    missing = ["--model", tmp_path / "no-model", "--shards", train_shards]
    for option, value in (
        ("--mask-rate", "0"),
        ("--mask-rate", "1.5"),
        ("--radius", "-0.1"),
        ("--radius", "nan"),
        ("--substitution-rate", "2"),
        ("--pgd-steps", "0"),
        ("--pgd-start", "uniform"),
        ("--batches", "0"),
    ):
        refused(capsys, [*missing, option, value], out, option, value)

    other = tmp_path / "other-shards"
    shutil.copytree(train_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    real = manifest["tokenizer"]["sha256"]
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    refused(
        capsys,
        ["--model", model_dir, "--shards", other],
        out,
        f"{other}: shards were built with another tokenizer",
        "000000000000",
        real[:12],
    )

    plain = tmp_path / "plain-hf"  # weights only: the tokenizer must come from --tokenizer
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(model_dir / name, plain / name)
    refused(capsys, ["--model", plain, "--shards", train_shards], out, "--tokenizer", "holds no tokenizer files")
    another = tmp_path / "another-tokenizer"
    train_tokenizer(expand_inputs([str(wikitext_valid)]), ReadOptions(), another, vocab_size=800, threads=2)
    refused(
        capsys,
        [*base, "--tokenizer", another],
        out,
        f"--tokenizer: {another}",
        f"is not the tokenizer of --model {model_dir}",
    )
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    refused(capsys, ["--model", gpt, "--shards", train_shards, "--tokenizer", bert_tokenizer], out, str(gpt), "'gpt2'")


def test_main_writes_the_numbers_of_evaluate_model(capsys, tmp_path, model_dir, train_shards, bert_tokenizer):
    plain = tmp_path / "plain-hf"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(model_dir / name, plain / name)
    argv = [
        "--model",
        plain,
        "--tokenizer",
        bert_tokenizer,
        "--shards",
        train_shards,
        "--batches",
        "2",
        "--batch-size",
        "4",
        "--radius",
        "0.1",
        "--substitution-rate",
        "0.2",
        "--seed",
        "3",
    ]
    assert main(list(map(str, argv))) == 0
    stdout = capsys.readouterr().out
    written = json.loads((plain / "eval-val.json").read_text())  # the default --out
    expected = evaluate_model(
        plain,
        train_shards,
        batches=2,
        batch_size=4,
        seed=3,
        radii=[0.1],
        substitution_rates=[0.2],
        tokenizer=bert_tokenizer,
    )
    assert same(written, expected)
    assert {k: written[k] for k in ("rows", "split", "seed", "mask_rate")} == {
        "rows": 8,
        "split": "val",
        "seed": 3,
        "mask_rate": 0.15,
    }
    assert (
        "commonest token" in stdout
        and "embedding PGD r=0.1 (3 steps, random start)" in stdout
        and "  random noise r=0.1" in stdout
        and "token substitution p=0.2" in stdout
    )
    assert f"{expected['clean']['loss']:8.4f}" in stdout
    assert f"{expected['noise'][0]['loss']:8.4f}  {expected['noise'][0]['increase']:+8.4f}" in stdout


def test_fill_mask_masks_a_whole_word_of_held_out_text_and_shows_the_models_guesses(model_dir, train_shards):
    from transformers import AutoTokenizer, BertForMaskedLM

    examples = fill_mask_examples(model_dir, train_shards, rows=3)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    hf = BertForMaskedLM.from_pretrained(str(model_dir)).eval()
    rows = ShardDataset(train_shards, "val").rows(np.arange(32))
    assert len(examples) == 3 and [e.row for e in examples] == sorted({e.row for e in examples})
    for example in examples:
        row = rows[example.row]
        assert tokenizer.convert_ids_to_tokens(int(row[example.position])) == "▁" + example.truth
        assert example.truth.isalpha() and len(example.truth) >= 4, example
        before, after = example.text.split(tokenizer.mask_token)
        assert f"{before}{example.truth}{after}" in tokenizer.decode(row.tolist()), example
        masked = torch.from_numpy(row.copy())[None]
        masked[0, example.position] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = hf(input_ids=masked, attention_mask=(masked != tokenizer.pad_token_id).long()).logits[
                0, example.position
            ]
        top = tokenizer.convert_ids_to_tokens(logits.topk(3).indices.tolist())
        assert example.guesses == tuple(t.removeprefix("▁") or t for t in top)
    assert len({e.guesses for e in examples}) == 3  # this model has learned its rows: the guesses depend on the text
    lines = format_examples(examples)
    assert lines[0] == f'"... {examples[0].text} ..."  ->  {", ".join(examples[0].guesses)}   [{examples[0].truth}]'


def test_named_shard_directories_are_evaluated_each_under_its_name(
    capsys, tmp_path, model_dir, train_shards, shakespeare_shards
):
    # As a mixture's sources and eval.sets are validated in training: eval/NAME/... per set.
    out = tmp_path / "sets.json"
    small = ["--batches", "2", "--batch-size", "4", "--radius", "--substitution-rate", "--out", out]
    argv = ["--model", model_dir, "--shards", f"wiki={train_shards}", f"shakespeare={shakespeare_shards}", *small]
    assert main(list(map(str, argv))) == 0
    written = json.loads(out.read_text())["sets"]
    assert sorted(written) == ["shakespeare", "wiki"]
    for name, shards in (("wiki", train_shards), ("shakespeare", shakespeare_shards)):
        assert same(
            written[name], evaluate_model(model_dir, shards, batches=2, batch_size=4, radii=[], substitution_rates=[])
        )
    assert written["wiki"]["clean"]["loss"] != written["shakespeare"]["clean"]["loss"]
    stdout = capsys.readouterr().out
    assert stdout.startswith("wiki:\n") and "\nshakespeare:\n" in stdout
    for bad, why in (
        ([f"{train_shards}", f"b={train_shards}"], "give each as NAME=DIR"),
        ([f"a={train_shards}", f"a={shakespeare_shards}"], "the name 'a' is given twice"),
    ):
        assert main(list(map(str, ["--model", model_dir, "--shards", *bad, *small]))) == 2
        assert why in capsys.readouterr().err
