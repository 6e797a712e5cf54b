"""What a report's first views show (issue 19, "The first things a user sees"): the bias net of
its noise with the bias test's verdict, oracles as references, the curve and the final figure
named for what they are, one look per estimator, the ranked estimator highlighted and a heatmap
whose title clears its colour bar.  End to end: a tiny real run, reported through the CLI, the
figures caught as the report saves them."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scipy")
pytest.importorskip("seaborn")

from matplotlib.text import Text  # noqa: E402

from estbench.core import metrics  # noqa: E402
from estbench.engine import store
from estbench.cli.commands import main  # noqa: E402
from estbench.report import plots  # noqa: E402

TASKS = ["toy_binary", "toy_categorical"]
RANKED = "disarm"


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    """A tiny run of five estimators (exact, the oracle, among them), marked as ``estbench rank``
    marks the run of the estimator it ranks, and its report, with every figure the report saves."""
    run = tmp_path_factory.mktemp("views") / "run"
    assert main(["run", "--tasks", ",".join(TASKS), "--estimators",
                 "rloo,reinforce,disarm,exact,gumbel_softmax", "--steps", "20", "--checkpoints",
                 "3", "--measure-samples", "16", "--seeds", "0,1", "--quiet",
                 "--out", str(run)]) == 0
    meta_path = run / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["ranked"] = RANKED  # what estbench rank writes
    meta_path.write_text(json.dumps(meta))
    figs = {}
    save = plots._save

    def keep(fig, out_dir, name):
        figs[name] = fig
        return save(fig, out_dir, name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", keep)
        assert main(["report", str(run)]) == 0
    out = run / "report"
    records, _ = store.load(run)
    return SimpleNamespace(run=run, out=out, md=(out / "report.md").read_text(), figs=figs,
                           records=records,
                           csv={t: pd.read_csv(out / "tables" / f"{t}.csv") for t in TASKS})


def _md_table(md: str, task: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header and the rows (by estimator) of a task's table in report.md."""
    section = md.split(f"### {task}\n", 1)[1]
    lines = [ln for ln in section.split("\n\n", 1)[0].splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    rows = {re.match(r"`([^`]+)`", r[0]).group(1): r for r in split[2:]}
    return split[0], rows


def _texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _lines(fig, prefix: str) -> dict:
    return {ln.get_gid().split(":", 1)[1]: ln for ax in fig.axes for ln in ax.get_lines()
            if (ln.get_gid() or "").startswith(prefix)}


def _cell_means(records: pd.DataFrame, task: str, metric: str) -> pd.Series:
    """Per estimator: the metric averaged over each cell's checkpoints, then over seeds."""
    r = records[(records.task == task) & (records.metric == metric)]
    return r.groupby(["estimator", "seed"])["value"].mean().groupby("estimator").mean()


# ---- 1. the bias column --------------------------------------------------------------------------
@pytest.mark.slow
def test_bias_column_is_net_of_its_noise_with_the_verdict_and_never_best(rep):
    """The per-task tables show the bias beyond its Monte Carlo noise floor (not the raw bias, of
    which an unbiased estimator's is its noise floor), the bias test's verdict beside it, and
    never mark a value of that column best."""
    assert "net_bias" in metrics.REPORT_TABLE and "bias" not in metrics.REPORT_TABLE
    for task in TASKS:
        csv = rep.csv[task].set_index("estimator")
        assert "bias_mean" not in csv and not csv["net_bias_best"].any()
        r = rep.records[rep.records.task == task]
        at = r[r.metric.isin(["bias", "bias_noise"])].pivot_table(
            index=["estimator", "seed", "step"], columns="metric", values="value")
        net = ((at["bias"] ** 2 - at["bias_noise"] ** 2).clip(lower=0) ** 0.5)  # at each checkpoint
        expected = net.groupby(level=["estimator", "seed"]).mean().groupby(level="estimator").mean()
        for est, v in expected.items():
            assert csv.loc[est, "net_bias_mean"] == pytest.approx(v, rel=1e-9, abs=1e-15), est
        # the biased relaxation is told apart by the verdict, the unbiased ones are not
        assert csv.loc["gumbel_softmax", "bias_verdict"] == "biased"
        assert csv.loc["rloo", "bias_verdict"] == "not found biased"
        header, rows = _md_table(rep.md, task)
        col = header.index("bias beyond noise")
        test = header.index("bias test")
        assert rows["gumbel_softmax"][test].startswith("biased (")
        assert rows["rloo"][test].startswith("not found biased")
        assert not any("**" in r[col] for r in rows.values())  # never bold
    assert "never marked best" in rep.md


def test_bias_variance_draws_each_estimators_noise_floor_as_its_caption_says(rep):
    """bias_variance.png draws, for every estimator it shows, its noise floor (the mean
    bias_noise) at its variance; the caption's claim holds on the run: the estimators the bias
    test does not find biased sit near their floor, the biased one well above it."""
    fig = rep.figs["bias_variance"]
    floors, biases = _lines(fig, "noise_floor:"), _lines(fig, "bias:")
    shown = {"rloo", "reinforce", "disarm", "gumbel_softmax"}
    assert set(floors) == set(biases) == shown
    for ax, task in zip(fig.axes, TASKS):
        noise = _cell_means(rep.records, task, "bias_noise")
        bias = _cell_means(rep.records, task, "bias")
        verdict = rep.csv[task].set_index("estimator")["bias_verdict"]
        for ln in ax.get_lines():
            gid = ln.get_gid() or ""
            if gid.startswith("noise_floor:"):
                est = gid.split(":", 1)[1]
                assert ln.get_ydata()[0] == pytest.approx(noise[est], rel=1e-9)
                ratio = bias[est] / noise[est]
                assert ratio > 2 if verdict[est] == "biased" else ratio < 2, (task, est, ratio)
    assert any("noise floor" in t.get_text() for t in _texts(fig))  # in the legend
    caption = rep.md.split("## Bias vs variance", 1)[1].split("\n## ", 1)[0]
    assert "noise floor" in caption and "sits on its floor" in caption


# ---- 2. oracles ----------------------------------------------------------------------------------
def test_the_oracle_is_a_reference_row_and_line_never_a_competitor(rep):
    for task in TASKS:
        csv = rep.csv[task]
        exact = csv[csv.estimator == "exact"].iloc[0]
        assert bool(exact.oracle) and csv.estimator.iloc[-1] == "exact"  # the last row
        assert not any(bool(exact[c]) for c in csv.columns if c.endswith("_best"))
        # its exact final figure is the highest, yet a competitor's is marked best
        assert exact.final_elbo_mean == csv.final_elbo_mean.max()
        assert csv[csv.estimator != "exact"].final_elbo_best.any()
        header, rows = _md_table(rep.md, task)
        assert "reference: oracle, outside the budget" in rows["exact"][0]
        assert not any("**" in c for c in rows["exact"])
        fig = rep.figs[f"curves_{task}"]
        oracle = [ln for ax in fig.axes for ln in ax.get_lines()
                  if ln.get_gid() == "oracle:exact"]
        assert len(oracle) == 2  # vs steps and vs wall-clock
        for ln in oracle:
            assert ln.get_color() in ((0.0, 0.0, 0.0), "black", "k") and ln.get_linestyle() == "--"
            assert ln.get_marker() in (None, "None", "")
        assert "exact (oracle reference)" in {t.get_text() for t in _texts(fig)}
    assert "excluded from every ranking" in rep.md
    tex = (rep.out / "tables" / "toy_binary.tex").read_text()
    assert r"\texttt{exact} (reference" in tex


# ---- 3. what the curve and the final figure are --------------------------------------------------
def test_curve_and_final_figure_are_named_for_what_they_are(rep):
    assert metrics.get("elbo").label == "validation ELBO (during training)"
    assert metrics.get("final_elbo").title == "final ELBO (test)"
    from estbench.analysis.tables import elbo_labels

    assert elbo_labels("binary_vae") == ("validation ELBO (during training)", "final ELBO (test)")
    assert elbo_labels("toy_binary [steps=30, n=4]")[1] == "final E_q[f] (exact)"
    for task in TASKS:
        fig = rep.figs[f"curves_{task}"]
        labels = [ax.get_ylabel() for ax in fig.axes[:2]] + [ax.get_title() for ax in fig.axes[:2]]
        assert all("exact objective E_q[f]" in s for s in labels), labels
        assert not any("held-out" in t.get_text() for t in _texts(fig))
        header, _ = _md_table(rep.md, task)
        assert header[1] == "final E_q[f] (exact)"
        # the toys' curve ends at the final figure, and the report says so with both numbers
        r = rep.records[rep.records.task == task]
        last = r[r.metric == "elbo"].sort_values("step").groupby(["estimator", "seed"]).value.last()
        final = r[r.metric == "final_elbo"].groupby(["estimator", "seed"]).value.last()
        assert np.allclose(last.sort_index(), final.sort_index())
        note = rep.md.split(f"### {task}\n", 1)[1].split("![", 1)[0]
        assert "the curve's last point is the final figure" in note
        assert f"the final figure is {final.mean():.5g}" in note
    assert "held-out ELBO" not in rep.md.split("## Results per task", 1)[1]


def test_a_models_curve_and_final_figure_are_validation_and_test():
    """A model's curve is its validation ELBO and its final figure the test ELBO: the report says
    why the curve's last point differs from the final figure, with both numbers."""
    from estbench.report import render

    rows = []
    for seed, (last, final) in enumerate([(-201.5, -200.2), (-201.1, -199.8)]):
        base = {"task": "binary_vae", "estimator": "rloo", "seed": seed, "device": "cpu",
                "n_samples": 4, "steps": 10}
        rows += [{**base, "step": 0, "metric": "elbo", "value": -540.0},
                 {**base, "step": 10, "metric": "elbo", "value": last},
                 {**base, "step": 10, "metric": "final_elbo", "value": final}]
    note = render._curve_note(pd.DataFrame(rows), "binary_vae")
    assert "validation ELBO" in note and "test ELBO" in note and "not by training" in note
    assert "The curves end at -201.3 and the final figure is -200 " in note
    assert "a gap of +1.3." in note


# ---- 4. one look per estimator, the ranked one highlighted, a legible heatmap --------------------
def _lab(rgb) -> np.ndarray:
    """sRGB (0-1) to CIELAB (D65), written out here rather than taken from the code under test."""
    c = np.asarray(rgb, dtype=float)[:3]
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    x, y, z = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                        [0.0193, 0.1192, 0.9505]]) @ c / np.array([0.95047, 1.0, 1.08883])
    f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in (x, y, z)]
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _delta_e(a, b) -> float:
    return float(np.linalg.norm(_lab(a) - _lab(b)))


def test_no_two_estimators_share_a_colour_whatever_the_size_of_the_report():
    """Every report size from 2 to every registered estimator: the competitors' colours are at
    least 20 CIELAB units apart (tab20's two shades of one hue, 16.6 apart from 11 estimators on,
    and 31 evenly spaced hues of one lightness, 6.6 apart, were not), and an oracle is black,
    apart from all of them."""
    import estimators

    names = estimators.available()
    for n in range(2, len(names) + 1):
        st = plots.Style(names[:n])
        oracles = [e for e in st.names if getattr(st, "is_oracle", lambda e: False)(e)]
        rivals = [e for e in st.names if e not in oracles]
        gaps = [_delta_e(st.colour[a], st.colour[b]) for i, a in enumerate(rivals)
                for b in rivals[i + 1:]]
        assert not gaps or min(gaps) >= 20, (n, min(gaps))
        for o in oracles:
            assert tuple(st.colour[o]) == (0.0, 0.0, 0.0)
            assert min(_delta_e(st.colour[o], st.colour[e]) for e in rivals) >= 20
    assert "exact" in names and plots.Style(names).oracles == ["exact"]


def test_the_ranked_estimator_is_highlighted_in_every_view(rep):
    assert f"This run ranks {RANKED}" in rep.md
    for task in TASKS:
        _, rows = _md_table(rep.md, task)
        assert "ranked" in rows[RANKED][0]
        assert not any("ranked" in r[0].replace("not ranked", "") for e, r in rows.items()
                       if e != RANKED)
        fig = rep.figs[f"curves_{task}"]
        lines = _lines(fig, "estimator:")
        others = max(ln.get_linewidth() for e, ln in lines.items() if e != RANKED)
        assert lines[RANKED].get_linewidth() >= 1.5 * others
        assert lines[RANKED].get_markeredgecolor() in ("black", "k", (0.0, 0.0, 0.0, 1.0))
        assert f"{RANKED} (ranked)" in {t.get_text() for t in _texts(fig)}
    for name in ("bias_variance", "step_time", "rank_heatmap", "performance_profiles"):
        marked = [t for t in _texts(rep.figs[name])
                  if t.get_text().startswith(f"{RANKED} (ranked)")]
        assert marked, name
    for name in ("step_time", "rank_heatmap"):
        assert all(t.get_fontweight() == "bold" for t in _texts(rep.figs[name])
                   if t.get_text() == f"{RANKED} (ranked)"), name
    assert r"\texttt{disarm} (ranked)" in (rep.out / "tables" / "toy_binary.tex").read_text()


def test_the_heatmap_title_clears_the_colour_bar_label(rep):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = rep.figs["rank_heatmap"]
    renderer = FigureCanvasAgg(fig).get_renderer()  # (the report closed it: a canvas again)
    fig.draw(renderer)
    texts = _texts(fig)
    title = [t for t in texts if t.get_text().replace("\n", " ").startswith("rank by final ELBO")]
    cbar = [t for t in texts if t.get_text().startswith("relative rank")]
    assert len(title) == 1 and len(cbar) == 1
    a, b = (t.get_window_extent(renderer) for t in (title[0], cbar[0]))
    assert not a.overlaps(b), (a, b)
    # nor any other text of the figure (tick labels, axis labels)
    for t in texts:
        if t is not title[0]:
            assert not a.overlaps(t.get_window_extent(renderer)), t.get_text()
