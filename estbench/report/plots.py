"""The report's figures (matplotlib on the Agg backend, seaborn styling; scikit-posthocs for the
critical-difference diagrams), saved as PNG and SVG.

One colour (and marker) per estimator, fixed for the whole report: the sorted list of every
estimator in the run is mapped onto tab10 (up to 10) or onto as many colours chosen to be as far
apart as possible in CIELAB (``distinct_colours``, Glasbey et al. 2007), so that no two estimators
share a hue's shades.  An oracle (``Estimator.oracle``: exact enumeration, outside the budget) is a
reference, drawn in black (dashed, without a marker) and never in a competitor's colour; the
estimator being ranked (``estbench rank``'s meta.json ``ranked``) is drawn thicker with a black
edge.  Confidence bands are the same Student-t 95% intervals over seeds as in the tables
(``stats.mean_ci``).
"""
from __future__ import annotations

import math
import textwrap
from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scikit_posthocs as sp  # noqa: E402
import seaborn as sns  # noqa: E402

from estbench.analysis.stats import mean_ci  # noqa: E402
from estbench.analysis.tables import elbo_labels, matches, slug  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X"]  # 7: co-prime with the 4 line styles
LINESTYLES = ["-", "--", "-.", ":"]  # 4: with the 7 markers, 28 distinct (marker, line) pairs
#: the reference lines of oracles: black and greys, dashed
ORACLE_COLOURS = [(0.0, 0.0, 0.0), (0.35, 0.35, 0.35), (0.6, 0.6, 0.6)]
ORACLE_LINESTYLES = ["--", (0, (6, 2, 1, 2)), ":"]
#: how much thicker the ranked estimator's lines and markers are drawn
RANKED_SCALE = 2.0
_RC = {"svg.fonttype": "none", "svg.hashsalt": "estbench", "figure.dpi": 100,
       "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5}


def plain(text) -> str:
    """``text`` as matplotlib plain text: task and estimator names carry option strings in which a
    ``$`` (a path, a tag) would otherwise start mathtext -- wrong glyphs, or a parse error that
    aborts the report.  Escaped dollars render as ``$``; applied to every label taken from data
    (rcParams' ``text.parse_math`` cannot be used: the log axes' tick labels are mathtext)."""
    return str(text).replace("$", r"\$")


def to_lab(rgb) -> np.ndarray:
    """sRGB (0-1, any leading shape) to CIELAB (D65)."""
    c = np.asarray(rgb, dtype=float)[..., :3]
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                        [0.0193, 0.1192, 0.9505]]).T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


@lru_cache(maxsize=8)
def distinct_colours(n: int) -> tuple:
    """``n`` colours as far apart as possible (Glasbey et al. 2007): greedily, the sRGB grid colour
    farthest in CIELAB from white, black and every colour chosen so far, among those of lightness
    35-75 and chroma >= 25 (visible on white, apart from the oracles' black and greys)."""
    g = np.linspace(0.0, 1.0, 24)
    rgb = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    lab = to_lab(rgb)
    ok = (lab[:, 0] >= 35) & (lab[:, 0] <= 75) & (np.hypot(lab[:, 1], lab[:, 2]) >= 25)
    rgb, lab = rgb[ok], lab[ok]
    far = np.linalg.norm(lab[:, None] - to_lab(np.array([[1.0, 1, 1], [0, 0, 0]]))[None], axis=-1)
    dist = far.min(axis=1)
    out = []
    for _ in range(n):
        i = int(dist.argmax())
        out.append(tuple(float(x) for x in rgb[i]))
        dist = np.minimum(dist, np.linalg.norm(lab - lab[i], axis=1))
    return tuple(out)


class Style:
    """The fixed estimator -> (colour, marker, line style) mapping of one report, with the oracles
    (reference lines) and the ranked estimator (highlighted) it knows of."""

    def __init__(self, estimators, ranked: str | None = None):
        import estimators as registry

        self.names = sorted(set(estimators))
        self.oracles = [e for e in self.names if registry.is_oracle(e)]
        self.ranked = ranked
        rivals = [e for e in self.names if e not in self.oracles]
        n = max(len(rivals), 1)
        colours = sns.color_palette("tab10", 10) if n <= 10 else distinct_colours(n)
        self.colour = {e: tuple(colours[i]) for i, e in enumerate(rivals)}
        self.marker = {e: MARKERS[i % len(MARKERS)] for i, e in enumerate(rivals)}
        self.linestyle = {e: LINESTYLES[i % len(LINESTYLES)] for i, e in enumerate(rivals)}
        for i, e in enumerate(self.oracles):
            self.colour[e] = ORACLE_COLOURS[i % len(ORACLE_COLOURS)]
            self.marker[e] = ""
            self.linestyle[e] = ORACLE_LINESTYLES[i % len(ORACLE_LINESTYLES)]

    def order(self, names) -> list:
        """``names`` sorted, the oracles' reference lines last."""
        return sorted(names, key=lambda e: (self.is_oracle(e), e))

    def is_oracle(self, est: str) -> bool:
        return est in self.oracles

    def is_ranked(self, est: str) -> bool:
        return matches(est, self.ranked)

    def label(self, est: str) -> str:
        """The legend's text for an estimator: its name, marked when it is an oracle or ranked."""
        if self.is_oracle(est):
            return plain(est) + " (oracle reference)"
        return plain(est) + (" (ranked)" if self.is_ranked(est) else "")

    def kw(self, est: str) -> dict:
        """For markers: colour and marker; the ranked estimator's larger, with a black edge."""
        out = {"color": self.colour[est], "marker": self.marker[est] or "o"}
        if self.is_ranked(est):
            out.update(mec="black", mew=1.6, zorder=5)
        return out

    def line_kw(self, est: str, lw: float = 1.5, ms: float = 4) -> dict:
        """For curves: colour, marker, line style, width and marker size (20+ estimators stay
        apart in print); an oracle's reference line thin and without markers, the ranked
        estimator's RANKED_SCALE times thicker with black-edged markers, above the others."""
        out = {"color": self.colour[est], "marker": self.marker[est] or None,
               "linestyle": self.linestyle[est], "lw": lw, "ms": ms}
        if self.is_oracle(est):
            out.update(lw=lw * 0.9, zorder=4)
        elif self.is_ranked(est):
            out.update(lw=lw * RANKED_SCALE, ms=ms * 1.5, mec="black", mew=1.0, zorder=6)
        return out


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return paths


def _legend(fig, handles_labels: dict, style: Style | None = None, title: str = "estimator",
            extra: list = ()):
    """One legend for the whole figure, outside the axes on the right (oracles last, the oracles
    and the ranked estimator named as such)."""
    if not handles_labels:
        return
    labels = style.order(handles_labels) if style is not None else sorted(handles_labels)
    handles = [handles_labels[k] for k in labels] + [h for h, _ in extra]
    texts = [style.label(k) if style is not None else plain(k) for k in labels] \
        + [t for _, t in extra]
    ncol = 1 if len(texts) <= 18 else 2
    fig.legend(handles, texts, title=title, loc="center left",
               bbox_to_anchor=(1.0, 0.5), ncol=ncol, frameon=False)


def _spans_decades(values, decades: float = 1.5) -> bool:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0])
    return len(v) >= 2 and math.log10(v.max() / v.min()) >= decades


def _band(records: pd.DataFrame, metric: str, x: str = "step", log: bool = False) -> pd.DataFrame:
    """Per (estimator, step): mean and CI of ``metric`` over seeds (on log10 values if ``log``),
    with the x position: the step, or the mean of ``x`` (a metric such as wall_time) there."""
    r = records[records.metric == metric]
    if r.empty:
        return pd.DataFrame(columns=["estimator", "step", "x", "mean", "lo", "hi"])
    wide = r.pivot_table(index=["estimator", "seed", "step"], columns="metric", values="value")
    if x != "step":
        xs = records[records.metric == x].pivot_table(index=["estimator", "seed", "step"],
                                                      values="value")
        wide = wide.join(xs.rename(columns={"value": x}), how="left")
    wide = wide.reset_index()
    rows = []
    for (est, step), df in wide.groupby(["estimator", "step"], sort=True):
        v = df[metric].astype(float).to_numpy()
        if log:
            v = v[v > 0]
            if len(v) == 0:
                continue
            v = np.log10(v)
        m, hw, n = mean_ci(v)
        if n == 0:
            continue
        lo, hi = (m - hw, m + hw) if not math.isnan(hw) else (m, m)
        if log:
            m, lo, hi = 10 ** m, 10 ** lo, 10 ** hi
        xpos = step if x == "step" else float(df[x].mean())
        rows.append({"estimator": est, "step": step, "x": xpos, "mean": m, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


def _curve_panel(ax, band: pd.DataFrame, style: Style, handles: dict, oracle: str = "curve"):
    """Each estimator's mean curve with its band.  An oracle is a reference: its mean curve
    without a band (``oracle="curve"``), or a horizontal line at its last value (``"level"``:
    where its x, a time, is not comparable with the others')."""
    alpha = 0.15 if band.estimator.nunique() <= 10 else 0.08
    for est, b in band.groupby("estimator", sort=True):
        b = b.sort_values("x")
        if style.is_oracle(est):
            kw = style.line_kw(est)
            if oracle == "level":
                line = ax.axhline(float(b["mean"].iloc[-1]), color=kw["color"], lw=kw["lw"],
                                  linestyle=kw["linestyle"], zorder=kw["zorder"])
            else:
                (line,) = ax.plot(b.x, b["mean"], **kw)
            line.set_gid(f"oracle:{est}")
            handles.setdefault(est, line)
            continue
        (line,) = ax.plot(b.x, b["mean"], **style.line_kw(est))
        line.set_gid(f"estimator:{est}")
        ax.fill_between(b.x, b.lo, b.hi, color=style.colour[est], alpha=alpha, lw=0)
        handles.setdefault(est, line)


def _labelled_panel(ax, band: pd.DataFrame, xlabel: str, ylabel: str, title: str) -> bool:
    """Label a panel; say so in it and return False when it has nothing to draw."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if band.empty:
        ax.text(0.5, 0.5, "no measurements", ha="center", va="center", transform=ax.transAxes)
        return False
    return True


#: a variance below this fraction of the task's largest is shown as zero (rounding noise, e.g. an
#: exact estimator's 1e-16): on a log axis it would squash every other estimator into a corner
RELATIVE_ZERO = 1e-9


def numerically_zero(means: pd.Series, rel: float = RELATIVE_ZERO) -> set:
    """Index labels of ``means`` that are <= 0 or below ``rel`` x the largest finite mean."""
    m = means.astype(float)
    top = m[np.isfinite(m)].max() if np.isfinite(m).any() else 0.0
    return set(m.index[(m <= 0) | (m < rel * top)])


def training_curves(records: pd.DataFrame, task: str, style: Style, out_dir: Path) -> list[Path]:
    """The curve of ``evaluate(final=False)`` (the validation ELBO of a model, the exact objective
    of a toy: ``tables.elbo_labels``) vs step and vs wall-clock, and gradient variance vs step
    (log axis), for one task; 2 x 2 panels, the fourth holding the legend.  An oracle is a
    reference: its curve vs steps, a level line vs wall-clock (its time is outside the budget),
    and no variance."""
    r = records[records.task == task]
    var_means = r[r.metric == "variance"].groupby("estimator")["value"].mean()
    zero = sorted(numerically_zero(var_means)) if len(var_means) else []
    elbo_s = _band(r, "elbo")
    elbo_w = _band(r, "elbo", x="wall_time")
    var = _band(r[~r.estimator.isin(zero) & ~r.estimator.isin(style.oracles)], "variance",
                log=True)
    log_wall = not elbo_w.empty and _spans_decades(elbo_w[~elbo_w.estimator.isin(style.oracles)].x,
                                                    1.5)
    if log_wall:
        elbo_w = elbo_w[elbo_w.x > 0]
    curve = elbo_labels(task)[0]
    short = curve.split(" (")[0]
    panels = [(elbo_s, "training step", curve, f"{short} vs steps"),
              (elbo_w, "training wall-clock (s" + (", log)" if log_wall else ")"), curve,
               f"{short} vs wall-clock"),
              (var, "training step", "gradient variance (log scale)",
               "gradient variance along training")]
    if elbo_s.empty and var.empty:
        return []
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.6))
        handles: dict = {}
        for i, (ax, (band, xl, yl, title)) in enumerate(zip(axes.flat, panels)):
            if not _labelled_panel(ax, band, xl, yl, title):
                continue
            _curve_panel(ax, band, style, handles, oracle="level" if i == 1 else "curve")
            if yl.startswith("gradient variance"):
                ax.set_yscale("log")
            if xl.endswith("log)"):
                ax.set_xscale("log")
        not_shown = sorted(set(zero) | (set(r.estimator) & set(style.oracles)))
        if not_shown:
            axes[1][0].set_xlabel(panels[2][1] + "\n" + _note("not shown, variance ~0 or an oracle",
                                                               not_shown))
        legend_ax = axes[1][1]
        legend_ax.axis("off")
        labels = style.order(handles)
        legend_ax.legend([handles[k] for k in labels], [style.label(k) for k in labels],
                         title="estimator", loc="center",
                         ncol=1 if len(labels) <= 12 else 2, frameon=False)
        fig.suptitle(plain(task), fontsize=12)
        fig.tight_layout()
        return _save(fig, out_dir, f"curves_{slug(task)}")


#: the panels of the shared-parameter figure: (metric, axis label, log axis)
SHARED_PANELS = (("grad_error", "gradient error E‖g − ∇‖²", True),
                 ("variance", "variance (trace)", True),
                 ("cosine", "cosine to the reference", False),
                 ("snr", "signal-to-noise ratio", True))


def shared_parameter_curves(records: pd.DataFrame, task: str, style: Style,
                            out_dir: Path) -> list[Path]:
    """A probe's figures at each snapshot of one task (``estbench probe``): gradient error,
    variance, cosine and SNR against the snapshot's training step, every estimator on one axis;
    log axes for the figures spread over decades; an oracle's line is drawn where it is finite
    and not numerically zero."""
    r = records[records.task == task]
    if r.empty:
        return []
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        handles: dict = {}
        for ax, (metric, label, log) in zip(axes.flat, SHARED_PANELS):
            sub = r[r.metric == metric]
            if log:
                means = sub.groupby("estimator")["value"].mean()
                zero = numerically_zero(means[np.isfinite(means)]) | set(
                    means.index[~np.isfinite(means)])
                sub = sub[~sub.estimator.isin(zero)]
            band = _band(sub, metric, log=log)
            if not _labelled_panel(ax, band, "training step of the snapshot (the driver's)", label,
                                   label):
                continue
            _curve_panel(ax, band, style, handles)
            if log:
                ax.set_yscale("log")
        labels = style.order(handles)
        fig.legend([handles[k] for k in labels], [style.label(k) for k in labels],
                   title="estimator", loc="center left", bbox_to_anchor=(1.0, 0.5),
                   ncol=1 if len(labels) <= 16 else 2, frameon=False)
        fig.suptitle(plain(task) + ": at shared parameters", fontsize=12)
        fig.tight_layout()
        return _save(fig, out_dir, f"shared_{slug(task)}")


def _note(title: str, names, width: int = 60) -> str:
    """A wrapped 'title: a, b, c' for under an axis label."""
    import textwrap
    return plain(textwrap.fill(f"({title}: {', '.join(sorted(names))})", width))


def _grid(n: int, ncols: int = 3):
    ncols = max(1, min(ncols, n))
    return int(math.ceil(n / ncols)), ncols


def bias_variance(pc: pd.DataFrame, style: Style, out_dir: Path) -> list[Path]:
    """Per task: mean measured bias vs mean variance (each averaged over checkpoints, then seeds),
    log axes, with CI whiskers over seeds, and each estimator's noise floor: the bias Monte Carlo
    noise alone produces (``bias_noise``, averaged alike), a black bar at the same variance joined
    to its marker.  An estimator without bias sits on its floor; a bias shows as a marker above
    it.  Oracles (no variance, outside the budget) and estimators whose variance or bias is ~0 are
    named under the axis instead."""
    from estbench.analysis.stats import ci_frame
    d = pc.dropna(subset=["bias", "variance"])
    if "bias_noise" not in d:
        d = d.assign(bias_noise=np.nan)
    tasks = sorted(d.task.unique())
    if not tasks:
        return []
    nrows, ncols = _grid(len(tasks))
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.7 * nrows), squeeze=False)
        handles: dict = {}
        floor_handle = None
        for ax, task in zip(axes.flat, tasks):
            s = ci_frame(d[d.task == task], ["bias", "variance", "bias_noise"], ["estimator"])
            zero = numerically_zero(s.set_index("estimator").variance_mean)
            dropped = []
            for _, row in s.iterrows():
                est = row.estimator
                b, v, nf = row.bias_mean, row.variance_mean, row.bias_noise_mean
                if not (b > 0 and v > 0) or est in zero or style.is_oracle(est):
                    dropped.append(est)
                    continue
                if nf > 0:  # the noise floor: a black bar at the same variance, joined to b
                    ax.plot([v, v], [min(b, nf), max(b, nf)], color="0.35", lw=0.8, ls=":",
                            zorder=1)
                    (floor,) = ax.plot([v], [nf], ls="none", marker="_", ms=16, mew=2.2,
                                       color="black", zorder=3, gid=f"noise_floor:{est}")
                    floor_handle = floor_handle or floor
                xerr = None if math.isnan(row.variance_ci) else [[min(row.variance_ci, v * 0.999)],
                                                                [row.variance_ci]]
                yerr = None if math.isnan(row.bias_ci) else [[min(row.bias_ci, b * 0.999)],
                                                            [row.bias_ci]]
                kw = {"mec": "black", "mew": 0.5, "zorder": 4, **style.kw(est)}
                h = ax.errorbar([v], [b], xerr=xerr, yerr=yerr, ls="none",
                                ms=11 if style.is_ranked(est) else 7, elinewidth=1, capsize=2,
                                **kw)
                h.lines[0].set_gid(f"bias:{est}")
                handles.setdefault(est, h)
            ax.set_xscale("log")
            ax.set_yscale("log")
            xl = "gradient variance (log)"
            if dropped:
                xl += "\n" + _note("not shown, variance or bias ~0 or an oracle", dropped)
            ax.set_xlabel(xl)
            ax.set_ylabel("measured bias ‖mean of M − ∇‖ (log)")
            ax.set_title(plain(task))
        for ax in axes.flat[len(tasks):]:
            ax.set_visible(False)
        fig.tight_layout()
        _legend(fig, handles, style, extra=[(floor_handle, "noise floor (Monte Carlo noise alone)")]
                if floor_handle is not None else [])
        return _save(fig, out_dir, "bias_variance")


def step_time_bars(pc: pd.DataFrame, style: Style, out_dir: Path) -> list[Path]:
    """Per task: horizontal bars of the time per training step (ms) with CI whiskers."""
    from estbench.analysis.stats import ci_frame
    d = pc.dropna(subset=["step_ms"])
    tasks = sorted(d.task.unique())
    if not tasks:
        return []
    nrows, ncols = _grid(len(tasks))
    n_est = max(d.groupby("task").estimator.nunique())
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, (0.26 * n_est + 1.2) * nrows),
                                 squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            s = ci_frame(d[d.task == task], ["step_ms"], ["estimator"])
            s = s.assign(oracle=[style.is_oracle(e) for e in s.estimator]).sort_values(
                ["oracle", "step_ms_mean"])  # an oracle's reference bar last
            y = np.arange(len(s))
            ci = s.step_ms_ci.fillna(0).to_numpy()
            err = [np.minimum(ci, s.step_ms_mean.to_numpy()), ci]  # no whisker below zero
            bars = ax.barh(y, s.step_ms_mean, xerr=err,
                           color=[style.colour[e] for e in s.estimator],
                           error_kw={"elinewidth": 0.8, "capsize": 2})
            for bar, est in zip(bars, s.estimator):
                if style.is_oracle(est):  # a reference, not a competitor
                    bar.set(facecolor="white", edgecolor=style.colour[est], hatch="///", lw=0.8)
                elif style.is_ranked(est):
                    bar.set(edgecolor="black", lw=2.0)
            ax.set_yticks(y, [style.label(e) for e in s.estimator], fontsize=8)
            for tick, est in zip(ax.get_yticklabels(), s.estimator):
                if style.is_ranked(est):
                    tick.set_fontweight("bold")
            ax.invert_yaxis()
            if _spans_decades(s.step_ms_mean, 1.0):  # one slow estimator would flatten the rest
                ax.set_xscale("log")
                ax.set_xlabel("time per step (ms, log)")
            else:
                ax.set_xlabel("time per step (ms)")
            ax.set_title(plain(task))
        for ax in axes.flat[len(tasks):]:
            ax.set_visible(False)
        fig.tight_layout()
        return _save(fig, out_dir, "step_time")


def rank_heatmap(ranks: pd.DataFrame, relative: pd.DataFrame, out_dir: Path,
                 title: str, ranked: str | None = None) -> list[Path]:
    """Estimators x tasks of leaderboard ranks (1 = best; blank = did not run).

    Coloured by relative rank (0 = best, 1 = last of the task's field) so that a rank in a small
    field reads like the same position in a large one; the last column is the overall mean
    relative rank, the order of the rows.  The title is wrapped to the figure's width above
    everything (the colour bar's label included); the ``ranked`` estimator's row is named in bold.
    """
    if ranks.empty:
        return []
    tasks = [c for c in relative.columns if c != "overall"]
    annot = ranks[tasks].map(lambda v: "" if pd.isna(v) else f"{int(v)}")
    annot["overall"] = relative["overall"].map(lambda v: f"{v:.2f}")
    n_est, n_cols = relative.shape
    with plt.rc_context(_RC):
        width = max(4.5, 1.1 * n_cols + 3)
        fig, ax = plt.subplots(figsize=(width, max(2.5, 0.32 * n_est + 1.6)))
        shown = relative.astype(float)
        shown.index = [plain(e) + (" (ranked)" if matches(e, ranked) else "") for e in shown.index]
        shown.columns = [plain(t) for t in shown.columns]
        sns.heatmap(shown, annot=annot.to_numpy(), fmt="", cmap="viridis_r",
                    ax=ax, vmin=0, vmax=1,
                    cbar_kws={"label": "relative rank\n(0 = best, 1 = last)"}, linewidths=0.5,
                    linecolor="white", annot_kws={"fontsize": 8})
        ax.set_xlabel("task")
        ax.set_ylabel("estimator")
        for tick, est in zip(ax.get_yticklabels(), relative.index):
            if matches(est, ranked):
                tick.set_fontweight("bold")
        # the title above the whole figure, colour bar included, wrapped to its width: as the
        # axes' title it ran past the axes over the colour bar's label
        fig.suptitle(textwrap.fill(title, max(30, int(width * 10))), fontsize=11)
        ax.set_xticklabels(ax.get_xticklabels(), rotation=30, ha="right")
        ax.set_facecolor("#eeeeee")
        fig.tight_layout()
        return _save(fig, out_dir, "rank_heatmap")


def critical_difference(ranks: pd.DataFrame, pairs: pd.DataFrame, criterion: str, style: Style,
                        out_dir: Path, title: str) -> list[Path]:
    """Critical-difference diagrams (Demšar 2006, sec. 3.2.2) of one criterion, one panel per
    tested comparison set: the estimators' mean ranks over the set's tasks (1 = best, on the
    left), a bar of the Nemenyi critical difference CD, and crossbars joining estimators the
    Nemenyi test does not tell apart -- all of them where the Friedman test did not reject.
    ``ranks`` and ``pairs`` are leaderboard.friedman_tests' frames; drawn by scikit-posthocs'
    critical_difference_diagram.
    """
    r = ranks[(ranks.criterion == criterion) & (ranks.status == "tested")]
    sets = list(dict.fromkeys(r.comparison))
    if not sets:
        return []
    sizes = [int((r.comparison == c).sum()) for c in sets]
    heights = [0.24 * k + 1.6 for k in sizes]
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(len(sets), 1, figsize=(10, sum(heights)), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})
        for ax, comparison in zip(axes[:, 0], sets):
            d = r[r.comparison == comparison]
            names = [plain(e) for e in d.estimator]
            mean_rank = pd.Series(d.mean_rank.to_numpy(), index=names)
            first = d.iloc[0]
            sig = pd.DataFrame(1.0, index=names, columns=names)
            if first.conclusive:  # post-hoc verdicts only after the omnibus test rejects
                pr = pairs[(pairs.criterion == criterion) & (pairs.comparison == comparison)]
                for a, b, p in zip(pr.estimator_a, pr.estimator_b, pr.p_nemenyi):
                    sig.loc[plain(a), plain(b)] = sig.loc[plain(b), plain(a)] = p
            drawn = sp.critical_difference_diagram(
                mean_rank, sig, ax=ax, label_props={"fontsize": 8},
                color_palette={plain(e): style.colour[e] for e in d.estimator},
                label_fmt_left="{label} ({rank:.1f})", label_fmt_right="({rank:.1f}) {label}")
            ranked = {plain(e) for e in d.estimator if style.is_ranked(e)}
            for label in drawn["labels"]:  # the palette's light shades are unreadable as text
                label.set_color("black")
                if any(label.get_text().startswith(f"{e} (") or label.get_text().endswith(f") {e}")
                       for e in ranked):
                    label.set_fontweight("bold")  # the estimator being ranked
            # the CD scale bar, drawn here one row above the rank axis: the library's sits half a
            # row above it, on its tick labels; clipped to the scale where CD exceeds it
            k = int(first.estimators)
            ax.set_xlim(0.75, k + 0.25)  # the ranks 1 and k keep their whole markers
            ax.set_ylim(top=1.6)
            cd = float(first.cd)
            ax.plot([1, 1 + min(cd, k - 1)], [1.1, 1.1], color="black", lw=2, clip_on=False)
            ax.text(1 + min(cd, k - 1) / 2, 1.25, "CD" if cd <= k - 1 else "CD (beyond the scale)",
                    ha="center", va="bottom", fontsize=8)
            verdict = (f"p = {first.p:.2g} < 0.05: mean ranks differ" if first.conclusive else
                       f"p = {first.p:.2g}: no difference shown")
            ax.set_title(f"{plain(comparison)}: {int(first.tasks)} tasks, {int(first.estimators)} "
                         f"estimators; Friedman χ² = {first.chi2:.1f}, {verdict}; "
                         f"CD = {first.cd:.2f}", fontsize=9, pad=22)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        return _save(fig, out_dir, f"critical_difference_{slug(criterion)}")


def performance_profiles(profiles: pd.DataFrame, style: Style, out_dir: Path,
                         titles: dict) -> list[Path]:
    """Performance profiles (Dolan & Moré 2002), one panel per criterion: rho_s(tau), the fraction
    of tasks on which estimator s is within a factor tau of the best, against log2(tau); a curve's
    height at 0 is the share of tasks it is best on, its final height the share it ran on.
    ``profiles`` is leaderboard.performance_profiles' frame; ``titles`` {criterion: panel title}.
    """
    crits = list(dict.fromkeys(profiles.criterion))
    if not crits:
        return []
    nrows, ncols = _grid(len(crits), 2)
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.2 * nrows), squeeze=False)
        handles: dict = {}
        for ax, crit in zip(axes.flat, crits):
            p = profiles[profiles.criterion == crit]
            right = max(1.0, 1.05 * float(p.log2_tau.max()))
            for est, e in p.groupby("estimator", sort=True):
                x = np.append(e.log2_tau.to_numpy(), right)  # the last step holds to the edge
                y = np.append(e.rho.to_numpy(), e.rho.iloc[-1])
                (line,) = ax.plot(x, y, drawstyle="steps-post", markevery=list(
                    range(len(x) - 1)), **style.line_kw(est, lw=1.3))
                handles.setdefault(est, line)
            ax.set_xlim(0, right)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("log2(τ): within a factor τ of the task's best")
            ax.set_ylabel(f"fraction of the {int(p.tasks.iloc[0])} tasks")
            ax.set_title(plain(titles.get(crit, crit)))
        for ax in axes.flat[len(crits):]:
            ax.set_visible(False)
        fig.tight_layout()
        _legend(fig, handles, style)
        return _save(fig, out_dir, "performance_profiles")
