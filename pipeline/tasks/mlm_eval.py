"""`alum eval`: how well an exported masked LM predicts masked tokens, and how robustly.

Every figure is taken on the same rows and masks: the first `--batches x --batch-size` rows
of a split, masked by `pipeline.data.batches.masked_batch` with the trainer's validation seed
(`--seed` + `EVAL_SEED_OFFSET`, step 0). So numbers are comparable across models and runs;
with `--seed` a run's train.seed, and its eval.mask_rate and row count, the clean loss is the
one that run's validation computes.
Dropout is off and the parameters are frozen.

- clean: MLM loss (mean cross-entropy over the masked tokens), perplexity, accuracy, and
  the accuracy of always guessing the commonest masked token, without which an accuracy
  has no scale (a model that learned only unigram frequencies reaches it);
- worst-case embedding perturbation, the threat ALUM trains against: K sign-gradient PGD
  steps on a delta added at the embedding output, in the per-token linf ball of radius
  R x r_t (r_t the token's embedding RMS, `perturbation.token_scale`, so R means the same
  for any width and weight scale), maximising the masked-token loss. By default the ascent
  starts from a uniform draw in the ball (Madry's random start, as training's PGD): from
  delta = 0 the first step follows the clean gradient alone. The loss at the final delta is
  reported as it is, with its increase over the clean loss: a weak attack shows as a small
  increase, not a hidden one;
- beside each radius, random noise of the attack's size: a random corner of the same ball
  (each element +-R x r_t), the linf and L2 norm of a saturated PGD delta. Its increase is
  what any delta that large costs, so the PGD increase above it is what the attack found;
- random token substitution: a share P of the ordinary, unmasked input tokens replaced by
  random ordinary ids, a model-independent corruption (the same tokens and replacements
  for a row whatever the batch, and the tokens hit at a rate include those of any lower rate).

The perturbed conditions and their seeded draws are `pipeline.tasks.mlm_robustness`'s.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_prep import atomic
from data_prep.errors import UserError
from data_prep.tokenizer_dir import TokenizerInfo, holds_tokenizer, load_tokenizer
from pipeline.core.help_format import DefaultsHelpFormatter
from pipeline.data.batches import ShardDataset, masked_batch
from pipeline.data.masking import MaskVocab
from pipeline.model.mlm_score import MlmScore
from pipeline.model.perturbation import token_scale
from pipeline.tasks.mlm_robustness import (
    PGD_STARTS,
    noise_delta,
    noise_signs,
    pgd_logits,
    start_directions,
    substitution_draws,
)
from pipeline.train.validation import EVAL_SEED_OFFSET


def evaluate_model(
    model_dir: str | Path,
    shards: str | Path,
    *,
    split: str = "val",
    batches: int = 50,
    batch_size: int = 32,
    mask_rate: float = 0.15,
    seed: int = 0,
    radii=(0.1, 0.3),
    pgd_steps: int = 3,
    pgd_start: str = "random",
    noise: bool = True,
    substitution_rates=(0.1,),
    tokenizer: str | Path | None = None,
) -> dict:
    """Clean, attacked, noised and substituted MLM metrics of an HF model directory on a shard split.

    Every input is checked before the model is loaded, so a typo costs no loading time."""
    _check_options(
        batches=batches,
        batch_size=batch_size,
        mask_rate=mask_rate,
        radii=radii,
        pgd_steps=pgd_steps,
        pgd_start=pgd_start,
        substitution_rates=substitution_rates,
    )
    model_dir, shards = Path(model_dir), Path(shards)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model: {model_dir}: not a Hugging Face model directory (no config.json)")
    if not shards.is_dir():
        raise UserError(f"--shards: {shards}: no such directory")
    dataset = ShardDataset(shards, split)
    if len(dataset) == 0:
        raise UserError(f"{shards}: the {split!r} split has no rows")
    info = _tokenizer(model_dir, tokenizer)
    fingerprint = dataset.manifest["tokenizer"]["sha256"]
    if fingerprint != info.sha256:
        raise UserError(
            f"{shards}: shards were built with another tokenizer (sha256 {fingerprint[:12]}) "
            f"than {info.path} ({info.sha256[:12]})"
        )
    model = _load_model(model_dir, info, dataset.seq_len)
    device = next(model.parameters()).device

    vocab = MaskVocab.of(info)
    ordinary = torch.from_numpy(np.setdiff1d(np.arange(info.vocab_size), vocab.special_ids))
    rows = min(batches * batch_size, len(dataset))
    clean = MlmScore(info.vocab_size, device)
    attacked = [MlmScore(info.vocab_size, device) for _ in radii]
    noised = [MlmScore(info.vocab_size, device) for _ in radii] if noise else []
    substituted = [MlmScore(info.vocab_size, device) for _ in substitution_rates]
    eligible_tokens, replaced = 0, np.zeros(len(substitution_rates), dtype=np.int64)

    for start in tqdm(range(0, rows, batch_size), desc="eval", unit="batch", disable=None):
        indices = np.arange(start, min(start + batch_size, rows))
        batch = masked_batch(dataset, indices, step=0, seed=seed + EVAL_SEED_OFFSET, rate=mask_rate, vocab=vocab)
        on_device = batch.on(device)
        ids, mask, masked_index, labels = (
            on_device.input_ids,
            on_device.attention_mask,
            on_device.masked_index,
            on_device.labels,
        )
        with torch.no_grad():
            logits, embedded = model(ids, mask, masked_index)
        clean.add(logits, labels)
        unit, shape = token_scale(embedded, "relative"), embedded.shape[1:]  # (seq_len, hidden) per row
        starts = start_directions(indices, seed, pgd_start, shape, unit) if radii else None
        signs = noise_signs(indices, seed, shape, unit) if noised else None
        for radius, score in zip(radii, attacked):
            score.add(
                pgd_logits(
                    model,
                    ids,
                    mask=mask,
                    masked_index=masked_index,
                    labels=labels,
                    start=radius * unit * starts,
                    unit=unit,
                    radius=radius,
                    steps=pgd_steps,
                ),
                labels,
            )
        for radius, score in zip(radii, noised):
            with torch.no_grad():
                score.add(model(ids, mask, masked_index, noise_delta(unit, signs, radius))[0], labels)
        eligible = ~batch.masked & ~torch.isin(batch.input_ids, torch.tensor(vocab.special_ids))
        draws, replacements = substitution_draws(indices, dataset.seq_len, seed, ordinary)
        eligible_tokens += int(eligible.sum())
        for i, (rate, score) in enumerate(zip(substitution_rates, substituted)):
            chosen = eligible & (draws < rate)
            replaced[i] += int(chosen.sum())
            with torch.no_grad():
                logits, _ = model(torch.where(chosen, replacements, batch.input_ids).to(device), mask, masked_index)
            score.add(logits, labels)

    return {
        "model": str(model_dir),
        "shards": str(shards),
        "split": split,
        "rows": rows,
        "batch_size": batch_size,
        "mask_rate": mask_rate,
        "seed": seed,
        "clean": {
            **clean.metrics(),
            "tokens": clean.tokens,
            "commonest_token_accuracy": clean.commonest_token_accuracy(),
        },
        "perturbation": [
            {"radius": r, "steps": pgd_steps, "start": pgd_start, **_increase(score, clean)}
            for r, score in zip(radii, attacked)
        ],
        "noise": [{"radius": r, **_increase(score, clean)} for r, score in zip(radii, noised)],
        "substitution": [
            {"rate": p, "substituted_share": int(n) / max(eligible_tokens, 1), **score.metrics()}
            for p, n, score in zip(substitution_rates, replaced, substituted)
        ],
    }


def _increase(score: MlmScore, clean: MlmScore) -> dict:
    """A perturbed condition's metrics and `increase`, its loss minus the clean loss."""
    metrics = score.metrics()
    return {**metrics, "increase": metrics["loss"] - clean.metrics()["loss"]}


def _check_options(*, batches, batch_size, mask_rate, radii, pgd_steps, pgd_start, substitution_rates) -> None:
    for name, value in (("--batches", batches), ("--batch-size", batch_size), ("--pgd-steps", pgd_steps)):
        if value < 1:
            raise UserError(f"{name}: must be a positive integer, got {value}")
    if not 0 < mask_rate < 1:
        raise UserError(f"--mask-rate: must be in (0, 1), got {mask_rate}")
    if pgd_start not in PGD_STARTS:
        raise UserError(f"--pgd-start: must be one of {', '.join(PGD_STARTS)}, got {pgd_start}")
    for radius in radii:
        if not (radius >= 0 and math.isfinite(radius)):
            raise UserError(f"--radius: must be a finite number >= 0, got {radius}")
    for rate in substitution_rates:
        if not 0 <= rate <= 1:
            raise UserError(f"--substitution-rate: must be in [0, 1], got {rate}")


def _tokenizer(model_dir: Path, tokenizer_dir: str | Path | None) -> TokenizerInfo:
    """The tokenizer `alum export` copied into the model directory, else --tokenizer; when
    both exist they must be the same tokenizer, so a stray --tokenizer cannot go unnoticed."""
    own = load_tokenizer(model_dir) if holds_tokenizer(model_dir) else None
    given = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    if own is None and given is None:
        raise UserError(
            f"--model: {model_dir}: holds no tokenizer files; "
            "pass --tokenizer, the tokenizer directory the model was trained with"
        )
    if own is not None and given is not None and own.sha256 != given.sha256:
        raise UserError(
            f"--tokenizer: {given.path} (sha256 {given.sha256[:12]}) is not the tokenizer of "
            f"--model {model_dir} ({own.sha256[:12]})"
        )
    return own or given


def _load_model(model_dir: Path, info: TokenizerInfo, seq_len: int):
    """The model in float32 (on the GPU when there is one), in eval mode, parameters frozen;
    `hf_config` first checks architecture, vocabulary and positions against tokenizer and shards."""
    from transformers import AutoModelForMaskedLM

    from pipeline.model.masked_lm import MaskedLM, hf_config, local_device

    try:
        config = hf_config(str(model_dir), info.vocab_size, info.special_token_ids, seq_len)
        hf = AutoModelForMaskedLM.from_pretrained(
            str(model_dir), config=config, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise UserError(f"--model: {model_dir}: cannot be loaded ({str(e).strip().splitlines()[0]})") from None
    model = MaskedLM(hf, "embedding_output").eval().requires_grad_(False)
    return model.to(local_device())


def format_table(results: dict) -> str:
    """The metrics as aligned text, one row per condition, each radius's noise control under
    its attack, every loss's increase over the clean loss, the commonest-token baseline beside
    the clean accuracy."""
    clean = results["clean"]
    noise = {n["radius"]: n for n in results["noise"]}
    rows = [("clean", clean)]
    for p in results["perturbation"]:
        rows.append((f"embedding PGD r={p['radius']:g} ({p['steps']} steps, {p['start']} start)", p))
        if p["radius"] in noise:
            rows.append((f"  random noise r={p['radius']:g}", noise[p["radius"]]))
    rows += [(f"token substitution p={s['rate']:g}", s) for s in results["substitution"]]
    width = max(len(name) for name in ("condition", *(name for name, _ in rows)))
    lines = [
        f"{results['model']} on {results['shards']} ({results['split']}): {results['rows']:,} rows, "
        f"{clean['tokens']:,} masked tokens (mask rate {results['mask_rate']:g}, seed {results['seed']})",
        f"{'condition':<{width}}  {'loss':>8}  {'increase':>8}  {'ppl':>10}  {'accuracy':>8}",
    ]
    for name, m in rows:
        increase = "" if m is clean else f"{m['loss'] - clean['loss']:+.4f}"
        lines.append(f"{name:<{width}}  {m['loss']:8.4f}  {increase:>8}  {m['ppl']:10.2f}  {m['accuracy']:8.4f}")
    lines[2] += f"  (commonest token: {clean['commonest_token_accuracy']:.4f})"
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="an `alum export` (or any HF BERT/RoBERTa masked-LM) directory")
    p.add_argument(
        "--shards",
        required=True,
        nargs="+",
        metavar="[NAME=]DIR",
        help="shard directories made with the model's tokenizer; NAME=DIR names each, as a mixture's "
        "eval/NAME/... keys do (the sources and eval.sets of its run), and the results are per name",
    )
    p.add_argument("--split", default="val", help="the shard split to evaluate on")
    p.add_argument(
        "--tokenizer", default=None, help="the tokenizer directory, for a model directory without tokenizer files"
    )
    p.add_argument("--batches", type=int, default=50, help="batches evaluated (fewer if the split is smaller)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch")
    p.add_argument("--mask-rate", type=float, default=0.15, help="share of tokens masked")
    p.add_argument("--seed", type=int, default=0, help="masking seed; a run's train.seed masks like its validation")
    p.add_argument(
        "--radius",
        type=float,
        nargs="*",
        default=[0.1, 0.3],
        metavar="R",
        help="linf radii of the embedding PGD, in units of each token's embedding RMS (none: skip)",
    )
    p.add_argument("--pgd-steps", type=int, default=3, help="ascent steps of the embedding attack")
    p.add_argument(
        "--pgd-start",
        default="random",
        metavar="{zero,random}",
        help="the attack's first delta: zero, or random (uniform in the radius's ball, seeded per row)",
    )
    p.add_argument(
        "--no-noise",
        dest="noise",
        action="store_false",
        help="skip the control of each radius: random noise at a corner of the attack's ball",
    )
    p.add_argument(
        "--substitution-rate",
        type=float,
        nargs="*",
        default=[0.1],
        metavar="P",
        help="shares of unmasked tokens replaced by random ones (none: skip)",
    )
    p.add_argument("--out", default=None, help="results JSON (default: MODEL/eval-SPLIT.json)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alum eval", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model) / f"eval-{args.split}.json"
    try:
        sets = named_shards(args.shards)
        results = {name: _evaluate(args, shards) for name, shards in sets.items()}
    except UserError as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    for name, result in results.items():
        print(f"{name}:\n{format_table(result)}" if name else format_table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, results[None] if None in results else {"sets": results})
    print(f"results: {out}")
    return 0


def named_shards(values: list[str]) -> dict[str | None, str]:
    """`--shards` as {name: directory}: one unnamed directory is {None: DIR}, the single-corpus
    results of before; several must each be NAME=DIR, with distinct names."""
    if len(values) == 1 and "=" not in values[0]:
        return {None: values[0]}
    sets = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise UserError(f"--shards {value}: with several directories, give each as NAME=DIR")
        if name in sets:
            raise UserError(f"--shards: the name {name!r} is given twice")
        sets[name] = directory
    return sets


def _evaluate(args: argparse.Namespace, shards: str) -> dict:
    return evaluate_model(
        args.model,
        shards,
        split=args.split,
        batches=args.batches,
        batch_size=args.batch_size,
        mask_rate=args.mask_rate,
        seed=args.seed,
        radii=args.radius,
        pgd_steps=args.pgd_steps,
        pgd_start=args.pgd_start,
        noise=args.noise,
        substitution_rates=args.substitution_rate,
        tokenizer=args.tokenizer,
    )


if __name__ == "__main__":
    sys.exit(main())
