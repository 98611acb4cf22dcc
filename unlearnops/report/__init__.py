"""The benchmark report over the settings grid, in the seed study's manner: Table 1 with one column
group per setting (Final with its interval, test and forget accuracy, time, time / retrain) and
retrain as the last row; a generality view (rank per setting, mean rank, worst-setting Final, time
rank); ranking stability on disjoint model subsets; per setting the seed's Figures 2-3 and the
other plots; a generated reading; one self-contained HTML page (reports/index.html)."""
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

from unlearnops import evaluation  # noqa: E402
from unlearnops.report import relearn as report_relearn  # noqa: E402
from unlearnops.files import write_atomic, write_csv, write_json, write_text_atomic  # noqa: E402
from unlearnops.metrics import epsilon  # noqa: E402
from unlearnops.outputs import RunOutputs  # noqa: E402
from unlearnops.layout import Layout, run_names  # noqa: E402

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
    table = finals.rank(ascending=False, method="min").add_prefix("rank ")
    table["mean rank"] = table.mean(axis=1)
    table["worst Final"] = finals.min(axis=1)
    table["worst setting"] = finals.idxmin(axis=1)
    table["mean time / retrain"] = times.mean(axis=1)
    table["time rank"] = table["mean time / retrain"].rank(method="min")
    budget = next(iter(results.values())).budget
    table["over budget in"] = [", ".join(s for s in times.columns if times.loc[m, s] > budget) for m in table.index]
    return table.sort_values(["mean rank", "worst Final"], ascending=[True, False]).rename_axis("method").reset_index()


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


def plot_confidence_histograms(res: SettingResults, path: Path) -> Path:
    """The seed study's Figures 2-3: for the top methods of a setting, the N unlearned and N retrained
    confidences on ONE forget example: the one with the highest mean epsilon over those methods,
    where they are told apart from retraining the most."""
    finals = {n: m["final_score"]["estimate"] for n, m in res.metrics.items()}
    top = sorted(finals, key=finals.get, reverse=True)[:TOP_METHODS]
    example = int(np.argmax(np.mean([res.epsilons[n] for n in top], axis=0)))
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


def plot_final_vs_time(res: SettingResults, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in res.metrics.items():
        s = m["final_score"]
        ax.errorbar(m["seconds_per_model"], s["estimate"], yerr=[[s["estimate"] - s["low"]], [s["high"] - s["estimate"]]], fmt="o", capsize=3)
        ax.annotate(name, (m["seconds_per_model"], s["estimate"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    retrain_seconds = res.retrain["seconds_per_model"]
    ax.axvline(retrain_seconds, color="gray", ls="--", lw=1, label="retrain time")
    ax.axvline(retrain_seconds * res.budget, color="tab:red", ls=":", lw=1, label=f"time budget ({res.budget:g} x retrain)")
    ax.set_xscale("log")
    ax.set_xlabel("time per model [s] (log)")
    ax.set_ylabel("Final score (95% interval over forget examples)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


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


def build(params: dict, settings: dict[str, tuple[dict, Layout]], out_dir: Path) -> list[Path]:
    """Write the report of `settings` (name -> (its params, its layout)) into out_dir; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {name: SettingResults(p, where) for name, (p, where) in settings.items()}
    budget = float(params["evaluate"]["time_budget"])

    shown = table_shown(results)
    written = _write(out_dir, "table", table_numbers(results), table_markdown(shown, budget))
    write_text_atomic(out_dir / "table.html", shown.to_html())
    written.append(out_dir / "table.html")
    general = generality(results)
    written += _write(out_dir, "generality", general)
    long, stability_md = stability(results, int(params["evaluate"]["seed"]))
    written += _write(out_dir, "ranking_stability", long, stability_md)
    relearn = pd.concat([res.relearn.assign(setting=s) for s, res in results.items()], ignore_index=True)
    relearn_md = "\n".join(f"## {s}\n\n" + report_relearn.markdown(res.relearn) for s, res in results.items())
    written += _write(out_dir, "relearn", relearn, relearn_md)
    text = reading(results, general)
    write_text_atomic(out_dir / "reading.md", text)
    written.append(out_dir / "reading.md")

    plots = {}
    for setting, res in results.items():
        folder = out_dir / "plots" / re.sub(r"[^A-Za-z0-9._-]+", "_", setting)
        plots[f"{setting}: confidences on one forget example, top methods vs retrained (seed study Figures 2-3)"] = plot_confidence_histograms(res, folder / "confidence_histograms.png")
        plots[f"{setting}: Final score vs time"] = plot_final_vs_time(res, folder / "final_vs_time.png")
        plots[f"{setting}: per-example epsilon"] = plot_epsilons(res.epsilons, folder / "epsilons.png")
        report_relearn.relearn_plot(res.relearn, folder / "relearn.png")
        plots[f"{setting}: relearning attack, accuracy on held-back folds after fine-tuning on the others"] = folder / "relearn.png"
    notes = [line for line in text.replace("**", "").split("\n\n") if line.strip()] + [
        "Final = F x retain-accuracy ratio x test-accuracy ratio (NeurIPS 2023 competition). "
        f"{OVER_BUDGET}: time / retrain above evaluate.time_budget = {budget:g} (the competition's limit). "
        "The retrain row scores half of the retrained models against the other half: the best a method can reach with N/2 models.",
    ]
    flat_shown = shown.copy()
    flat_shown.columns = [f"{s}: {m}" for s, m in shown.columns]
    tables = {"Table 1: one column group per setting": flat_shown.reset_index(), "Generality": general,
              "Relearning attack": relearn}
    tables |= {f"{s}: details": res.details() for s, res in results.items()}
    html_path = write_html(out_dir / "index.html", f"unlearnops benchmark: {', '.join(results)}", notes, tables,
                           {"Ranking stability on disjoint model subsets": stability_md}, plots)
    summary = {row["method"]: {"mean_rank": row["mean rank"], "worst_final": row["worst Final"], "time_rank": row["time rank"]}
               for row in general.to_dict("records")}
    write_json(out_dir / "generality.json", summary, sort_keys=False)
    return written + list(plots.values()) + [html_path, out_dir / "generality.json"]
