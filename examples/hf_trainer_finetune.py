"""Fine-tune a classifier with HF's Trainer and ALUM, FGM or PGD (pipeline.tasks.hf_trainer.AdversarialTrainer).

The model is an exported one (`alum export`) or any HF BERT/RoBERTa directory:

    python examples/hf_trainer_finetune.py --model hf/base --train train.jsonl --dev dev.jsonl --method alum --out
    runs/hf-alum

train.jsonl and dev.jsonl hold one {"text": ..., "label": int} per line (labels 0..N-1).
The fine-tuned model and tokenizer are saved in OUT; the last line is the dev accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from pipeline.methods.adversarial import AdversarialConfig
from pipeline.tasks.hf_trainer import AdversarialTrainer


def fail(message: str):
    print(f"hf_trainer_finetune: error: {message}", file=sys.stderr)
    sys.exit(2)


def read_rows(path: str) -> list[dict]:
    """The jsonl rows, each checked for a text and an integer label, so a bad file fails in one line."""
    if not Path(path).is_file():
        fail(f"{path}: no such file")
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            text, label = row["text"], row["label"]
        except (ValueError, TypeError, KeyError):
            fail(f"{path}:{number}: expected a JSON object with text and label")
        if not isinstance(text, str) or not isinstance(label, int) or label < 0:
            fail(f"{path}:{number}: text must be a string and label an integer >= 0")
        rows.append({"text": text, "label": label})
    if not rows:
        fail(f"{path}: no rows")
    return rows


def encode(tokenizer, rows: list[dict]) -> list[dict]:
    return [{**tokenizer(row["text"], truncation=True, max_length=128), "labels": row["label"]} for row in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an exported (alum export) or HF BERT/RoBERTa directory")
    p.add_argument("--train", required=True, help="training rows, jsonl")
    p.add_argument("--dev", required=True, help="dev rows, jsonl")
    p.add_argument("--method", choices=["alum", "fgm", "pgd", "none"], default="alum")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the ALUM term (the paper fine-tunes with 1)")
    p.add_argument("--out", required=True, help="where the fine-tuned model goes")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: --epochs decides)")
    args = p.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        fail(f"--model: {args.model}: not a Hugging Face model directory (no config.json)")
    train, dev = read_rows(args.train), read_rows(args.dev)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    num_labels = max(row["label"] for row in train + dev) + 1
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)
    training = TrainingArguments(
        args.out,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        warmup_steps=0.1,
        weight_decay=0.01,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
    )
    trainer = AdversarialTrainer(
        model=model,
        args=training,
        train_dataset=encode(tokenizer, train),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        adversarial=AdversarialConfig(method=args.method, alpha=args.alpha),
    )
    trainer.train()
    trainer.save_model(args.out)  # model and tokenizer, loadable with from_pretrained
    predictions = trainer.predict(encode(tokenizer, dev))
    accuracy = (predictions.predictions.argmax(-1) == predictions.label_ids).mean()
    print(f"dev accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
