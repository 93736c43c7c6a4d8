"""How big is ALUM's adversarial term, for each perturbation setting and precision?

A study, not a benchmark of speed. On a small BERT pretrained for a few hundred steps on
WikiText-2 (a random model's predictions are nearly flat, a trained one's are not), it runs
the project's own objective (`pipeline.methods.adversarial.compute_losses` through `MaskedLM`) for
every combination of

    update rule (paper | official) x perturb_at (word_embeddings | embedding_output)
    x scale (absolute | relative) x (step_size, noise_std, grad_eps) x precision (fp32 | bf16)

and reports, averaged over the same fixed masked batches:

- ``L_adv`` (the symmetric KL) and ``ratio`` = alpha * L_adv / L_mlm;
- ``gain``: L_adv over the L_adv of a random delta with the same per-token norms, i.e. how
  much the ascent finds beyond a random perturbation of that size (1 = nothing);
- ``grad ratio`` = ||alpha * dL_adv/dtheta|| / ||dL_mlm/dtheta|| over all parameters;
- ``lost``: the fraction of delta's elements that vanish in ``embedded + delta``;
- ``round-off``: ||g - g64|| / ||g64|| for the adversarial parameter gradient g against the
  same computation in float64 (same weights, same initial noise).

bf16 is the model cast to bfloat16 on the CPU (weights and activations, as DeepSpeed's bf16
mode runs it). Dropout is off (eval mode) so that precisions compare like for like; the
trainer replays one dropout mask across its passes, which changes nothing here.

    python bench/alum_term.py                       # ~8 min here: tokenizer, shards, 400 steps, 96 rows
    python bench/alum_term.py --work runs/alum-term # keep the model; a re-run skips the training

Writes docs/alum-term.json (every row) and docs/alum-term.md (the table).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from data_dir import wikitext_train

from data_prep.corpus import ReadOptions
from data_prep.inputs import expand_inputs
from data_prep.shard import ShardSettings, shard_corpus
from data_prep.tokenizer import train_tokenizer
from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data.batches import Batches, ShardDataset, masked_batch
from pipeline.data.masking import MaskVocab
from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.methods.objective import mlm_loss, symmetric_kl
from pipeline.model.masked_lm import MaskedLM, build_model, hf_config
from pipeline.model.perturbation import token_norm

REPO = Path(__file__).resolve().parents[1]
SEED = 0
# (step_size, noise_std, grad_eps): the official code's magnitudes first, then larger ones.
MAGNITUDES = [
    (1e-3, 1e-5, 1e-6),
    (1e-3, 1e-5, 1e-12),
    (1e-2, 1e-3, 1e-12),
    (3e-2, 1e-2, 1e-12),
    (1e-1, 1e-2, 1e-12),
    (3e-1, 3e-2, 1e-12),
]
UPDATES = ("paper", "official")
PERTURB_AT = ("embedding_output", "word_embeddings")
SCALES = ("absolute", "relative")
PRECISIONS = ("fp32", "bf16")


def prepare_data(work: Path, vocab: int, seq_len: int):
    """A tokenizer trained on WikiText-2 train, and train/valid sharded at seq_len (cached in work)."""
    tokenizer_dir, shards = work / "tokenizer", work / "shards"
    if not (tokenizer_dir / "alum_tokenizer.json").is_file():
        train_tokenizer(
            expand_inputs([str(wikitext_train())]), ReadOptions(), tokenizer_dir, vocab_size=vocab, threads=2
        )
    if not (shards / "manifest.json").is_file():
        shard_corpus(
            [str(wikitext_train())],
            tokenizer_dir,
            shards,
            settings=ShardSettings(seq_len=seq_len, val_fraction=0.02),
            workers=2,
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    return tokenizer, ShardDataset(shards, "train"), ShardDataset(shards, "val"), MaskVocab.of(tokenizer)


def pretrained_model(work: Path, tokenizer, dataset, vocab, args):
    """The project's tiny BERT (configs/models/tiny.yaml), standard MLM for args.train_steps (cached)."""
    config = hf_config(
        str(REPO / "configs" / "models" / "tiny.yaml"),
        tokenizer.vocab_size,
        tokenizer.special_token_ids,
        dataset.seq_len,
    )
    torch.manual_seed(SEED)
    hf = build_model(config, None, activation_checkpointing=False)
    weights = work / f"model-{args.train_steps}.pt"
    if weights.is_file():
        hf.load_state_dict(torch.load(weights))
        return hf
    model = MaskedLM(hf).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    batches = Batches(dataset, vocab, global_batch_size=32, micro_batch_size=32, seed=SEED)
    started = time.perf_counter()
    for step in range(args.train_steps):
        lr = 2e-3 * min(1.0, (step + 1) / 20) * (1 - step / args.train_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        (batch,) = batches.for_step(step, step * 32, 0.15).micro_batches
        logits, _ = model(batch.input_ids, batch.attention_mask, batch.masked_index)
        loss = mlm_loss(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(
                f"pretraining step {step + 1}/{args.train_steps}: MLM loss {loss.item():.3f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    torch.save(hf.state_dict(), weights)
    return hf


def measure(model: MaskedLM, reference: MaskedLM | None, batches, config: AdversarialConfig) -> dict:
    """The row's numbers, averaged over the batches (each batch: same noise seed in every model)."""
    rows = []
    for i, batch in enumerate(batches):
        grads, out, delta = adversarial_gradient(model, batch, config, seed=i)
        row = {
            "gain": out.loss_adv.item() / max(random_direction_loss(model, batch, delta, config.norm, i), 1e-300),
            "loss_mlm": out.loss_mlm.item(),
            "loss_adv": out.loss_adv.item(),
            "ratio": config.alpha * out.loss_adv.item() / out.loss_mlm.item(),
            "grad_ratio": (grads["adv"].norm() / grads["mlm"].norm()).item(),
            "lost": out.delta_lost.item(),
            "delta_norm": out.delta_norm.item(),
            "skipped": bool(out.skipped),
        }
        if reference is not None:
            ref, _, _ = adversarial_gradient(reference, batch, config, seed=i)
            row["roundoff"] = ((grads["adv"].double() - ref["adv"]).norm() / ref["adv"].norm().clamp(min=1e-300)).item()
        rows.append(row)
    return {key: statistics.mean(r[key] for r in rows) for key in rows[0]}


def adversarial_gradient(model: MaskedLM, batch, config: AdversarialConfig, seed: int):
    """(flattened parameter gradients of L_mlm and of alpha * L_adv, the step's losses, final delta)."""
    ids, mask, masked_index = batch.input_ids, batch.attention_mask, batch.masked_index
    deltas = []

    def forward(delta):
        deltas.append(delta)
        return model(ids, mask, masked_index, delta)

    torch.manual_seed(seed)
    out = compute_losses(
        forward, lambda d: model(ids, mask, masked_index, d)[0], batch.labels, config=config, step=0, real_tokens=mask
    )
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    mlm = torch.autograd.grad(out.loss_mlm, params, allow_unused=True)

    def flat(gs):
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double() for g, p in zip(gs, params)])

    return {"mlm": flat(mlm), "adv": flat(total) - flat(mlm)}, out, deltas[-1]


def random_direction_loss(model: MaskedLM, batch, delta: torch.Tensor, norm: str, seed: int) -> float:
    """L_adv for a random delta with the same per-token norm: what the ascent is measured against."""
    ids, mask, masked_index = batch.input_ids, batch.attention_mask, batch.masked_index
    noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(1000 + seed)).to(delta.dtype)
    rand = noise * (token_norm(delta, norm) / token_norm(noise, norm)).unsqueeze(-1)
    with torch.no_grad():
        return symmetric_kl(model(ids, mask, masked_index)[0], model(ids, mask, masked_index, rand)[0]).item()


def run_grid(hf, batches) -> list[dict]:
    models = {}
    for perturb_at in PERTURB_AT:
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp64", torch.float64)):
            models[perturb_at, precision] = MaskedLM(copy.deepcopy(hf).to(dtype), perturb_at).eval()
    results = []
    grid = list(itertools.product(UPDATES, PERTURB_AT, SCALES, MAGNITUDES, PRECISIONS))
    started = time.perf_counter()
    for n, (update, perturb_at, scale, (step, noise, grad_eps), precision) in enumerate(grid, 1):
        config = AdversarialConfig(
            method="alum",
            update=update,
            perturb_at=perturb_at,
            scale=scale,
            step_size=step,
            noise_std=noise,
            grad_eps=grad_eps,
        )
        numbers = measure(models[perturb_at, precision], models[perturb_at, "fp64"], batches, config)
        results.append(
            {
                "update": update,
                "perturb_at": perturb_at,
                "scale": scale,
                "step_size": step,
                "noise_std": noise,
                "grad_eps": grad_eps,
                "precision": precision,
                **numbers,
            }
        )
        if n % 20 == 0:
            print(f"{n}/{len(grid)} rows ({time.perf_counter() - started:.0f} s)", flush=True)
    return results


def render(study: dict) -> str:
    meta = study["setup"]
    lines = [
        "# The size of ALUM's adversarial term (bench/alum_term.py)",
        "",
        f"Model: {meta['model']}, standard MLM for {meta['train_steps']} steps on WikiText-2 "
        f"(eval MLM loss {meta['eval_loss']:.3f}, accuracy {meta['eval_accuracy']:.3f}); "
        f"{meta['batches']} fixed batches of {meta['batch']} x {meta['seq_len']} from the val split, masked at 15%; "
        "alpha 10, K 1, linf, no eps, dropout off. Regenerate: `python bench/alum_term.py`.",
        "",
        "ratio = alpha L_adv / L_mlm; gain = L_adv / L_adv of a random delta with the same per-token norms; grad "
        "ratio = ||alpha dL_adv|| / ||dL_mlm|| over the parameters; "
        "lost = fraction of delta's elements that vanish in embedded + delta; "
        "round-off = relative error of the adversarial parameter gradient against float64.",
        "",
        "| update | perturb_at | scale | step | noise | grad_eps | precision | L_adv | ratio | gain | grad ratio | "
        "lost | round-off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in study["rows"]:
        lines.append(
            f"| {r['update']} | {r['perturb_at']} | {r['scale']} | {r['step_size']:g} | {r['noise_std']:g} | "
            f"{r['grad_eps']:g} | "
            f"{r['precision']} | {r['loss_adv']:.2e} | {r['ratio']:.2e} | {r['gain']:.1f} | {r['grad_ratio']:.2e} | "
            f"{r['lost']:.1%} | {r['roundoff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def eval_metrics(hf, val, vocab, batches: int, batch: int) -> tuple[float, float]:
    model = MaskedLM(hf).eval()
    losses, correct, total = [], 0, 0
    with torch.no_grad():
        for b in range(batches):
            mb = masked_batch(
                val,
                torch.arange(b * batch, (b + 1) * batch).numpy() % len(val),
                step=0,
                seed=SEED + 1,
                rate=0.15,
                vocab=vocab,
            )
            logits, _ = model(mb.input_ids, mb.attention_mask, mb.masked_index)
            losses.append(mlm_loss(logits, mb.labels).item())
            correct += (logits.argmax(-1) == mb.labels).sum().item()
            total += mb.labels.numel()
    return statistics.mean(losses), correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", type=Path, default=REPO / "runs" / "alum-term", help="tokenizer, shards and model (reused)"
    )
    parser.add_argument("--train-steps", type=int, default=400, help="standard MLM steps of 32 x 128 before the study")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "alum-term")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer, dataset, val, vocab = prepare_data(args.work, vocab=4000, seq_len=128)
    hf = pretrained_model(args.work, tokenizer, dataset, vocab, args)
    eval_loss, eval_accuracy = eval_metrics(hf, val, vocab, 8, 16)
    print(f"pretrained model: eval MLM loss {eval_loss:.3f}, accuracy {eval_accuracy:.3f}", flush=True)
    indices = torch.arange(args.batches * args.batch).numpy() % len(val)
    batches = [
        masked_batch(val, indices[i * args.batch : (i + 1) * args.batch], step=0, seed=SEED + 2, rate=0.15, vocab=vocab)
        for i in range(args.batches)
    ]
    rows = run_grid(hf, batches)
    setup = {
        "model": f"BERT hidden {hf.config.hidden_size}, {hf.config.num_hidden_layers} layers, vocab "
        f"{hf.config.vocab_size}",
        "train_steps": args.train_steps,
        "eval_loss": eval_loss,
        "eval_accuracy": eval_accuracy,
        "batches": args.batches,
        "batch": args.batch,
        "seq_len": dataset.seq_len,
        "torch": torch.__version__,
    }
    study = {"setup": setup, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(study, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(study))
    print(render(study))


if __name__ == "__main__":
    main()
