"""The report's recommendation (fast, in-process): the ranking per setting with its reasons, the mark
on the run `ops.method: auto` would pick (the same rule as the deletion flow), the summary metrics
for DVC, integers shown as integers, and plots that stay readable."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest

from unlearnops import ranking


def _setting(params: dict, finals: dict, times: dict, test: dict | None = None, budget: float | None = None):
    """A SettingResults with only the numbers the ranking reads: name -> (estimate, low, high), time / retrain, test accuracy."""
    from unlearnops.report import SettingResults

    res = SettingResults.__new__(SettingResults)
    res.params = params
    res.budget = float(params["evaluate"]["time_budget"] if budget is None else budget)
    res.retrain = {"accuracy": {"test": {"mean": 0.98}, "forget": {"mean": 0.97}}, "seconds_per_model": 10.0}
    def score(e, lo, hi):
        return {"estimate": e, "low": lo, "high": hi}

    res.floor = {"final_score": score(0.5, 0.4, 0.6)}
    res.metrics = {name: {"method": name, "final_score": score(*f), "seconds_per_model": 10.0 * times[name], "time_vs_retrain": times[name],
                          "accuracy": {"test": {"mean": (test or {}).get(name, 0.95)}, "forget": {"mean": 0.99}}}
                   for name, f in finals.items()}
    return res


@pytest.fixture
def grid(repo_params):
    """The default params' benchmark setting with four runs: the best Final is a condensed run (never
    auto's), the best method is over the time budget, one run is slower than retraining."""
    params = copy.deepcopy(repo_params)
    budget = params["evaluate"]["time_budget"]
    setting = params["ops"]["benchmark_setting"]
    finals = {"finetune+blend": (0.9, 0.8, 1.0), "scrub": (0.6, 0.5, 0.7), "finetune": (0.4, 0.35, 0.55), "muso": (0.1, 0.05, 0.2)}
    times = {"finetune+blend": budget / 2, "scrub": budget * 2, "finetune": budget / 2, "muso": 1.5}
    return params, setting, {setting: _setting(params, finals, times, test={"finetune": 0.96})}


def test_auto_candidates_are_registered_methods_with_a_finite_final(repo_params):
    from unlearnops import methods

    results = {"finetune": {"method": "finetune", "final_score": {"estimate": 0.2}}, "scrub": {"final_score": 0.3},
               "finetune+blend": {"method": "finetune+blend", "final_score": {"estimate": 0.9}},
               "muso": {"final_score": {"estimate": math.nan}}, "magic": {"final_score": 0.99}}
    scores = ranking.auto_candidates(results, repo_params, methods.available())
    assert scores == {"finetune": 0.2, "scrub": 0.3}
    assert ranking.auto_pick(scores) == "scrub" and ranking.auto_pick({}) is None
    assert ranking.auto_pick({"b": 0.5, "a": 0.5}) == "a"  # ties: the first name


def test_auto_skips_a_method_that_fails_the_gates_criteria_in_the_benchmark(repo_params):
    """The best Final loses its place if its benchmark means would fail params.yaml's gates."""
    from unlearnops import methods

    gates = repo_params["ops"]["gates"]

    def run(final, test, forget=0.97, auc=0.5):
        return {"final_score": {"estimate": final}, "accuracy": {"test": {"mean": test}, "retain": {"mean": 1.0}, "forget": {"mean": forget}},
                "retrain_accuracy": {"test": {"mean": 0.98}, "retain": {"mean": 1.0}, "forget": {"mean": 0.97}},
                "mia": {"loss_attack_auc": auc}, "retrain_mia": {"loss_attack_auc": 0.5}}
    drop = gates["max_test_accuracy_drop"]
    results = {"scrub": run(0.5, 0.98 - 2 * drop), "finetune": run(0.3, 0.98 - drop / 2),
               "neggrad_plus": run(0.4, 0.98, forget=0.97 - 2 * gates["max_forget_accuracy_gap"]),
               "random_label": run(0.45, 0.98, auc=0.5 + 2 * gates["max_mia_auc_gap"])}
    assert ranking.gate_failures(results["finetune"], gates) == []
    assert [len(ranking.gate_failures(results[m], gates)) for m in ("scrub", "neggrad_plus", "random_label")] == [1, 1, 1]
    assert ranking.auto_candidates(results, repo_params, methods.available()) == {"finetune": 0.3}


def test_the_reports_mark_is_the_method_the_deletion_flow_chooses(repo_params, tmp_path):
    """report.auto_choice and ops.deletion.choose_method read the same evidence and agree."""
    from unlearnops import report
    from unlearnops.ops import deletion

    params = copy.deepcopy(repo_params)
    assert params["ops"]["method"] == "auto"
    evidence = {"finetune": 0.2, "scrub": 0.35, "finetune+blend": 0.9, "neggrad_plus": 0.1}
    for name, final in evidence.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"method": name, "final_score": {"estimate": final, "low": 0, "high": 1}}))
    chosen, _ = deletion.choose_method(params, tmp_path)
    setting = params["ops"]["benchmark_setting"]
    res = _setting(params, {}, {})
    res.metrics = ranking.read_results(tmp_path)
    assert report.auto_choice(params, {setting: res})["method"] == chosen == "scrub"
    fixed = copy.deepcopy(params)
    fixed["ops"]["method"] = "finetune"
    assert report.auto_choice(fixed, {setting: res}) == {"setting": setting, "method": "finetune", "rule": "ops.method"}
    assert report.auto_choice(params, {"elsewhere": res})["method"] is None  # the benchmark setting is not in this report


def test_ranking_gives_reasons_marks_auto_and_warns_when_slower_than_retraining(grid):
    from unlearnops import report

    params, setting, results = grid
    auto = report.auto_choice(params, results)
    assert auto["method"] == "scrub"  # the condensed run has the best Final but is not a method the flow can run
    ranked = report.setting_ranking(setting, results[setting], auto)
    assert list(ranked["method"]) == ["finetune+blend", "scrub", "finetune", "muso"]
    assert list(ranked["rank"]) == [1, 2, 3, 4] and ranked["rank"].dtype.kind == "i"
    row = ranked.set_index("method")
    assert row.loc["finetune", "Final"] == "0.400 [0.350, 0.550]"
    assert not row.loc["scrub", "within budget"] and row.loc["finetune", "within budget"]
    assert row.loc["finetune", "test acc loss [points]"] == pytest.approx(2.0)  # retrained 0.98 - 0.96
    assert report.AUTO_MARK in row.loc["scrub", "notes"] and report.AUTO_MARK not in row.loc["finetune", "notes"]
    assert "slower than retraining" in row.loc["muso", "notes"]
    assert not row.loc["muso", "overlaps best"] and not row.loc["scrub", "overlaps best"]

    text = report.recommendation(setting, ranked, results[setting], auto)
    assert f"{setting}: recommended **finetune+blend** (rank 1)" in text and "within the budget" in text
    assert "Slower than retraining from scratch: muso (1.50 x retrain)" in text
    assert "uses **scrub**" in text
    budget_only = _setting(params, {"slow": (0.6, 0.5, 0.7), "ok": (0.5, 0.45, 0.65)}, {"slow": 0.9, "ok": 0.1})
    text = report.recommendation("s", report.setting_ranking("s", budget_only, {}), budget_only, {})
    assert "recommended **ok** (rank 2)" in text and "Ranked higher but over the time budget: slow." in text

    shown = report.ranking_shown(ranked)  # integers as integers, no 1.000
    assert list(shown["rank"]) == ["1", "2", "3", "4"] and set(shown["within budget"]) == {"yes", "no"}
    assert "<td>1</td>" in shown.to_html(index=False) and "<td>1.000</td>" not in shown.to_html(index=False)


def test_generality_ranks_are_integers_on_the_page(grid, tmp_path):
    from unlearnops import report

    params, setting, results = grid
    results["other"] = _setting(params, {n: (f, f, f) for n, f in zip(results[setting].metrics, (0.1, 0.2, 0.3, 0.4))},
                                {n: 0.1 for n in results[setting].metrics})
    general = report.generality(results)
    assert general[f"rank {setting}"].dtype == "Int64" and general["time rank"].dtype == "Int64"
    page = report.write_html(tmp_path / "index.html", "t", [], {"Generality": general}, {}, {}).read_text()
    assert "<td>1</td>" in page and "<td>1.000</td>" not in page


def test_summary_is_small_and_flat_per_method(grid):
    from unlearnops import report

    _, setting, results = grid
    summary = report.summary(results[setting])
    assert set(summary) == {*results[setting].metrics, "retrain"}
    assert all(set(v) == {"final", "final_low", "final_high", "test_acc", "forget_acc", "time_vs_retrain"} for v in summary.values())
    assert summary["finetune"]["final_low"] == 0.35 and summary["retrain"]["time_vs_retrain"] == 1.0


def test_final_vs_time_names_runs_in_a_legend_not_on_the_points(grid, tmp_path, monkeypatch):
    from unlearnops import report

    _, setting, results = grid
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    report.plot_final_vs_time(results[setting], tmp_path / "f.png", "scrub")
    (ax,) = [a for a in figures[0].axes]
    assert not ax.texts  # no labels on the points: they overlapped where runs take similar time
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:4] == ["1. finetune+blend", f"2. scrub  {report.AUTO_MARK}", "3. finetune", "4. muso"]
    data = report.final_vs_time_data(results[setting])
    assert list(data.columns[:4]) == ["method", "seconds_per_model", "time_vs_retrain", "final"]


def test_relearn_plot_fits_the_page_width_with_horizontal_labels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from unlearnops.report import relearn

    names = [f"method_{i}" for i in range(16)]
    rows = [{"method": m, "S": s, "T": t, "models": 4, "before_mean": 0.9, "before_std": 0.0, "after_mean": 0.95, "after_std": 0.02,
             "retrain_after_mean": 0.6, "retrain_after_std": 0.05} for m in ["retrain", *names] for s, t in (("F1", "F2"), ("F2", "F1"))]
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path, **kw: figures.append(fig))
    relearn.relearn_plot(pd.DataFrame(rows), tmp_path / "r.png")
    fig = figures[0]
    assert fig.get_size_inches()[0] <= 10  # shown at page width, it is not scaled down
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names and all(t.get_rotation() == 0 for t in ax.get_yticklabels())
    plt.close(fig)


def test_relearn_curves_are_plot_data(tmp_path, repo_params):
    from unlearnops.report import relearn

    params = copy.deepcopy(repo_params)
    params["unlearn"]["methods"], params["condense"]["methods"] = ["finetune"], []
    params["unlearn"]["layered"] = []
    (tmp_path / "relearn").mkdir()
    for name in ("retrain", "finetune"):
        entry = {"S": [1], "T": [2], "per_epoch": [0.1, 0.5, 0.7]}
        (tmp_path / "relearn" / f"{name}.json").write_text(json.dumps({"subsets": {"F1": entry}}))
    curves = relearn.relearn_curves(params, tmp_path)
    assert list(curves.columns) == ["method", "S", "T", "epoch", "accuracy"]
    assert list(curves["epoch"]) == [0, 1, 2] * 2 and np.allclose(curves["accuracy"], [0.1, 0.5, 0.7] * 2)
