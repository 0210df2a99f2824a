"""Experiment (issue #17, S-010): how much of the input does the residual stream keep after each
block, is there a bottleneck depth, and is it the block that protection ranks first?

``python -m validate.bottleneck [--quick] [--model ...] [--languages ...] [--top-k K] [--out DIR]``
(``--help`` lists every flag with its default)

Measured, from the hidden state at every depth (the embedding output, "emb", then each decoder
block's output, read by forward hooks: ``empirical.probes.block_states``), on each language's
segments (``validate._mechanisms.language_windows``: BOS first, no padding; the BOS position is
never a probe position):

* **token identity** (per language): which token is at the position, over the ``--top-k`` most
  frequent token ids of that language's training split plus one "other" class;
* **previous token** (per language, ``--previous``): the same for the token before the position
  (BOS is a class like any other id);
* **language** (one probe over every language's positions; at most ``--language-positions``
  seeded positions per segment): which language the position's text is in.

Estimator (``empirical.probes``): held-out accuracy of a closed-form ridge least-squares classifier
on standardized features (one-hot targets, argmax), its relative penalty chosen from ``--lambdas``
by accuracy on a validation part of the training split (the last training segments of each
language, or the last positions when a language has one training segment), then refitted on the
whole training split. Split by segment: the first ``--train-fraction`` of each language's segments
train, the rest test; no position of a test segment is seen in fitting or in choosing the penalty.
Chance: the accuracy of always answering the training split's most frequent class (and
1/languages for the language probe). Intervals: percentile bootstrap over test segments
(stratified by language when languages are pooled), ``--bootstrap`` resamples.

Bottleneck: the depth where the pooled token-identity accuracy (all languages' test positions) is
lowest; it is a bottleneck when that depth is interior and both ends (emb and the last block) are
above it by a paired bootstrap interval above zero (``empirical.probes.find_bottleneck``); also the
depth where the accuracy drops most. Both are compared with the block the protection ranking ranks
first and its top three (``validate._mechanisms.block_damage(...).ranking("kl")``: single-block 4-bit
damage, shared cache). Correlations (Spearman, bootstrap over blocks:
``validate._mechanisms.correlation_ci`` with groups = blocks) of each block's damage per language
with the token accuracy after the block, the accuracy it loses (input minus output), the
previous-token accuracy and the language-probe accuracy of that language.

Every language's probe results are cached (``<out>/cache``) by model, text and probe settings, so
a rerun performs no forward pass. Outputs under ``--out`` (default ``results/bottleneck``):
``bottleneck.json`` (provenance, every accuracy with its interval, every correlation with its
interval, the raw per-segment counts), ``bottleneck.csv`` (one row per language and depth),
``bottleneck_table.tex`` (per depth) and ``bottleneck.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from empirical import probes
from validate import _protocol as protocol
from validate._common import ResultCache, save_figure, use_agg, write_csv, write_json
from validate._latex import MacroSet, Tex, format_number, tex_text, write_latex_table
from validate._mechanisms import MechanismConfig, block_damage, correlation_ci, resolved, setup, worker_setup

EXPERIMENT = "bottleneck"
#: The grids ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "each language's token probes, and the language probe"
PROBE_VERSION = 1
ESTIMATOR = ("held-out accuracy of a closed-form ridge least-squares classifier on standardized hidden "
             "states (one-hot targets, argmax); relative penalty chosen on a validation part of the "
             "training segments, refitted on all training segments; split by segment; bootstrap "
             "intervals over test segments")


@dataclass(frozen=True)
class Config(MechanismConfig):
    top_k: int = protocol.param(64, "token-identity classes: the K most frequent ids of each language's "
                                "training split, plus 'other'")
    train_fraction: float = protocol.param(0.7, "share of each language's segments (the first ones) that "
                                           "train the probes; the rest test")
    lambdas: tuple[float, ...] = protocol.param(probes.LAMBDAS, "relative ridge penalties to choose from "
                                                "(penalty lambda * n_fit)")
    language_positions: int = protocol.param(64, "positions per segment (seeded sample) of the language probe")
    previous: bool = protocol.param(True, "also probe the previous token's identity")

    def __post_init__(self):
        super().__post_init__()
        protocol.check_positive("top_k", self.top_k)
        protocol.check_positive("language_positions", self.language_positions)
        if self.segments is not None and self.segments < 2:
            raise protocol.ConfigError(f"--segments must be >= 2 (train and test segments), got {self.segments}")
        if not (isinstance(self.train_fraction, (int, float)) and 0 < self.train_fraction < 1):
            raise protocol.ConfigError(f"--train-fraction must lie in (0, 1), got {self.train_fraction!r}")
        lams = tuple(float(x) for x in self.lambdas)
        if not lams or not all(np.isfinite(lams)) or min(lams) <= 0:
            raise protocol.ConfigError(f"--lambdas must be finite and positive, got {self.lambdas!r}")
        protocol.frozen_set(self, lambdas=lams)


# ---- measuring ---------------------------------------------------------------------------------------

_TASKS = {"token": lambda a: a[1:], "previous": lambda a: a[:-1]}


def _probe_key(s, c: Config) -> dict:
    return {**s.key, "experiment": EXPERIMENT, "probe_version": PROBE_VERSION, "top_k": c.top_k,
            "train_fraction": c.train_fraction, "lambdas": list(c.lambdas), "previous": c.previous}


def token_item(feats: Sequence[Sequence[Any]], ids: Sequence[np.ndarray], c: Config) -> dict:
    """Token-identity (and previous-token) probes of one language at every depth.

    ``feats[j][d]``: hidden states ``(T_j, d)`` of segment ``j`` at depth ``d``; ``ids[j]``: its
    token ids (BOS first). Returns the per-test-segment correct counts per depth, the majority-class
    ("chance") counts, the class coverage and the chosen penalties (JSON-able)."""
    train, test = probes.segment_split(len(ids), c.train_fraction)
    n_depth = len(feats[0])
    x_tr = [np.concatenate([np.asarray(feats[j][d])[1:] for j in train]) for d in range(n_depth)]
    x_te = [np.concatenate([np.asarray(feats[j][d])[1:] for j in test]) for d in range(n_depth)]
    groups = np.concatenate([np.full(len(ids[j]) - 1, j) for j in train])
    pos = np.concatenate([np.arange(1, len(ids[j])) for j in train])
    bounds = np.cumsum([0] + [len(ids[j]) - 1 for j in test])
    item: dict[str, Any] = {"train_segments": train, "test_segments": test,
                            "n_test": [int(len(ids[j]) - 1) for j in test],
                            "n_train": int(groups.size)}
    for task in (["token", "previous"] if c.previous else ["token"]):
        f = _TASKS[task]
        tgt_tr = np.concatenate([f(ids[j]) for j in train])
        classes = probes.top_k_classes(tgt_tr, c.top_k)
        y_tr = probes.token_labels(tgt_tr, classes)
        y_te = probes.token_labels(np.concatenate([f(ids[j]) for j in test]), classes)
        majority = int(np.argmax(np.bincount(y_tr)))
        seg = lambda ok: [int(ok[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]  # noqa: E731
        correct, lams = [], []
        for d in range(n_depth):
            p = probes.train_probe(x_tr[d], y_tr, groups, pos, c.lambdas)
            correct.append(seg(p.predict(x_te[d]) == y_te))
            lams.append(p.lam)
        item[task] = {"correct": correct, "chance_correct": seg(y_te == majority),
                      "classes": [int(x) for x in classes], "n_classes": int(len(classes) + 1),
                      "coverage_test": float(np.mean(y_te < len(classes))),
                      "coverage_train": float(np.mean(y_tr < len(classes))), "lambda": lams}
    return item


def language_sample(feats: Sequence[Sequence[Any]], ids: Sequence[np.ndarray], index: int, c: Config) -> list:
    """The positions of one language that the language probe uses: per segment ``j``, at most
    ``language_positions`` positions (BOS excluded) drawn without replacement by a generator seeded
    with ``(seed, index, j)``; returns ``[(positions, [features at each depth])]`` per segment."""
    out = []
    for j, f in enumerate(feats):
        t = len(ids[j])
        rng = np.random.default_rng([c.seed, index, j])
        sel = np.sort(rng.choice(np.arange(1, t), size=min(c.language_positions, t - 1), replace=False))
        out.append((sel, [np.asarray(x)[sel] for x in f]))
    return out


def language_item(samples: dict, c: Config) -> dict:
    """The language probe at every depth over all languages, on the positions of
    :func:`language_sample` (``samples[lang]``, languages in class order)."""
    langs = list(samples)
    rows: dict[str, Any] = {k: [] for k in ("x", "y", "g", "p", "s", "test")}
    n_depth = len(samples[langs[0]][0][1])
    test_keys, test_n = [], []
    for li, lang in enumerate(langs):
        train, test = probes.segment_split(len(samples[lang]), c.train_fraction)
        for j in train + test:
            sel, xs = samples[lang][j]
            rows["x"].append(xs)
            rows["y"].append(np.full(sel.size, li))
            rows["g"].append(np.full(sel.size, f"{lang}:{j}", dtype=object))
            rows["p"].append(sel)
            rows["s"].append(np.full(sel.size, lang, dtype=object))
            rows["test"].append(np.full(sel.size, j in test))
            if j in test:
                test_keys.append([lang, j])
                test_n.append(int(sel.size))
    is_test = np.concatenate(rows["test"])
    y = np.concatenate(rows["y"])
    g = np.concatenate(rows["g"])
    pos = np.concatenate(rows["p"])
    strata = np.concatenate(rows["s"])
    bounds = np.cumsum([0] + test_n)
    correct, lams = [], []
    for d in range(n_depth):
        x = np.concatenate([r[d] for r in rows["x"]])
        p = probes.train_probe(x[~is_test], y[~is_test], g[~is_test], pos[~is_test], c.lambdas,
                               strata=strata[~is_test])
        ok = p.predict(x[is_test]) == y[is_test]
        correct.append([int(ok[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])])
        lams.append(p.lam)
    y_tr = y[~is_test]
    majority = int(np.argmax(np.bincount(y_tr, minlength=len(langs))))
    yt = y[is_test]
    return {"languages": langs, "test": test_keys, "n_test": test_n, "correct": correct,
            "chance_correct": [int((yt[a:b] == majority).sum()) for a, b in zip(bounds[:-1], bounds[1:])],
            "lambda": lams, "n_train": int((~is_test).sum())}


class _Counter:
    """Forward passes run in this process (the rerun check reads it)."""

    passes = 0


def _states(model, window, blocks) -> list[np.ndarray]:
    _Counter.passes += 1
    return [h[0].numpy() for h in probes.block_states(model, window, blocks)]


def _token_key(s, c: Config, lang: str) -> dict:
    return {**_probe_key(s, c), "task": "token", "language": lang}


def _language_key(s, c: Config) -> dict:
    return {**_probe_key(s, c), "task": "language", "language_positions": c.language_positions}


def _features(s, windows, lang: str, bar=None) -> tuple[list, list]:
    """The hidden states at every depth of each of the language's windows (one forward pass
    each), and the windows' token ids."""
    fl = []
    for w in windows[lang]:
        fl.append(_states(s.model, w, s.view.blocks))
        if bar is not None:
            bar.update()
    return fl, [w[0].cpu().numpy() for w in windows[lang]]


def measure(s, c: Config, cache: ResultCache | None) -> tuple[dict, dict, int]:
    """(token items per language, language item, forward passes run), cached."""
    lang_key = _language_key(s, c)
    lang_item = cache.get(lang_key) if cache is not None else None
    items: dict[str, dict] = {}
    todo = []
    for lang in s.languages:
        items[lang] = cache.get(_token_key(s, c, lang)) if cache is not None else None
        if items[lang] is None or lang_item is None:
            todo.append(lang)
    if not todo:
        return items, lang_item, 0
    windows = s.windows()
    start = _Counter.passes
    samples: dict[str, list] = {}
    bar = protocol.progress(total=sum(len(windows[l]) for l in todo), desc="probe passes", unit="segment")
    for lang in todo:
        fl, il = _features(s, windows, lang, bar)
        if items[lang] is None:
            items[lang] = token_item(fl, il, c)
            if cache is not None:
                cache.put(_token_key(s, c, lang), items[lang])
        if lang_item is None:
            samples[lang] = language_sample(fl, il, s.languages.index(lang), c)
        del fl
    bar.close()
    if lang_item is None:
        lang_item = language_item(samples, c)
        if cache is not None:
            cache.put(lang_key, lang_item)
    return items, lang_item, _Counter.passes - start


class ProbeWorker:
    """An executor worker (``validate._executor.Worker``): loads the model of ``c`` once; the
    payload ``{"task": "token", "language": l}`` probes that language's token identities,
    ``{"task": "language"}`` runs every language's windows and fits the language probe (its
    sampled states, tens of MB per language on a real model, never leave the worker); returns the
    cache entry."""

    def __init__(self, c: Config, folder=None):
        from validate._executor import RecordingCache

        self.c, self.s = c, worker_setup(c)  # shared with this process's block-pass worker
        self.cache = RecordingCache(read_from=folder)
        self.windows = self.s.windows()

    def compute(self, payload) -> list:
        s, c = self.s, self.c
        if payload.get("task") == "token":
            lang = payload["language"]
            if lang not in s.languages:
                raise ValueError(f"language {lang!r} is not one of this run's {s.languages}")
            key = _token_key(s, c, lang)
            if self.cache.get(key) is None:
                self.cache.put(key, token_item(*_features(s, self.windows, lang), c))
        elif payload.get("task") == "language":
            key = _language_key(s, c)
            if self.cache.get(key) is None:
                samples = {}
                for i, lang in enumerate(s.languages):
                    fl, il = _features(s, self.windows, lang)
                    samples[lang] = language_sample(fl, il, i, c)
                    del fl
                self.cache.put(key, language_item(samples, c))
        else:
            raise ValueError(f"unknown probe task {payload.get('task')!r}; expected 'token' or 'language'")
        return self.cache.drain()


def probe_worker(c: Config, folder: str | None = None) -> ProbeWorker:
    """The factory of :class:`ProbeWorker` (``validate._executor.WorkerSpec``)."""
    return ProbeWorker(c, folder)


def prefetch(s, c: Config, cache) -> int:
    """Hand the probes to the current executor ahead of :func:`measure` (a Ray executor computes
    the uncached items on its workers and writes them into ``cache``; in process nothing happens):
    one task per language's token probes, and one for the language probe, which runs every
    language's windows again on its worker (so that no captured state travels), concurrently with
    the others. Returns the forward passes those workers ran."""
    from validate._executor import Task, WorkerSpec, current

    ex = current()
    if not ex.prefetches:
        return 0
    tasks = [Task(f"token probes {l}", _token_key(s, c, l), {"task": "token", "language": l}) for l in s.languages]
    tasks.append(Task("language probe", _language_key(s, c), {"task": "language"}))
    todo = [t for t in tasks if cache is None or cache.get(t.key) is None]
    if not todo:
        return 0
    folder = None if cache is None or cache.folder is None else str(cache.folder)
    ex.map(WorkerSpec(f"{__name__}:probe_worker", (c, folder), device=c.device), todo, cache=cache)
    windows = s.windows()
    return sum(len(windows[t.payload["language"]]) if t.payload["task"] == "token"
               else sum(len(w) for w in windows.values()) for t in todo)


# ---- summarising ---------------------------------------------------------------------------------------

def _curve(correct, n, c: Config, strata=None, seed_offset: int = 0) -> dict:
    return probes.accuracy_ci(np.asarray(correct, dtype=float), np.asarray(n, dtype=float), c.bootstrap,
                              c.seed + seed_offset, strata)


def _with_verdict(ci: dict) -> dict:
    return {**ci, "verdict": resolved(ci)}


def summarise(s_langs: list[str], depths: list[str], items: dict, lang_item: dict, damage, c: Config) -> dict:
    """Accuracy curves with intervals, the bottleneck, and its relation to block damage."""
    tasks = ["token", "previous"] if c.previous else ["token"]
    out: dict[str, Any] = {}
    for task in tasks:
        per = {}
        for lang in s_langs:
            it = items[lang]
            per[lang] = {**_curve(it[task]["correct"], it["n_test"], c),
                         "chance": _curve(it[task]["chance_correct"], it["n_test"], c),
                         "n_classes": it[task]["n_classes"], "coverage_test": it[task]["coverage_test"],
                         "lambda": it[task]["lambda"],
                         "bottleneck": probes.find_bottleneck(it[task]["correct"], it["n_test"], depths,
                                                              c.bootstrap, c.seed)}
        correct = np.concatenate([np.asarray(items[l][task]["correct"]) for l in s_langs], axis=1)
        n = np.concatenate([items[l]["n_test"] for l in s_langs])
        strata = [l for l in s_langs for _ in items[l]["n_test"]]
        chance = np.concatenate([items[l][task]["chance_correct"] for l in s_langs])
        pooled = {**_curve(correct, n, c, strata), "chance": _curve(chance, n, c, strata),
                  "bottleneck": probes.find_bottleneck(correct, n, depths, c.bootstrap, c.seed, strata)}
        out[task] = {"per_language": per, "pooled": pooled}
    # the language probe
    li = lang_item
    keys = [tuple(k) for k in li["test"]]
    lc = np.asarray(li["correct"], dtype=float)
    ln = np.asarray(li["n_test"], dtype=float)
    lstrata = [k[0] for k in keys]
    per_lang = {}
    for lang in s_langs:
        cols = [i for i, k in enumerate(keys) if k[0] == lang]
        per_lang[lang] = _curve(lc[:, cols], ln[cols], c)
    out["language"] = {"pooled": {**_curve(lc, ln, c, lstrata),
                                  "chance_majority": _curve(li["chance_correct"], ln, c, lstrata),
                                  "chance_uniform": 1.0 / len(s_langs)},
                       "per_language": per_lang, "lambda": li["lambda"], "n_train": li["n_train"]}
    # relation to block damage (blocks only: depth d + 1 is the output of block d)
    metric = "kl" if damage.kl is not None else "bpb"
    dmg = damage.metric(metric)
    rank = damage.ranking(metric)
    blocks = damage.blocks
    nb = len(blocks)
    if depths[1:] != blocks:
        raise RuntimeError(f"probe depths {depths[1:]} do not match the damage's blocks {blocks}")
    groups = [b for _ in s_langs for b in blocks]
    dvec = np.concatenate([dmg[damage.languages.index(l)] for l in s_langs])

    def acc_of(task, lang):
        return np.asarray(out[task]["per_language"][lang]["acc"])

    corr = {}
    tok = np.concatenate([acc_of("token", l)[1:] for l in s_langs])
    drop = np.concatenate([acc_of("token", l)[:-1] - acc_of("token", l)[1:] for l in s_langs])
    corr["token_acc_vs_damage"] = _with_verdict(correlation_ci(tok, dvec, "spearman", c.bootstrap, c.seed, groups))
    corr["token_drop_vs_damage"] = _with_verdict(correlation_ci(drop, dvec, "spearman", c.bootstrap, c.seed, groups))
    if c.previous:
        prev = np.concatenate([acc_of("previous", l)[1:] for l in s_langs])
        corr["previous_acc_vs_damage"] = _with_verdict(correlation_ci(prev, dvec, "spearman", c.bootstrap,
                                                                      c.seed, groups))
    lang_acc = np.concatenate([np.asarray(per_lang[l]["acc"])[1:] for l in s_langs])
    corr["language_acc_vs_damage"] = _with_verdict(correlation_ci(lang_acc, dvec, "spearman", c.bootstrap,
                                                                  c.seed, groups))
    mean_dmg = dmg.mean(axis=0)
    pooled_tok = np.asarray(out["token"]["pooled"]["acc"])[1:]
    corr["pooled_token_acc_vs_mean_damage"] = _with_verdict(correlation_ci(pooled_tok, mean_dmg, "spearman",
                                                                           c.bootstrap, c.seed))
    bn = out["token"]["pooled"]["bottleneck"]
    first, top3 = blocks[rank[0]], [blocks[i] for i in rank[:3]]
    out["protection"] = {
        "metric": metric, "ranking": [blocks[i] for i in rank], "first": first, "top3": top3,
        "min_depth": bn["min_name"], "min_is_first": bn["min_name"] == first, "min_in_top3": bn["min_name"] in top3,
        "largest_drop_depth": bn["largest_drop_name"], "drop_is_first": bn["largest_drop_name"] == first,
        "drop_in_top3": bn["largest_drop_name"] in top3,
        "min_relative_depth": (depths.index(bn["min_name"]) - 1) / max(nb - 1, 1) if bn["min_name"] != "emb" else None,
        "first_relative_depth": rank[0] / max(nb - 1, 1),
        "per_language_min": {l: out["token"]["per_language"][l]["bottleneck"]["min_name"] for l in s_langs},
        "per_language_bottleneck": {l: out["token"]["per_language"][l]["bottleneck"]["bottleneck"] for l in s_langs},
    }
    out["correlations"] = corr
    out["damage_metric"] = metric
    return out


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Probe every depth of every language, then relate the curves to block damage."""
    s = setup(config)
    remote = prefetch(s, config, cache)
    items, lang_item, passes = measure(s, config, cache)
    passes += remote
    damage = block_damage(s, cache)
    depths = ["emb", *s.block_names]
    for lang, it in items.items():
        if len(it["token"]["correct"]) != len(depths):
            raise RuntimeError(f"{lang}: {len(it['token']['correct'])} probe depths for {len(depths)} states")
    data = summarise(s.languages, depths, items, lang_item, damage, config)
    data.update({
        "estimator": ESTIMATOR, "depths": depths, "languages": s.languages, "model_metadata": s.metadata,
        "token_classes": f"the {config.top_k} most frequent token ids of each language's training split plus 'other'",
        "chance_definition": "accuracy of always answering the training split's most frequent class",
        "split": {l: {"train": items[l]["train_segments"], "test": items[l]["test_segments"],
                      "n_train_positions": items[l]["n_train"], "n_test_positions": int(sum(items[l]["n_test"]))}
                  for l in s.languages},
        "counts": {"token": {l: items[l] for l in s.languages}, "language": lang_item},
        "damage": damage.to_json(), "forward_passes": passes, "block_damage_passes": damage.passes_run,
    })
    return protocol.Result(EXPERIMENT, config, data)


# ---- writing ---------------------------------------------------------------------------------------------

def _rows(result) -> list[dict]:
    depths, langs = result["depths"], result["languages"]
    dmg = result["damage"][result["damage_metric"]]
    rows = []
    for li, lang in enumerate(langs):
        t = result["token"]["per_language"][lang]
        p = result["previous"]["per_language"][lang] if result.get("previous") else None
        g = result["language"]["per_language"][lang]
        for d, name in enumerate(depths):
            rows.append({"language": lang, "depth": name, "token_acc": t["acc"][d], "token_low": t["ci_low"][d],
                         "token_high": t["ci_high"][d], "token_chance": t["chance"]["acc"],
                         "previous_acc": p["acc"][d] if p else None, "language_acc": g["acc"][d],
                         "language_low": g["ci_low"][d], "language_high": g["ci_high"][d],
                         "damage": None if d == 0 else dmg[result["damage"]["languages"].index(lang)][d - 1]})
    return rows


def _table_rows(result) -> list[dict]:
    depths = result["depths"]
    tp, lp = result["token"]["pooled"], result["language"]["pooled"]
    pp = result["previous"]["pooled"] if result.get("previous") else None
    dmg = np.asarray(result["damage"][result["damage_metric"]], dtype=float)
    ranking = result["protection"]["ranking"]
    rows = []
    for d, name in enumerate(depths):
        rows.append({"depth": name,
                     "token": tp["acc"][d], "token_ci": f"{format_number(tp['ci_low'][d])}--{format_number(tp['ci_high'][d])}",
                     "previous": pp["acc"][d] if pp else None, "language": lp["acc"][d],
                     "damage": None if d == 0 else float(dmg[:, d - 1].mean()),
                     "rank": None if d == 0 else ranking.index(name) + 1})
    for r in rows:
        r["token_ci"] = Tex(r["token_ci"])
    return rows


def plot(result, path: Path) -> Path:
    use_agg()
    import matplotlib.pyplot as plt

    depths, langs = result["depths"], result["languages"]
    x = np.arange(len(depths))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    for lang in langs:
        ax.plot(x, result["token"]["per_language"][lang]["acc"], lw=0.8, alpha=0.7, label=lang)
    tp = result["token"]["pooled"]
    ax.plot(x, tp["acc"], "k-", lw=2, label="all languages")
    ax.fill_between(x, tp["ci_low"], tp["ci_high"], color="k", alpha=0.15)
    ax.axhline(tp["chance"]["acc"], color="gray", ls="--", lw=1, label="chance (majority)")
    prot = result["protection"]
    for i, b in enumerate(prot["top3"]):
        ax.axvline(depths.index(b), color="tab:red", lw=2.5 - 0.7 * i, alpha=0.5,
                   label="protection top 3" if i == 0 else None)
    ax.set_title("current token identity", fontsize=9)
    ax.set_ylabel("held-out probe accuracy")
    ax = axes[1]
    lp = result["language"]["pooled"]
    ax.plot(x, lp["acc"], "o-", color="tab:blue", ms=3, label="language")
    ax.fill_between(x, lp["ci_low"], lp["ci_high"], color="tab:blue", alpha=0.2)
    ax.axhline(lp["chance_uniform"], color="tab:blue", ls="--", lw=1, label="1 / languages")
    if result.get("previous"):
        pp = result["previous"]["pooled"]
        ax.plot(x, pp["acc"], "s-", color="tab:green", ms=3, label="previous token")
        ax.fill_between(x, pp["ci_low"], pp["ci_high"], color="tab:green", alpha=0.2)
        ax.axhline(pp["chance"]["acc"], color="tab:green", ls=":", lw=1, label="previous: chance")
    ax.set_title("language and previous token", fontsize=9)
    for a in axes[:2]:
        a.set_xticks(x)
        a.set_xticklabels([d.replace("block", "") for d in depths], fontsize=6)
        a.set_xlabel("depth (emb, then block output)", fontsize=8)
        a.set_ylim(-0.02, 1.02)
        a.legend(fontsize=6, ncol=2)
    ax = axes[2]
    dmg = result["damage"][result["damage_metric"]]
    for lang in langs:
        acc = np.asarray(result["token"]["per_language"][lang]["acc"])
        ax.scatter(acc[:-1] - acc[1:], dmg[result["damage"]["languages"].index(lang)], s=10, label=lang)
    cr = result["correlations"]["token_drop_vs_damage"]
    r = "n/a" if cr["r"] is None else f"{cr['r']:.2f} [{cr['ci_low']:.2f}, {cr['ci_high']:.2f}]"
    ax.set_title(f"Spearman r = {r}", fontsize=9)
    ax.set_xlabel("token accuracy lost across the block", fontsize=8)
    ax.set_ylabel(f"single-block damage ({result['damage_metric']})", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def write(result: protocol.Result, out: Path) -> list[Path]:
    out = Path(out)
    files = [write_csv(out / f"{EXPERIMENT}.csv", _rows(result),
                       ["language", "depth", "token_acc", "token_low", "token_high", "token_chance",
                        "previous_acc", "language_acc", "language_low", "language_high", "damage"])]
    cfg = result.config_dict
    files.append(write_latex_table(
        out / f"{EXPERIMENT}_table.tex", _table_rows(result),
        ["depth", "token", "token_ci", "previous", "language", "damage", "rank"],
        headers=["depth", "token", "interval", "previous", "language", "damage", "rank"],
        caption=(r"Held-out linear-probe accuracy per depth (embedding output, then each block's output), "
                 r"pooled over languages: current token (the " + tex_text(cfg.get("top_k")) +
                 r" most frequent ids of each language plus other; bootstrap interval over test segments), "
                 r"previous token, and language; mean single-block damage and its rank in the protection ranking."),
        label="tab:bottleneck", digits=3))
    files.append(plot(result, out / f"{EXPERIMENT}.png"))
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    bn = result["token"]["pooled"]["bottleneck"]
    p = result["protection"]
    c = result["correlations"]["token_drop_vs_damage"]
    r = "n/a" if c["r"] is None else f"{c['r']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
    return (f"token accuracy lowest at {bn['min_name']} ({bn['min_acc']:.3f}; bottleneck: "
            f"{'yes' if bn['bottleneck'] else 'no'}), protection ranks {p['first']} first; "
            f"drop vs damage Spearman {r}; {result['forward_passes']} forward passes")


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")
    cfg = result.config_dict
    depths = result.get("depths", [])
    ms.add("ProbeTopK", cfg.get("top_k"), "provenance.config.top_k")
    ms.add("ProbeLanguages", len(result.get("languages", [])), "len(languages)")
    ms.add("ProbeDepths", len(depths), "len(depths)")
    ms.add("ProbeTrainFraction", cfg.get("train_fraction"), "provenance.config.train_fraction", percent=True)
    ms.add("ProbeLanguagePositions", cfg.get("language_positions"), "provenance.config.language_positions")
    ms.add("ProbeModel", cfg.get("model"), "provenance.config.model")
    tp = result["token"]["pooled"]
    for label, d in (("Emb", 0), ("Last", len(depths) - 1)):
        ms.add(["ProbeTokenAcc", label], tp["acc"][d], f"token.pooled.acc[{d}]")
        ms.add(["ProbeTokenAcc", label, "Low"], tp["ci_low"][d], f"token.pooled.ci_low[{d}]")
        ms.add(["ProbeTokenAcc", label, "High"], tp["ci_high"][d], f"token.pooled.ci_high[{d}]")
    ms.add("ProbeTokenChance", tp["chance"]["acc"], "token.pooled.chance.acc")
    bn = tp["bottleneck"]
    k = bn["min_index"]
    ms.add("ProbeMinDepth", bn["min_name"], "token.pooled.bottleneck.min_name")
    ms.add("ProbeMinAcc", bn["min_acc"], "token.pooled.bottleneck.min_acc")
    ms.add("ProbeMinAccLow", tp["ci_low"][k], f"token.pooled.ci_low[{k}]")
    ms.add("ProbeMinAccHigh", tp["ci_high"][k], f"token.pooled.ci_high[{k}]")
    for label, key in (("First", "first_minus_min"), ("Last", "last_minus_min")):
        ms.add(["ProbeMinGap", label], bn[key]["diff"], f"token.pooled.bottleneck.{key}.diff")
        ms.add(["ProbeMinGap", label, "Low"], bn[key]["ci_low"], f"token.pooled.bottleneck.{key}.ci_low")
        ms.add(["ProbeMinGap", label, "High"], bn[key]["ci_high"], f"token.pooled.bottleneck.{key}.ci_high")
    ms.add("ProbeBottleneckVerdict", "an interior bottleneck" if bn["bottleneck"] else "no interior bottleneck",
           "token.pooled.bottleneck.bottleneck")
    ms.add("ProbeDropDepth", bn["largest_drop_name"], "token.pooled.bottleneck.largest_drop_name")
    ms.add("ProbeDrop", bn["largest_drop"], "token.pooled.bottleneck.largest_drop")
    ms.add("ProbeDropLow", bn["largest_drop_ci"]["ci_low"], "token.pooled.bottleneck.largest_drop_ci.ci_low")
    ms.add("ProbeDropHigh", bn["largest_drop_ci"]["ci_high"], "token.pooled.bottleneck.largest_drop_ci.ci_high")
    p = result["protection"]
    ms.add("ProbeProtectFirst", p["first"], "protection.first")
    ms.add("ProbeProtectTopThree", ", ".join(p["top3"]), "protection.top3")
    yes = lambda v: "is" if v else "is not"  # noqa: E731
    ms.add("ProbeMinIsFirst", yes(p["min_is_first"]), "protection.min_is_first")
    ms.add("ProbeMinInTopThree", yes(p["min_in_top3"]), "protection.min_in_top3")
    ms.add("ProbeDropIsFirst", yes(p["drop_is_first"]), "protection.drop_is_first")
    ms.add("ProbeDropInTopThree", yes(p["drop_in_top3"]), "protection.drop_in_top3")
    n_bn = sum(bool(v) for v in p["per_language_bottleneck"].values())
    ms.add("ProbeLanguagesWithBottleneck", n_bn, "protection.per_language_bottleneck")
    lp = result["language"]["pooled"]
    ms.add("ProbeLangAccEmb", lp["acc"][0], "language.pooled.acc[0]")
    ms.add("ProbeLangAccLast", lp["acc"][-1], "language.pooled.acc[-1]")
    ms.add("ProbeLangAccMin", min(lp["acc"]), "min language.pooled.acc")
    ms.add("ProbeLangChance", lp["chance_uniform"], "language.pooled.chance_uniform")
    if result.get("previous"):
        pp = result["previous"]["pooled"]
        ms.add("ProbePrevAccEmb", pp["acc"][0], "previous.pooled.acc[0]")
        ms.add("ProbePrevAccMax", max(pp["acc"]), "max previous.pooled.acc")
        ms.add("ProbePrevAccMaxDepth", depths[int(np.argmax(pp["acc"]))], "argmax previous.pooled.acc")
        ms.add("ProbePrevAccLast", pp["acc"][-1], "previous.pooled.acc[-1]")
    names = {"token_acc_vs_damage": "TokenAcc", "token_drop_vs_damage": "TokenDrop",
             "previous_acc_vs_damage": "PrevAcc", "language_acc_vs_damage": "LangAcc",
             "pooled_token_acc_vs_mean_damage": "PooledTokenAcc"}
    for key, label in names.items():
        cr = result["correlations"].get(key)
        if cr is None:
            continue
        ms.add(["ProbeCorr", label], cr["r"], f"correlations.{key}.r")
        ms.add(["ProbeCorr", label, "Low"], cr["ci_low"], f"correlations.{key}.ci_low")
        ms.add(["ProbeCorr", label, "High"], cr["ci_high"], f"correlations.{key}.ci_high")
        ms.add(["ProbeCorr", label, "Verdict"], cr["verdict"], f"correlations.{key}.verdict")
    ms.add("ProbeForwardPasses", result.get("forward_passes"), "forward_passes")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
