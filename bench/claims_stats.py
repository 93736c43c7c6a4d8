"""The claims study's statistics (docs/results/study-plan.md, "Analysis"): seed-paired
differences, two-level bootstrap intervals, paired t-tests over pretraining seeds, McNemar on
AdvGLUE's matched pairs, Holm's correction; and the fixed rule that matches an AdvGLUE-SST2
sentence to its SST-2 dev source. Pure functions of the study's JSON, so a test can recompute
every stated figure from the committed file.
"""

from __future__ import annotations

import re

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MATCH_JACCARD = 0.5


def words(text: str) -> frozenset[str]:
    """Lowercased word tokens: the unit of the matching rule."""
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def match_pairs(adversarial: list[tuple[str, int]], dev: list[tuple[str, int]]) -> list[tuple[int, int]]:
    """(AdvGLUE index, dev index) for each AdvGLUE sentence whose most similar dev sentence (token
    Jaccard; the first on ties) reaches MATCH_JACCARD and has the same label: the plan's rule,
    fixed before any model is scored."""
    dev_words = [words(text) for text, _ in dev]
    pairs = []
    for i, (text, label) in enumerate(adversarial):
        w = words(text)
        scores = [len(w & d) / max(1, len(w | d)) for d in dev_words]
        best = int(np.argmax(scores))
        if scores[best] >= MATCH_JACCARD and dev[best][1] == label:
            pairs.append((i, best))
    return pairs


def bootstrap_interval(differences: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the mean of a [pretraining seed, fine-tuning seed] array of
    paired differences, resampling pretraining seeds, then fine-tuning seeds within each."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n_pre, n_ft = differences.shape
    pre = rng.integers(n_pre, size=(BOOTSTRAP_RESAMPLES, n_pre))
    ft = rng.integers(n_ft, size=(BOOTSTRAP_RESAMPLES, n_pre, n_ft))
    means = differences[pre[..., None], ft].mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_comparison(differences: np.ndarray) -> dict:
    """Estimate (mean over fine-tuning seeds, then pretraining seeds), bootstrap interval and the
    paired t-test over pretraining seeds (df = seeds - 1) of a [pretraining, fine-tuning] array."""
    per_seed = differences.mean(axis=1)
    low, high = bootstrap_interval(differences)
    sd = float(per_seed.std(ddof=1))
    if sd == 0.0:
        p = 1.0 if per_seed.mean() == 0 else 0.0
    else:
        t = per_seed.mean() / (sd / np.sqrt(len(per_seed)))
        p = float(2 * stats.t.sf(abs(t), df=len(per_seed) - 1))
    return {
        "estimate": float(per_seed.mean()),
        "low": low,
        "high": high,
        "per_seed": [float(x) for x in per_seed],
        "p": p,
    }


def mcnemar(original_correct: np.ndarray, perturbed_correct: np.ndarray) -> dict:
    """Exact McNemar test of paired correctness: b sentences right as originals and wrong
    perturbed, c the reverse; p of b against Binomial(b + c, 1/2), two-sided."""
    b = int((original_correct & ~perturbed_correct).sum())
    c = int((~original_correct & perturbed_correct).sum())
    p = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return {"original_only": b, "perturbed_only": c, "p": p}


def majority(correct: np.ndarray) -> np.ndarray:
    """Per sentence, whether most runs (rows) got it right; a tie counts as wrong."""
    return correct.sum(axis=0) * 2 > correct.shape[0]


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error), by name."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted
