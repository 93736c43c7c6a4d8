"""The claims study's report (bench/claims.py): the table and the figure, both made from the
study's JSON alone, so `python bench/claims.py --render` can remake them."""

from __future__ import annotations

from pathlib import Path

# Every pretrained model is fine-tuned with these two; the `standard` one with all of FINETUNE_METHODS.
FINETUNE_BOTH = ("standard", "alum")
FINETUNE_METHODS = ("standard", "alum", "alum_amortized", "smart", "freelb", "asa")


def exceeds(a: dict, b: dict) -> bool:
    """Whether two mean +- std figures differ by more than their spreads together."""
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def table(study: dict) -> str:
    setup = study["setup"]
    lines = [
        "# ALUM's claims at small scale (bench/claims.py)",
        "",
        f"Tiny BERT (hidden 64, 2 layers), WikiText-2, batch 32 x 128, mask curriculum; "
        f"standard for {setup['steps']} steps, "
        f"ALUM two-stage (standard to {setup['steps'] // 2}, ALUM after), "
        f"standard for {setup['standard_compute_steps']} steps "
        f"(the ALUM run's compute: an ALUM step took {setup['alum_step_time_ratio']:.2f}x a standard one), "
        f"amortized ALUM two-stage as ALUM (a step {setup['amortized_step_time_ratio']:.2f}x a standard one), "
        "ASA two-stage as ALUM with its KL weighted 1 "
        f"(a step {setup['asa_step_time_ratio']:.2f}x; the ratios are the runs' fastest logged steps, "
        "on a machine shared with other work: docs/methods-bench.md compares step costs in one run), "
        f"and the standard model continued {setup['continual_steps']} steps without and with ALUM. "
        f"SST-2 fine-tuning {setup['finetune_steps']} steps, seeds {setup['seeds']}; mean +- std over seeds. "
        "* = differs from the `standard` model by more than both spreads together. "
        f"Wall time {setup['wall_seconds'] / 60:.0f} min over {setup['invocations']} invocation(s) of the command. "
        "Regenerate: `python bench/claims.py`.",
        "",
        (
            "| model | val ppl | val acc (commonest {:.3f}) | PGD r=0.1 loss | PGD r=0.3 loss | subst. 0.1 loss "
            "| FT | SST-2 dev | AdvGLUE-SST2 |"
        ).format(study["models"]["standard"]["eval"]["clean"]["commonest_token_accuracy"]),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, model in study["models"].items():
        ev = model["eval"]
        for method in FINETUNE_BOTH:
            ft, ref = model["finetune"][method], study["models"]["standard"]["finetune"][method]
            marks = {
                key: "*" if name != "standard" and exceeds(ft[key], ref[key]) else ""
                for key in ("dev_accuracy", "advglue_accuracy")
            }
            pgd = {p["radius"]: p["loss"] for p in ev["perturbation"]}
            lines.append(
                f"| {name} | {ev['clean']['ppl']:.1f} | {ev['clean']['accuracy']:.4f} | "
                f"{pgd.get(0.1, float('nan')):.3f} | {pgd.get(0.3, float('nan')):.3f} | "
                f"{ev['substitution'][0]['loss']:.3f} | {method} | "
                f"{ft['dev_accuracy']['mean']:.4f} +- {ft['dev_accuracy']['std']:.4f}{marks['dev_accuracy']} | "
                f"{ft['advglue_accuracy']['mean']:.4f} +- "
                f"{ft['advglue_accuracy']['std']:.4f}{marks['advglue_accuracy']} |"
            )
    return "\n".join(lines + asa_lines(study) + finetune_methods_table(study)) + "\n"


def asa_lines(study: dict) -> list[str]:
    """How much of the attention the ASA run's adversaries masked, first and last logged step."""
    fractions = study["models"].get("asa", {}).get("masked_fraction")
    if not fractions:
        return []
    steps, layers = fractions["step"], [k for k in fractions if k != "step"]
    below = next((s for s, *values in zip(steps, *(fractions[k] for k in layers)) if max(values) < 0.01), None)

    def cells(i: int) -> str:
        return ", ".join(f"{layer} {fractions[layer][i]:.1%}" for layer in layers)

    return [
        "",
        f"ASA pretraining: the adversaries masked {cells(0)} of the real attention units at step {steps[0]}, "
        f"{cells(-1)} at step {steps[-1]}" + (f"; under 1% in every layer from step {below} on." if below else "."),
    ]


def finetune_methods_table(study: dict) -> list[str]:
    """The `standard` model fine-tuned with each method; * against standard fine-tuning."""
    runs = study["models"]["standard"]["finetune"]
    ref = runs["standard"]
    lines = [
        "",
        "## Fine-tuning methods on the `standard` model",
        "",
        f"SST-2 fine-tuning {study['setup']['finetune_steps']} steps at each method's defaults (alpha 1), "
        f"seeds {study['setup']['seeds']}; "
        "mean +- std over seeds; * = differs from standard fine-tuning by more than both spreads together. "
        "Seconds: wall time of one seed's fine-tuning here (training and evaluation).",
        "",
        "| FT method | SST-2 dev | AdvGLUE-SST2 | seconds per seed |",
        "|---|---|---|---|",
    ]
    for method in FINETUNE_METHODS:
        ft = runs[method]
        cells = [
            f"{ft[key]['mean']:.4f} +- {ft[key]['std']:.4f}"
            f"{'*' if ft is not ref and exceeds(ft[key], ref[key]) else ''}"
            for key in ("dev_accuracy", "advglue_accuracy")
        ]
        seconds = sum(seed["seconds"] for seed in ft["seeds"]) / len(ft["seeds"])
        lines.append(f"| {method} | {cells[0]} | {cells[1]} | {seconds:.0f} |")
    return lines


def figure(study: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    names = list(study["models"])
    for column, key in enumerate(("dev_accuracy", "advglue_accuracy")):
        ax = fig.add_subplot(1, 2, column + 1)
        for offset, method in zip((-0.2, 0.2), FINETUNE_BOTH):
            values = [study["models"][n]["finetune"][method][key] for n in names]
            ax.bar(
                [i + offset for i in range(len(names))],
                [v["mean"] for v in values],
                0.4,
                yerr=[v["std"] for v in values],
                capsize=3,
                label=f"{method} fine-tuning",
            )
        split = key.split("_")[0]
        baseline = study["models"][names[0]]["finetune"]["standard"][f"{split}_majority_baseline"]
        ax.axhline(baseline, linestyle="--", color="gray", label=f"majority class ({baseline:.3f})")
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_title(("SST-2 dev" if column == 0 else "AdvGLUE-SST2") + " accuracy (mean +- std over seeds)")
        ax.set_ylim(0.3, 1.0)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
