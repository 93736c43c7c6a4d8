"""The claims study's analysis and report (bench/claims.py): the comparisons the plan names
(docs/results/study-plan.md), the table, the figure and the README's summary, all made from
the study's JSON alone, so `python bench/claims.py --render` remakes them and a test can check
that the committed text says what the committed numbers say.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from claims_stats import holm, majority, mcnemar, paired_comparison

BRANCHES = ("standard", "alum", "noise", "standard-compute")  # pretrained from each seed's shared phase
MODELS = (*BRANCHES, "random-init")
FT_DATA = ("full", "subset")
FT_METHODS = ("standard", "alum")
PRIMARY = ("alum", "SST-2 dev, full, standard FT")
RADII = (0.03, 0.1, 0.3)
DETECTABLE = 0.036  # the plan's effect detected with 80% power by 3 pretraining seeds (shaded in the figure)
SUMMARY_BEGIN, SUMMARY_END = "<!-- claims-summary: bench/claims.py writes this -->", "<!-- /claims-summary -->"
SUMMARY_BLOCK = re.compile(re.escape(SUMMARY_BEGIN) + ".*?" + re.escape(SUMMARY_END), re.S)


def correct(bits: str) -> np.ndarray:
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")


def finetune_arrays(study: dict, model: str, data: str, method: str) -> dict[str, np.ndarray]:
    """[pretraining seed, fine-tuning seed] arrays of one model's fine-tuning figures; the
    AdvGLUE pairs are scored after fine-tuning on full SST-2 only."""
    runs = [study["finetune"][f"s{s}/{model}/{data}-{method}"] for s in study["setup"]["pretrain_seeds"]]
    arrays = {f"SST-2 dev, {data}, {method} FT": np.array([[r["dev_accuracy"] for r in seed] for seed in runs])}
    if data != "full":
        return arrays
    orig = np.array([[correct(r["original_predictions"]).mean() for r in seed] for seed in runs])
    pert = np.array([[correct(r["perturbed_predictions"]).mean() for r in seed] for seed in runs])
    arrays[f"AdvGLUE originals, {method} FT"] = orig
    arrays[f"AdvGLUE perturbed, {method} FT"] = pert
    arrays[f"AdvGLUE drop, {method} FT"] = orig - pert
    return arrays


def mlm_arrays(study: dict, model: str) -> dict[str, np.ndarray]:
    """[pretraining seed, 1] arrays of one model's held-out MLM figures (evaluation has no
    fine-tuning seed)."""
    out: dict[str, list[float]] = {}
    for s in study["setup"]["pretrain_seeds"]:
        sets = study["models"][f"s{s}/{model}"]["sets"]
        for name, result in sets.items():
            out.setdefault(f"MLM loss, {name}", []).append(result["clean"]["loss"])
        test, clean = sets["wikitext-test"], sets["wikitext-test"]["clean"]["loss"]
        for attack in test["perturbation"]:
            out.setdefault(f"PGD increase r={attack['radius']:g}", []).append(attack["loss"] - clean)
        for noise in test["noise"]:
            out.setdefault(f"noise increase r={noise['radius']:g}", []).append(noise["loss"] - clean)
        for sub in test["substitution"]:
            out.setdefault(f"substitution {sub['rate']:g} increase", []).append(sub["loss"] - clean)
    return {k: np.array(v)[:, None] for k, v in out.items()}


def endpoints(study: dict, model: str) -> dict[str, np.ndarray]:
    arrays = {k: v for d in FT_DATA for m in FT_METHODS for k, v in finetune_arrays(study, model, d, m).items()}
    return arrays if model == "random-init" else {**arrays, **mlm_arrays(study, model)}


def analyse(study: dict) -> dict:
    """Every comparison against `standard`: estimate, interval, p and (secondaries) Holm's p;
    McNemar per model on the matched AdvGLUE pairs (standard FT on full SST-2); means per model."""
    base = endpoints(study, "standard")
    comparisons = {}
    for model in MODELS[1:]:
        for name, values in endpoints(study, model).items():
            comparisons[f"{model} | {name}"] = paired_comparison(values - base[name])
    for model in MODELS:
        runs = [r for s in study["setup"]["pretrain_seeds"] for r in study["finetune"][f"s{s}/{model}/full-standard"]]
        orig = majority(np.array([correct(r["original_predictions"]) for r in runs]))
        pert = majority(np.array([correct(r["perturbed_predictions"]) for r in runs]))
        comparisons[f"{model} | McNemar originals vs perturbed"] = mcnemar(orig, pert)
    primary = " | ".join(PRIMARY)
    adjusted = holm({k: v["p"] for k, v in comparisons.items() if k != primary})
    for name, p in adjusted.items():
        comparisons[name]["holm_p"] = p
    means = {m: {k: float(v.mean()) for k, v in endpoints(study, m).items()} for m in MODELS}
    return {"primary": primary, "comparisons": comparisons, "means": means}


def cell(c: dict) -> str:
    p = c.get("holm_p", c["p"])
    return f"{c['estimate']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] p={p:.2g}"


def table(study: dict) -> str:
    analysis, setup = analyse(study), study["setup"]
    comparisons, means = analysis["comparisons"], analysis["means"]
    names = list(endpoints(study, "standard"))
    lines = [
        "# Can this design see ALUM's effect? (bench/claims.py)",
        "",
        f"The plan: [study-plan.md](study-plan.md), committed before the runs. {describe(setup)}",
        "",
        "## Differences from `standard` pretraining",
        "",
        "Each cell: the seed-paired difference (model minus `standard`; averaged over fine-tuning seeds, "
        "then pretraining seeds), its 95% two-level bootstrap interval, and the paired t-test's p over "
        "pretraining seeds, Holm-adjusted over every secondary comparison "
        f"({sum('holm_p' in c for c in comparisons.values())} of them); the primary endpoint "
        f"(**{analysis['primary']}**) is tested alone. MLM rows are losses in nats (lower is better); "
        "increases are over the clean WikiText-2 test loss.",
        "",
        "| endpoint | " + " | ".join(MODELS[1:]) + " |",
        "|---|" + "---|" * len(MODELS[1:]),
    ]
    for name in names:
        row = [cell(comparisons[f"{m} | {name}"]) if f"{m} | {name}" in comparisons else "-" for m in MODELS[1:]]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += [
        "",
        "## Means per model",
        "",
        "| endpoint | " + " | ".join(MODELS) + " |",
        "|---|" + "---|" * len(MODELS),
    ]
    for name in names:
        lines.append(
            f"| {name} | " + " | ".join(f"{means[m][name]:.4f}" if name in means[m] else "-" for m in MODELS) + " |"
        )
    lines += [
        "",
        f"## AdvGLUE-SST2 as matched pairs ({setup['advglue_matched']} of {setup['advglue_sentences']} matched)",
        "",
        "Per model, standard fine-tuning on full SST-2, the majority vote of all its runs per sentence: "
        "b = right on the original and wrong perturbed, c = the reverse; exact McNemar p, Holm-adjusted.",
        "",
        "| model | b | c | Holm p |",
        "|---|---|---|---|",
    ]
    for m in MODELS:
        c = comparisons[f"{m} | McNemar originals vs perturbed"]
        lines.append(f"| {m} | {c['original_only']} | {c['perturbed_only']} | {c['holm_p']:.2g} |")
    lines += [
        "",
        "## The perturbed branches' term",
        "",
        "Mean over each run's logged ALUM steps of alpha x L_adv / L_mlm (train/adv_ratio) and of L_adv:",
        "",
        "| run | alpha L_adv / L_mlm | L_adv |",
        "|---|---|---|",
        *(f"| {run} | {t['adv_ratio']:.3g} | {t['loss_adv']:.3g} |" for run, t in study["terms"].items()),
        "",
        "## What it says",
        "",
        *sentences(study, analysis),
        "",
    ]
    return "\n".join(lines)


def describe(setup: dict) -> str:
    minutes, busy = setup["elapsed_seconds"] / 60, setup["stage_seconds"] / 60
    return (
        f"Tiny BERT (hidden 64, 2 layers) on WikiText-2 train, batch 32 x 128, the mask curriculum; "
        f"{len(setup['pretrain_seeds'])} pretraining seeds; per seed `standard` for {setup['pretrain_steps']} "
        f"steps, the branches from its step-{setup['pretrain_steps'] // 2} checkpoint to step "
        f"{setup['pretrain_steps']} (`alum`: ALUM alpha 10; `noise`: the same passes with a random direction), "
        f"`standard-compute` {setup['standard_compute_steps']} standard steps (ALUM's counted passes, "
        f"{setup['alum_pass_ratio']}x), `random-init` untrained. Fine-tuning seeds "
        f"{','.join(map(str, setup['finetune_seeds']))}, standard and ALUM (alpha 1): full SST-2 "
        f"{setup['finetune_steps']} steps, and a {setup['subset']}-sentence subset for {setup['subset_epochs']} "
        f"epochs. MLM evaluation on WikiText-2 test and Tiny Shakespeare, {setup['eval_batches']} x 32 rows each. "
        f"Wall time {minutes:.0f} min ({busy:.0f} min of commands on {setup['workers']} workers). "
        "Regenerate: `python bench/claims.py`."
    )


def interval(c: dict) -> str:
    """A comparison in words: estimate, interval, and the p the reader should use."""
    p = f"Holm p = {c['holm_p']:.2g}" if "holm_p" in c else f"p = {c['p']:.2g}"
    return f"{c['estimate']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}], {p}"


def short(c: dict) -> str:
    """A comparison's effect in a few characters: the difference, or McNemar's discordant counts."""
    if "estimate" in c:
        return f"{c['estimate']:+.4f}, Holm p = {c['holm_p']:.2g}"
    return f"{c['original_only']} right only as originals against {c['perturbed_only']}, Holm p = {c['holm_p']:.2g}"


def disagreement(c: dict) -> str:
    """A sentence when the interval and the test disagree about 0, and why the test is the one planned."""
    excludes = c["low"] > 0 or c["high"] < 0
    if excludes == (c["p"] < 0.05):
        return ""
    return (
        "The bootstrap interval and the t-test disagree about 0: resampling only "
        f"{len(c['per_seed'])} pretraining seeds understates their spread, and the plan tests with the t-test. "
    )


def floor(c: dict, setting: str) -> str:
    """What the untrained control says about one fine-tuning setting: a direction is called
    significant only where the Holm-corrected test says so, and an interval that excludes 0
    without it is said as such."""
    control, where = c[f"random-init | {setting}"], setting.replace("SST-2 dev, ", "")
    tested = "" if control["holm_p"] < 0.05 else " (the interval excludes 0; the Holm-corrected test does not)"
    if control["low"] > 0:
        return f"On SST-2 ({where}) untrained weights fine-tune better than `standard`: {interval(control)}{tested}."
    if control["high"] < 0:
        return f"Pretraining lifts SST-2 ({where}) above untrained weights: {interval(control)}{tested}."
    return f"Pretraining does not measurably lift SST-2 ({where}) above untrained weights ({interval(control)})."


def robustness(c: dict, means: dict, seeds: int) -> str:
    """ALUM's and the noise branch's PGD increase at r=0.1 as shares of `standard`'s, and in how
    many seeds each was lower: whether the smoothness is the attack's doing or the size's."""
    key = "PGD increase r=0.1"
    share = {m: means[m][key] / means["standard"][key] for m in ("alum", "noise")}
    lower = {m: sum(x < 0 for x in c[f"{m} | {key}"]["per_seed"]) for m in ("alum", "noise")}
    return (
        f"At r=0.1 ALUM's PGD increase is {share['alum']:.0%} of `standard`'s (lower in {lower['alum']} of {seeds} "
        f"seeds), the noise branch's {share['noise']:.0%} (lower in {lower['noise']} of {seeds}); random noise of "
        f"PGD's norm raises `standard`'s loss by {means['standard']['noise increase r=0.1']:.4f}, PGD by "
        f"{means['standard'][key]:.4f}."
    )


def sentences(study: dict, analysis: dict) -> list[str]:
    """The findings in words, every figure taken from `analysis`."""
    c, means, setup = analysis["comparisons"], analysis["means"], study["setup"]
    primary = c[analysis["primary"]]
    surviving = sorted(k for k, v in c.items() if v.get("holm_p", 1.0) < 0.05)
    verdict = "differs from 0 at 0.05" if primary["p"] < 0.05 else "does not differ from 0 at 0.05"
    listed = "; ".join(f"{k} ({short(c[k])})" for k in surviving) or "none"
    settings = [f"SST-2 dev, {d}, {m} FT" for d in FT_DATA for m in FT_METHODS]
    full = settings[0]
    mcnemar_standard = c["standard | McNemar originals vs perturbed"]
    return [
        f"- **Primary endpoint** (ALUM minus standard pretraining, SST-2 dev after standard fine-tuning): "
        f"{primary['estimate']:+.4f} (95% interval {primary['low']:+.4f} to {primary['high']:+.4f}; "
        f"paired t-test over {len(setup['pretrain_seeds'])} pretraining seeds p = {primary['p']:.2g}): it {verdict}. "
        f"{disagreement(primary)}The design detects about {DETECTABLE} with 80% power; the paper's SST-2 gains "
        "are 0.005-0.01.",
        "- **ALUM pretraining in the other fine-tuning settings** (estimate [95% interval], Holm p): "
        + "; ".join(f"{s.replace('SST-2 dev, ', '')} {interval(c['alum | ' + s])}" for s in settings[1:])
        + ".",
        f"- **Controls**: the noise branch (ALUM's passes, random direction) {interval(c['noise | ' + full])}; "
        f"standard at ALUM's compute {interval(c['standard-compute | ' + full])}. Untrained weights: SST-2 dev "
        f"{means['random-init'][full]:.4f} against {means['standard'][full]:.4f} for `standard`. "
        + floor(c, settings[0])
        + " "
        + floor(c, settings[2]),
        f"- **Held-out MLM loss**, ALUM minus standard: WikiText-2 test "
        f"{interval(c['alum | MLM loss, wikitext-test'])}; "
        f"Tiny Shakespeare {interval(c['alum | MLM loss, shakespeare'])}.",
        "- **MLM robustness** (loss increase over clean on WikiText-2 test, ALUM minus standard): "
        + "; ".join(
            f"r={r:g} PGD {interval(c[f'alum | PGD increase r={r:g}'])}, "
            f"noise {interval(c[f'alum | noise increase r={r:g}'])}"
            for r in RADII
        )
        + ". "
        + robustness(c, means, len(setup["pretrain_seeds"])),
        f"- **AdvGLUE-SST2**: {setup['advglue_matched']} of {setup['advglue_sentences']} sentences matched a "
        "same-label SST-2 dev source at token Jaccard >= 0.5. On those pairs `standard` (standard FT, full SST-2) "
        f"scores {means['standard']['AdvGLUE originals, standard FT']:.4f} on the originals and "
        f"{means['standard']['AdvGLUE perturbed, standard FT']:.4f} perturbed (McNemar on majority votes: "
        f"{mcnemar_standard['original_only']} right only as originals, {mcnemar_standard['perturbed_only']} only "
        f"perturbed, Holm p = {mcnemar_standard['holm_p']:.2g}); ALUM's change in the drop "
        f"{interval(c['alum | AdvGLUE drop, standard FT'])}.",
        f"- **Secondary comparisons surviving Holm's correction** ({len(surviving)} of "
        f"{sum('holm_p' in v for v in c.values())}): {listed}.",
    ]


BRIEF = (0, 2, 4)  # the README's bullets: the primary endpoint, the controls, MLM robustness


def summary(study: dict, brief: bool = False) -> str:
    """The lines on the study between the markers: all of `sentences`, or (the README's) BRIEF."""
    lines = sentences(study, analyse(study))
    if brief:
        lines = [lines[i] for i in BRIEF] + ["- The rest, with every interval: docs/results/claims.md."]
    return "\n".join([SUMMARY_BEGIN, *lines, SUMMARY_END])


def figure(study: dict, out: Path) -> None:
    """SST-2 dev differences from `standard` with their intervals, one panel per fine-tuning
    setting; shaded: differences the design detects with less than 80% power."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = analyse(study)["comparisons"]
    settings = [f"SST-2 dev, {d}, {m} FT" for d in FT_DATA for m in FT_METHODS]
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.2), sharey=True)
    for ax, setting in zip(axes, settings):
        models = MODELS[1:]
        for i, m in enumerate(models):
            c = comparisons[f"{m} | {setting}"]
            ax.errorbar([c["estimate"]], [i], xerr=[[c["estimate"] - c["low"]], [c["high"] - c["estimate"]]], fmt="o")
        ax.axvline(0, color="grey", lw=0.8)
        ax.axvspan(-DETECTABLE, DETECTABLE, color="grey", alpha=0.12, lw=0)
        ax.set_yticks(range(len(models)), models)
        ax.set_title(setting.replace("SST-2 dev, ", ""), fontsize=9)
        ax.set_xlabel("accuracy minus standard")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def render(study: dict, out: Path, documents: dict[Path, bool]) -> None:
    """claims.md and claims.png in `out`, and the summary block of each document replaced (brief
    where its value is True)."""
    (out / "claims.md").write_text(table(study))
    figure(study, out / "claims.png")
    for path, brief in documents.items():
        text = path.read_text()
        if not SUMMARY_BLOCK.search(text):
            raise SystemExit(f"claims: {path} has no summary block ({SUMMARY_BEGIN} ... {SUMMARY_END})")
        path.write_text(SUMMARY_BLOCK.sub(lambda _: summary(study, brief), text))
    print(table(study))
