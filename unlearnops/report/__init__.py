"""The benchmark report over the settings grid, in the seed study's manner: Table 1 with one column
group per setting (Final with its interval, test and forget accuracy, time, time / retrain) and
retrain as the last row; a generality view (rank per setting, mean rank, worst-setting Final, time
rank); ranking stability on disjoint model subsets; per setting the seed's Figures 2-3 and the
other plots; a ranking per setting with its reasons and the run `ops.method: auto` would pick; a
generated reading; one self-contained HTML page (reports/index.html).

For DVC: summary/<setting>.json (method -> Final with its interval, test and forget accuracy,
time / retrain) is the grid's only declared metric, versioned in git, so `dvc metrics diff` and
`dvc exp show` compare runs; each plot's data is written beside its PNG
(reports/plots/<kind>/<setting>.csv) for `dvc plots diff` (dvc.yaml declares x and y per kind)."""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from unlearnops import evaluation, ranking  # noqa: E402
from unlearnops.report import relearn as report_relearn  # noqa: E402
from unlearnops.report import ulira as report_ulira  # noqa: E402
from unlearnops.report import sensitivity  # noqa: E402
from unlearnops.files import write_atomic, write_csv, write_json, write_text_atomic  # noqa: E402
from unlearnops.metrics import epsilon  # noqa: E402
from unlearnops.outputs import RunOutputs  # noqa: E402
from unlearnops.layout import TUNE, Layout, run_names  # noqa: E402

RETRAIN_ROW = "retrain (half vs half)"
OVER_BUDGET = "†"  # marks time / retrain above evaluate.time_budget
TOP_METHODS = 3    # methods shown in each setting's confidence histograms


def _load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def setting_label(params: dict) -> str:
    """A readable name of a single run's setting (the flat layout's)."""
    forget = params["forget"]
    detail = {"random": f"random {forget['fraction']:.1%}", "users": f"{forget['n_users']} users", "class": f"class {forget['class']}"}[forget["mode"]]
    return f"{params['data']['name']}, forget {detail}"


def interval(score: dict) -> str:
    return f"{score['estimate']:.3f} [{score['low']:.3f}, {score['high']:.3f}]"


class SettingResults:
    """Everything the report reads for one setting: each run's evidence and logits, retrain's."""

    def __init__(self, params: dict, where: Layout):
        self.params = params
        self.runs = run_names(params)
        self.metrics = {name: _load_json(where.evidence / f"{name}.json") for name in self.runs}
        self.retrain = _load_json(where.metrics / "retrain.json")
        self.retrained = RunOutputs.load(where.retrain / "logits.npz")
        self.outputs = {name: RunOutputs.load(where.unlearned / name / "logits.npz") for name in self.runs}
        self.epsilons = {name: np.load(where.arrays / f"{name}.npz")["epsilons"] for name in self.runs}
        self.floor = evaluation.retrain_noise_floor(self.retrained, params)
        self.relearn = report_relearn.relearn_table(params, where.relearn)
        self.relearn_curves = report_relearn.relearn_curves(params, where.relearn)
        self.budget = float(params["evaluate"]["time_budget"])

    def rows(self) -> list[dict]:
        """Table 1's numbers: one row per run, then retrain (half of its models scored against the other half)."""
        rows = []
        for name, m in self.metrics.items():
            rows.append({"method": name, "final": m["final_score"], "test": m["accuracy"]["test"]["mean"],
                         "forget": m["accuracy"]["forget"]["mean"], "time": m["seconds_per_model"],
                         "time_vs_retrain": m["time_vs_retrain"]})
        rows.append({"method": RETRAIN_ROW, "final": self.floor["final_score"], "test": self.retrain["accuracy"]["test"]["mean"],
                     "forget": self.retrain["accuracy"]["forget"]["mean"], "time": self.retrain["seconds_per_model"],
                     "time_vs_retrain": 1.0})
        return rows

    def details(self) -> pd.DataFrame:
        """The per-setting detail: F, retain accuracy, membership inference and the accuracy gap."""
        rows = [{"method": name, "F": m["forget_quality"]["estimate"], "Retain acc": m["accuracy"]["retain"]["mean"],
                 "MIA loss acc": m["mia"]["loss_attack_acc"], "MIA efficacy": m["mia"]["efficacy_confidence"],
                 "Avg gap": m["accuracy_gap"]["average"]} for name, m in self.metrics.items()]
        mia = next(iter(self.metrics.values()))["retrain_mia"]
        rows.append({"method": RETRAIN_ROW, "F": self.floor["forget_quality"]["estimate"],
                     "Retain acc": self.retrain["accuracy"]["retain"]["mean"], "MIA loss acc": mia["loss_attack_acc"],
                     "MIA efficacy": mia["efficacy_confidence"], "Avg gap": 0.0})
        return pd.DataFrame(rows)


# ---------------------------------------------------------------- tables


def table_numbers(results: dict[str, SettingResults]) -> pd.DataFrame:
    """Table 1 as numbers: one row per method (retrain last), columns `<setting> <measure>`."""
    frames = []
    for setting, res in results.items():
        frame = pd.DataFrame([{
            "method": r["method"],
            f"{setting} Final": r["final"]["estimate"], f"{setting} Final low": r["final"]["low"], f"{setting} Final high": r["final"]["high"],
            f"{setting} Test": r["test"], f"{setting} Forget": r["forget"], f"{setting} Time [s]": r["time"],
            f"{setting} Time / retrain": r["time_vs_retrain"],
            f"{setting} over budget": r["method"] != RETRAIN_ROW and r["time_vs_retrain"] > res.budget,
        } for r in res.rows()]).set_index("method")
        frames.append(frame)
    table = pd.concat(frames, axis=1)  # a run missing from a setting leaves its cells empty
    order = [m for m in table.index if m != RETRAIN_ROW] + [RETRAIN_ROW]
    return table.loc[order].reset_index()


def table_shown(results: dict[str, SettingResults]) -> pd.DataFrame:
    """Table 1 as shown: columns grouped by setting (a two-level header), time / retrain above the
    budget marked with OVER_BUDGET."""
    columns, data = [], {}
    for setting, res in results.items():
        for r in res.rows():
            over = r["method"] != RETRAIN_ROW and r["time_vs_retrain"] > res.budget
            cells = {"Final": interval(r["final"]), "Test": f"{r['test']:.3f}", "Forget": f"{r['forget']:.3f}",
                     "Time [s]": f"{r['time']:.3f}", "Time / retrain": f"{r['time_vs_retrain']:.2f}" + (f" {OVER_BUDGET}" if over else "")}
            for measure, cell in cells.items():
                data.setdefault(r["method"], {})[(setting, measure)] = cell
        columns += [(setting, m) for m in ("Final", "Test", "Forget", "Time [s]", "Time / retrain")]
    order = [m for m in data if m != RETRAIN_ROW] + [RETRAIN_ROW]
    shown = pd.DataFrame([data[m] for m in order], index=pd.Index(order, name="method"), columns=pd.MultiIndex.from_tuples(columns))
    return shown.fillna("")


def table_markdown(shown: pd.DataFrame, budget: float) -> str:
    flat = shown.copy()
    flat.columns = [f"{setting}: {measure}" for setting, measure in shown.columns]
    note = (f"\n\n{OVER_BUDGET} time / retrain above evaluate.time_budget = {budget:g}. Final: the competition score "
            "with its 95% interval over the forget examples, these N models fixed (it leaves out model-sampling noise, "
            "and F depends on N: see ranking_stability.md); the last row scores half of the retrained models against the other half.\n")
    return flat.reset_index().to_markdown(index=False) + note


def generality(results: dict[str, SettingResults]) -> pd.DataFrame:
    """Per method: its rank in each setting (1 = highest Final), the mean rank, the worst setting's
    Final, the mean time / retrain and its rank (1 = fastest). Sorted by mean rank."""
    finals, times = {}, {}
    for setting, res in results.items():
        finals[setting] = {name: m["final_score"]["estimate"] for name, m in res.metrics.items()}
        times[setting] = {name: m["time_vs_retrain"] for name, m in res.metrics.items()}
    finals, times = pd.DataFrame(finals), pd.DataFrame(times)
    ranks = finals.rank(ascending=False, method="min")
    table = ranks.astype("Int64").add_prefix("rank ")  # ranks are whole numbers: shown as 1, not 1.000
    table["mean rank"] = ranks.mean(axis=1)
    table["worst Final"] = finals.min(axis=1)
    table["worst setting"] = finals.idxmin(axis=1)
    table["mean time / retrain"] = times.mean(axis=1)
    table["time rank"] = table["mean time / retrain"].rank(method="min").astype("Int64")
    budget = next(iter(results.values())).budget
    table["over budget in"] = [", ".join(s for s in times.columns if times.loc[m, s] > budget) for m in table.index]
    return table.sort_values(["mean rank", "worst Final"], ascending=[True, False]).rename_axis("method").reset_index()


AUTO_MARK = "◀ auto"  # the ranking's mark on the run `ops.method: auto` would pick


def summary(res: SettingResults) -> dict:
    """summary/<setting>.json: per run (and retrain, half vs half) Final with its interval, test and
    forget accuracy and time / retrain; small and flat enough for `dvc metrics show` and `diff`."""
    return {r["method"] if r["method"] != RETRAIN_ROW else "retrain": {
        "final": r["final"]["estimate"], "final_low": r["final"]["low"], "final_high": r["final"]["high"],
        "test_acc": r["test"], "forget_acc": r["forget"], "time_vs_retrain": r["time_vs_retrain"]} for r in res.rows()}


def auto_choice(params: dict, results: dict[str, SettingResults]) -> dict:
    """What the deletion flow would use: with `ops.method: auto`, the pick of unlearnops.ranking in
    `ops.benchmark_setting` (None if that setting is not in this report); else ops.method itself."""
    from unlearnops import methods

    ops = params.get("ops") or {}
    setting = ops.get("benchmark_setting")
    if ops.get("method", "auto") != "auto":
        return {"setting": setting, "method": ops["method"], "rule": "ops.method"}
    if setting not in results:
        return {"setting": setting, "method": None, "rule": f"auto: ops.benchmark_setting {setting!r} is not in this report"}
    scores = ranking.auto_candidates(results[setting].metrics, results[setting].params, methods.available())
    best = ranking.auto_pick(scores)
    if best is None:
        return {"setting": setting, "method": ops.get("fallback_method"), "rule": "auto: no Final in the benchmark, ops.fallback_method"}
    return {"setting": setting, "method": best, "rule": f"auto: {ranking.auto_reason(scores, setting)}"}


def setting_ranking(setting: str, res: SettingResults, auto: dict) -> pd.DataFrame:
    """One setting's runs ranked by Final (1 = best), with the reasons: Final and its interval,
    whether that interval overlaps the best run's, time / retrain against evaluate.time_budget, the
    test accuracy lost against retraining (retrained minus the run's, in points) and notes: the run
    `ops.method: auto` would pick, a run slower than retraining."""
    retrain_test = res.retrain["accuracy"]["test"]["mean"]
    rows = sorted((r for r in res.rows() if r["method"] != RETRAIN_ROW), key=lambda r: -r["final"]["estimate"])
    table = []
    for rank, r in enumerate(rows, start=1):
        notes = []
        if auto.get("setting") == setting and auto.get("method") == r["method"]:
            notes.append(f"{AUTO_MARK}: the deletion flow uses it")
        if r["time_vs_retrain"] > 1:
            notes.append("⚠ slower than retraining")
        table.append({
            "setting": setting, "rank": rank, "method": r["method"], "Final": interval(r["final"]),
            "final": r["final"]["estimate"], "final_low": r["final"]["low"], "final_high": r["final"]["high"],
            "overlaps best": rank > 1 and r["final"]["high"] >= rows[0]["final"]["low"],
            "time / retrain": float(r["time_vs_retrain"]), "within budget": bool(r["time_vs_retrain"] <= res.budget),
            "test acc loss [points]": 100 * (retrain_test - r["test"]), "forget acc": float(r["forget"]),
            "notes": "; ".join(notes),
        })
    return pd.DataFrame(table, columns=RANKING_COLUMNS)


RANKING_COLUMNS = ["setting", "rank", "method", "Final", "final", "final_low", "final_high", "overlaps best", "time / retrain",
                   "within budget", "test acc loss [points]", "forget acc", "notes"]


def ranking_shown(ranked: pd.DataFrame) -> pd.DataFrame:
    """The ranking as a page shows it: integers as integers, yes/no, rounded numbers, no duplicate Final columns."""
    shown = ranked.drop(columns=["final", "final_low", "final_high"]).copy()
    shown["rank"] = shown["rank"].astype(int).astype(str)
    for column in ("overlaps best", "within budget"):
        shown[column] = shown[column].map({True: "yes", False: "no"})
    shown["time / retrain"] = shown["time / retrain"].map(lambda v: f"{v:.2f}")
    shown["test acc loss [points]"] = shown["test acc loss [points]"].map(lambda v: f"{v:+.1f}")
    shown["forget acc"] = shown["forget acc"].map(lambda v: f"{v:.3f}")
    return shown


def recommendation(setting: str, ranked: pd.DataFrame, res: SettingResults, auto: dict) -> str:
    """One paragraph: the best-ranked run within the time budget and why, the runs whose interval
    overlaps its own, the runs slower than retraining, and which run the deletion flow would use."""
    if ranked.empty:
        return f"{setting}: no runs."
    within = ranked[ranked["within budget"]]
    parts = []
    if within.empty:
        best = ranked.iloc[0]
        parts.append(f"{setting}: no run fits the time budget ({res.budget:g} x retrain); the best Final is {best['method']} ({best['Final']}).")
    else:
        top = within.iloc[0]
        loss = top["test acc loss [points]"]
        parts.append(f"{setting}: recommended **{top['method']}** (rank {int(top['rank'])}): Final {top['Final']}, "
                     f"time / retrain {top['time / retrain']:.2f} within the budget of {res.budget:g}, "
                     f"test accuracy {abs(loss):.1f} points {'below' if loss >= 0 else 'above'} retraining.")
        higher = ranked[ranked["rank"] < top["rank"]]
        if len(higher):
            parts.append("Ranked higher but over the time budget: " + ", ".join(higher["method"]) + ".")
        others = within[within["rank"] != top["rank"]]
        tied = others[(others["final_high"] >= top["final_low"]) & (others["final_low"] <= top["final_high"])]
        if len(tied):
            parts.append("Intervals overlapping its own (not clearly worse on these models): " + ", ".join(tied["method"]) + ".")
    slow = ranked[ranked["time / retrain"] > 1]
    if len(slow):
        parts.append("⚠ Slower than retraining from scratch: " + ", ".join(f"{m} ({t:.2f} x retrain)" for m, t in zip(slow["method"], slow["time / retrain"]))
                     + ": retraining would be exact and faster.")
    if auto.get("setting") == setting and auto.get("method"):
        parts.append(f"The deletion flow (ops.method: {params_method(auto)}) uses **{auto['method']}** {AUTO_MARK} ({auto['rule']}).")
    return " ".join(parts)


def params_method(auto: dict) -> str:
    return "auto" if auto["rule"].startswith("auto") else auto["method"]


def disjoint_ranks(res: SettingResults, groups: tuple[int, ...], seed: int) -> pd.DataFrame:
    """Final and rank of every run on DISJOINT subsets of the models: for g groups, models are
    split (one seeded order) into g parts of N // g; part i of the unlearned models is scored
    against part i of the retrained ones. Independent subsets show how much the ranking depends
    on which models were drawn, apart from the intervals (which hold one set of models fixed and vary the forget examples)."""
    n = min(res.retrained.n_models, *(o.n_models for o in res.outputs.values()))
    order = np.random.default_rng(seed).permutation(n)
    conf_r = evaluation.forget_confidences(res.retrained)
    rows = []
    for g in groups:
        size = n // g
        if size < 2:
            continue
        for part in range(g):
            idx = order[part * size:(part + 1) * size]
            for name, run in res.outputs.items():
                eps = epsilon.per_example_epsilons(evaluation.forget_confidences(run)[idx], conf_r[idx])
                F = epsilon.forget_quality(eps, size)["forget_quality"]
                final = epsilon.final_score(F, run.accuracy("retain")[idx], res.retrained.accuracy("retain")[idx],
                                            run.accuracy("test")[idx], res.retrained.accuracy("test")[idx])
                rows.append({"method": name, "groups": g, "models": size, "part": part + 1, "final": final})
    long = pd.DataFrame(rows)
    if not long.empty:
        long["rank"] = long.groupby(["groups", "part"])["final"].rank(ascending=False, method="min").astype(int)
    return long


def stability(results: dict[str, SettingResults], seed: int) -> tuple[pd.DataFrame, str]:
    """The disjoint-subset ranks of every setting: long CSV rows, and Markdown with one table per setting."""
    frames, parts = [], []
    for setting, res in results.items():
        long = disjoint_ranks(res, (2, 4), seed)
        if long.empty:
            parts.append(f"### {setting}\n\nToo few models for disjoint subsets (need 2 per subset).\n")
            continue
        long.insert(0, "setting", setting)
        frames.append(long)
        full_rank = pd.Series({n: m["final_score"]["estimate"] for n, m in res.metrics.items()}).rank(ascending=False, method="min")
        wide = pd.DataFrame({"rank (all models)": full_rank.astype(int)})
        for (g, size), group in long.groupby(["groups", "models"]):
            by_method = group.sort_values("part").groupby("method")
            wide[f"ranks, {g} x {size} models"] = by_method["rank"].apply(lambda r: ", ".join(map(str, r)))
            wide[f"Final range, {g} x {size}"] = by_method["final"].apply(lambda f: f"{f.min():.3f} - {f.max():.3f}")
        parts.append(f"### {setting}\n\n" + wide.sort_values("rank (all models)").rename_axis("method").reset_index().to_markdown(index=False) + "\n")
    intro = ("Ranking on disjoint model subsets: the models are split into 2 and 4 independent groups and each group "
             "is scored on its own (unlearned part i against retrained part i). Ranks that move between groups depend "
             "on the models drawn, not only on the method.\n\n")
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), intro + "\n".join(parts)


def reading(results: dict[str, SettingResults], general: pd.DataFrame) -> str:
    """A short generated reading of the grid: the most general method, the best per setting, the budget."""
    best = general.iloc[0]
    lines = [f"Most general: **{best['method']}**, mean rank {best['mean rank']:.1f} over {len(results)} settings "
             f"(worst-setting Final {best['worst Final']:.3f}, in {best['worst setting']})."]
    per_setting = []
    for setting, res in results.items():
        finals = {n: m["final_score"]["estimate"] for n, m in res.metrics.items()}
        top = max(finals, key=finals.get)
        per_setting.append(f"{setting}: {top} ({finals[top]:.3f}; retrain half vs half {res.floor['final_score']['estimate']:.3f})")
    winners = {s.split(": ")[1].split(" (")[0] for s in per_setting}
    lines.append(("The best method is the same in every setting" if len(winners) == 1 else "The best method changes from setting to setting")
                 + ": " + "; ".join(per_setting) + ".")
    budget = next(iter(results.values())).budget
    over = general[general["over budget in"] != ""]
    lines.append(f"Over the time budget (time / retrain > {budget:g}): " + (", ".join(f"{r['method']} ({r['over budget in']})" for _, r in over.iterrows()) if len(over) else "none") + ".")
    fastest = general.sort_values("time rank").iloc[0]
    lines.append(f"Fastest: {fastest['method']} (mean time / retrain {fastest['mean time / retrain']:.3f}).")
    return "\n\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _confidence_example(res: SettingResults) -> tuple[list[str], int]:
    """The top methods by Final and the forget example with the highest mean epsilon over them."""
    finals = {n: m["final_score"]["estimate"] for n, m in res.metrics.items()}
    top = sorted(finals, key=finals.get, reverse=True)[:TOP_METHODS]
    return top, int(np.argmax(np.mean([res.epsilons[n] for n in top], axis=0)))


def plot_confidence_histograms(res: SettingResults, path: Path) -> Path:
    """The seed study's Figures 2-3: for the top methods of a setting, the N unlearned and N retrained
    confidences on ONE forget example: the one with the highest mean epsilon over those methods,
    where they are told apart from retraining the most."""
    finals = {n: m["final_score"]["estimate"] for n, m in res.metrics.items()}
    top, example = _confidence_example(res)
    conf_r = evaluation.forget_confidences(res.retrained)[:, example]
    fig, axes = plt.subplots(1, len(top), figsize=(3.4 * len(top), 2.8), squeeze=False)
    for ax, name in zip(axes[0], top):
        conf_u = evaluation.forget_confidences(res.outputs[name])[:, example]
        bins = np.histogram_bin_edges(np.concatenate([conf_u, conf_r]), bins=20)
        ax.hist(conf_r, bins=bins, alpha=0.55, label="retrained", color="tab:blue")
        ax.hist(conf_u, bins=bins, alpha=0.55, label="unlearned", color="tab:orange")
        ax.set_title(f"{name} (Final {finals[name]:.3f})", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"forget sample {res.retrained.ids['forget'][example]}: logit-scaled confidence", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_epsilons(epsilons: dict[str, np.ndarray], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(epsilons)), 3.5))
    ax.boxplot(list(epsilons.values()), tick_labels=list(epsilons), showmeans=True)
    ax.set_ylabel("per-example epsilon (lower: closer to retraining)")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    return _save(fig, path)


MARKERS = "osD^vP*Xhp<>"


def final_vs_time_data(res: SettingResults) -> pd.DataFrame:
    """The Final-vs-time plot's data: one row per run (reports/plots/final_vs_time/<setting>.csv)."""
    rows = [{"method": name, "seconds_per_model": m["seconds_per_model"], "time_vs_retrain": m["time_vs_retrain"],
             "final": m["final_score"]["estimate"], "final_low": m["final_score"]["low"], "final_high": m["final_score"]["high"]}
            for name, m in res.metrics.items()]
    return pd.DataFrame(rows).sort_values("final", ascending=False, kind="stable").reset_index(drop=True)


def plot_final_vs_time(res: SettingResults, path: Path, auto_method: str | None = None) -> Path:
    """Final (with its interval) against time per model, one colour and marker per run, named in a
    legend beside the axes (ordered by Final) rather than by labels on the points, which overlap
    where runs take similar time; the run ops would use is circled."""
    data = final_vs_time_data(res)
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(9, 4.6))
    for i, r in data.iterrows():
        label = f"{i + 1}. {r['method']}" + (f"  {AUTO_MARK}" if r["method"] == auto_method else "")
        ax.errorbar(r["seconds_per_model"], r["final"], yerr=[[r["final"] - r["final_low"]], [r["final_high"] - r["final"]]],
                    fmt=MARKERS[i % len(MARKERS)], color=colours[i % len(colours)], capsize=3, label=label, markersize=6)
        if r["method"] == auto_method:
            ax.plot(r["seconds_per_model"], r["final"], "o", ms=15, mfc="none", mec="black", mew=1.5)
    retrain_seconds = res.retrain["seconds_per_model"]
    ax.axvline(retrain_seconds, color="gray", ls="--", lw=1, label="retrain time")
    ax.axvline(retrain_seconds * res.budget, color="tab:red", ls=":", lw=1, label=f"time budget ({res.budget:g} x retrain)")
    ax.set_xscale("log")
    ax.set_xlabel("time per model [s] (log)")
    ax.set_ylabel("Final (95% interval over forget examples)")
    handles, labels = ax.get_legend_handles_labels()
    runs_first = sorted(range(len(labels)), key=lambda i: not labels[i][0].isdigit())  # the runs by rank, then the two lines
    ax.legend([handles[i] for i in runs_first], [labels[i] for i in runs_first], fontsize=7.5, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title="rank. run (by Final)", title_fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def confidence_data(res: SettingResults) -> pd.DataFrame:
    """The confidence plot's data: the N retrained and N unlearned logit-scaled confidences of the
    top methods on the forget example the histograms show (reports/plots/confidences/<setting>.csv)."""
    top, example = _confidence_example(res)
    frames = [pd.DataFrame({"models": "retrained", "model": np.arange(res.retrained.n_models),
                            "confidence": evaluation.forget_confidences(res.retrained)[:, example]})]
    for name in top:
        conf = evaluation.forget_confidences(res.outputs[name])[:, example]
        frames.append(pd.DataFrame({"models": name, "model": np.arange(len(conf)), "confidence": conf}))
    data = pd.concat(frames, ignore_index=True)
    data.insert(0, "sample_id", res.retrained.ids["forget"][example])
    return data


def epsilon_data(res: SettingResults) -> pd.DataFrame:
    """The epsilon plot's data: one row per run and forget example (reports/plots/epsilons/<setting>.csv)."""
    return pd.concat([pd.DataFrame({"method": name, "example": np.arange(len(eps)), "epsilon": eps}) for name, eps in res.epsilons.items()],
                     ignore_index=True)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


# ---------------------------------------------------------------- files


def write_html(path: Path, title: str, notes: list[str], tables: dict[str, pd.DataFrame], texts: dict[str, str],
               plots: dict[str, Path]) -> Path:
    """One page, images inlined as data URIs, so it opens offline anywhere; `texts` (Markdown) shown as it is."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    for caption, table in tables.items():
        parts.append(f"<h2>{html.escape(caption)}</h2>" + table.to_html(index=False, float_format=lambda v: f"{v:.3f}"))
    for caption, text in texts.items():
        parts.append(f"<h2>{html.escape(caption)}</h2><pre>{html.escape(text)}</pre>")
    for caption, png in plots.items():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    write_text_atomic(path, "\n".join(parts))
    return path


def _write(out_dir: Path, stem: str, frame: pd.DataFrame, markdown: str | None = None) -> list[Path]:
    write_csv(out_dir / f"{stem}.csv", frame, index=False)
    write_text_atomic(out_dir / f"{stem}.md", markdown if markdown is not None else frame.to_markdown(index=False, floatfmt=".3f") + "\n")
    return [out_dir / f"{stem}.csv", out_dir / f"{stem}.md"]


def _plot(out_dir: Path, kind: str, setting: str) -> Path:
    """reports/plots/<kind>/<setting>.png; its data beside it as .csv. One folder per kind, so that
    dvc.yaml can give each kind its template and x/y fields once, for every setting."""
    return out_dir / "plots" / kind / (re.sub(r"[^A-Za-z0-9._-]+", "_", setting) + ".png")


def build(params: dict, settings: dict[str, tuple[dict, Layout]], out_dir: Path, summary_dir: Path | None = None,
          tune_dir: Path = TUNE) -> list[Path]:
    """Write the report of `settings` (name -> (its params, its layout)) into out_dir, and with
    `summary_dir` each setting's summary/<setting>.json; the sensitivity section reads `tune_dir`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {name: SettingResults(p, where) for name, (p, where) in settings.items()}
    budget = float(params["evaluate"]["time_budget"])

    shown = table_shown(results)
    written = _write(out_dir, "table", table_numbers(results), table_markdown(shown, budget))
    write_text_atomic(out_dir / "table.html", shown.to_html())
    written.append(out_dir / "table.html")
    auto = auto_choice(params, results)
    rankings = {s: setting_ranking(s, res, auto) for s, res in results.items()}
    advice = {s: recommendation(s, rankings[s], res, auto) for s, res in results.items()}
    ranking_md = "\n".join(f"## {s}\n\n{advice[s]}\n\n" + ranking_shown(rankings[s]).drop(columns="setting").to_markdown(index=False, disable_numparse=True) + "\n"
                           for s in results)
    ranking_md += (f"\nRank 1 = highest Final. Within budget: time / retrain <= evaluate.time_budget = {budget:g}. Test acc loss: "
                   "retrained models' mean test accuracy minus the run's, in points. Overlaps best: its Final interval reaches "
                   f"the best run's. {AUTO_MARK}: the run the deletion flow would use ({auto['rule']}).\n")
    written += _write(out_dir, "ranking", pd.concat(rankings.values(), ignore_index=True), ranking_md)
    general = generality(results)
    written += _write(out_dir, "generality", general)
    long, stability_md = stability(results, int(params["evaluate"]["seed"]))
    written += _write(out_dir, "ranking_stability", long, stability_md)
    relearn = pd.concat([res.relearn.assign(setting=s) for s, res in results.items()], ignore_index=True)
    relearn_md = "\n".join(f"## {s}\n\n" + report_relearn.markdown(res.relearn) for s, res in results.items())
    written += _write(out_dir, "relearn", relearn, relearn_md)
    ulira = report_ulira.load(params, settings)
    written += _write(out_dir, "ulira", report_ulira.table(ulira), report_ulira.markdown(ulira, params["evaluate"]["ulira"]["settings"]))
    text = "\n\n".join(advice.values()) + "\n\n" + reading(results, general)
    write_text_atomic(out_dir / "reading.md", text)
    written.append(out_dir / "reading.md")

    plots, data = {}, []
    for setting, res in results.items():
        pick = auto["method"] if auto.get("setting") == setting else None
        path = _plot(out_dir, "final_vs_time", setting)
        plots[f"{setting}: Final vs time per model"] = plot_final_vs_time(res, path, pick)
        final_vs_time_data(res).to_csv(path.with_suffix(".csv"), index=False)
        path = _plot(out_dir, "relearn", setting)
        report_relearn.relearn_plot(res.relearn, path)
        plots[f"{setting}: relearning attack, accuracy on held-back folds after fine-tuning on the others"] = path
        res.relearn_curves.to_csv(path.with_suffix(".csv"), index=False)
        path = _plot(out_dir, "confidences", setting)
        plots[f"{setting}: confidences on one forget example, top methods vs retrained (seed study Figures 2-3)"] = plot_confidence_histograms(res, path)
        confidence_data(res).to_csv(path.with_suffix(".csv"), index=False)
        path = _plot(out_dir, "epsilons", setting)
        plots[f"{setting}: per-example epsilon"] = plot_epsilons(res.epsilons, path)
        epsilon_data(res).to_csv(path.with_suffix(".csv"), index=False)
        if setting in ulira:
            path = _plot(out_dir, "ulira", setting)
            plots[f"{setting}: U-LiRA per-example vulnerability (attack AUC per forget example and run)"] = report_ulira.plot(setting, *ulira[setting], path)
            report_ulira.plot_data(*ulira[setting]).to_csv(path.with_suffix(".csv"), index=False)
    (out_dir / "plots" / "ulira").mkdir(parents=True, exist_ok=True)  # a DVC output even with U-LiRA off
    data = [p.with_suffix(".csv") for p in plots.values()]
    sensitivity_table, sensitivity_md, sensitivity_plots, sensitivity_files = sensitivity.build(out_dir, tune_dir, list(results))
    plots |= sensitivity_plots
    notes = [line for line in text.replace("**", "").split("\n\n") if line.strip()] + [
        "Final = F x retain-accuracy ratio x test-accuracy ratio (NeurIPS 2023 competition). "
        f"{OVER_BUDGET}: time / retrain above evaluate.time_budget = {budget:g} (the competition's limit). "
        "The retrain row scores half of the retrained models against the other half: the best a method can reach with N/2 models.",
    ]
    flat_shown = shown.copy()
    flat_shown.columns = [f"{s}: {m}" for s, m in shown.columns]
    tables = {f"Ranking: {s}": ranking_shown(rankings[s]).drop(columns="setting") for s in results}
    tables |= {"Table 1: one column group per setting": flat_shown.reset_index(), "Generality": general,
               "Relearning attack": relearn, "U-LiRA (per-example likelihood-ratio attack)": report_ulira.table(ulira)}
    tables |= {f"{s}: details": res.details() for s, res in results.items()}
    tables["Hyperparameter sensitivity (unlearnops tune)"] = sensitivity_table
    html_path = write_html(out_dir / "index.html", f"unlearnops benchmark: {', '.join(results)}", notes, tables,
                           {"Ranking stability on disjoint model subsets": stability_md,
                            "Hyperparameter sensitivity": sensitivity_md}, plots)
    summary_json = {row["method"]: {"mean_rank": row["mean rank"], "worst_final": row["worst Final"], "time_rank": int(row["time rank"])}
                    for row in general.to_dict("records")}
    write_json(out_dir / "generality.json", summary_json, sort_keys=False)
    written += list(plots.values()) + data + sensitivity_files + [html_path, out_dir / "generality.json"]
    if summary_dir is not None:
        summary_dir.mkdir(parents=True, exist_ok=True)
        for setting, res in results.items():
            path = summary_dir / f"{setting}.json"
            write_json(path, summary(res), sort_keys=False)
            written.append(path)
    return written
