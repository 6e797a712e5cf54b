"""Assemble a run's report: tables, leaderboard, figures, report.md and a self-contained report.html.

The document is built once as a list of small blocks (heading, paragraph, table, image, ...) and
rendered twice, to Markdown and to HTML, so both say exactly the same thing and no Markdown parser
is needed.  Everything is derived from the run's tidy records; re-running overwrites the report.
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from estbench.engine import measure as ms
from estbench.analysis import compare, figures, quantities
from estbench.analysis import published as pubmod
from estbench.engine import store
from estbench.analysis import leaderboard as lb
from estbench.report import plots
from estbench.analysis import tables as tb
from estbench.core.records import CELL_KEYS



# ---- a tiny document model ----------------------------------------------------------------------
# inline items: str (plain text) | ("code", s) | ("b", s) | ("link", text, href)
_MD_SPECIAL = re.compile(r"([\\`*<|])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|\[(?=[^\]]*\]\()")


def _md_text(s: str) -> str:
    """Escape what Markdown would interpret: backslash, backtick, *, <, | (tables), an underscore
    not inside a word, and a [ that would open a link."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), s)


def _md_code(s: str) -> str:
    return f"``{s}``" if "`" in s else f"`{s}`"


def _inline_md(items) -> str:
    out = []
    for it in items if isinstance(items, list) else [items]:
        if isinstance(it, str):
            out.append(_md_text(it))
        elif it[0] == "code":
            out.append(_md_code(it[1]))
        elif it[0] == "b":
            out.append(f"**{_md_text(it[1])}**")
        elif it[0] == "link":
            out.append(f"[{_md_text(it[1])}]({it[2]})")
    return "".join(out)


def _inline_html(items) -> str:
    out = []
    for it in items if isinstance(items, list) else [items]:
        if isinstance(it, str):
            out.append(html.escape(it))
        elif it[0] == "code":
            out.append(f"<code>{html.escape(it[1])}</code>")
        elif it[0] == "b":
            out.append(f"<strong>{html.escape(it[1])}</strong>")
        elif it[0] == "link":
            out.append(f'<a href="{html.escape(it[2])}">{html.escape(it[1])}</a>')
    return "".join(out)


@dataclass
class H:
    level: int
    text: str

    def md(self, ctx):
        return "#" * self.level + " " + self.text

    def html(self, ctx):
        ident = f' id="{anchor(self.text)}"' if self.level == 2 else ""
        return f"<h{self.level}{ident}>{html.escape(self.text)}</h{self.level}>"


def anchor(text: str) -> str:
    """A heading's anchor as GitHub's markdown makes it (lower case, spaces to hyphens, other
    punctuation dropped), used for the HTML ids too so that one link works in both."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@dataclass
class TOC:
    """Links to the document's second-level headings (filled in when the document is rendered)."""

    def md(self, ctx):
        return "\n".join(f"- [{_md_text(h)}](#{anchor(h)})" for h in ctx.get("headings", []))

    def html(self, ctx):
        items = "".join(f'<li><a href="#{anchor(h)}">{html.escape(h)}</a></li>'
                        for h in ctx.get("headings", []))
        return f'<nav class="toc"><ul>{items}</ul></nav>'


@dataclass
class P:
    items: list

    def md(self, ctx):
        return _inline_md(self.items)

    def html(self, ctx):
        return f"<p>{_inline_html(self.items)}</p>"


@dataclass
class UL:
    rows: list  # of inline lists

    def md(self, ctx):
        return "\n".join("- " + _inline_md(r) for r in self.rows)

    def html(self, ctx):
        return "<ul>\n" + "\n".join(f"<li>{_inline_html(r)}</li>" for r in self.rows) + "\n</ul>"


@dataclass
class Table:
    header: list[str]
    rows: list  # of [(text, bold)]
    code_first: bool = True  # render the first column as code (estimator names)
    align: str = ""          # per column 'l' / 'r'; default first left, others right
    #: per row, plain text after the first cell ('reference (oracle ...)', '◀ ranked'), or None
    notes: list | None = None

    def _align(self):
        return self.align or "l" + "r" * (len(self.header) - 1)

    def _note(self, i: int) -> str:
        return (self.notes[i] or "") if self.notes and i < len(self.notes) else ""

    def md(self, ctx):
        def cell(text, bold, first):
            if first and self.code_first:
                s = _md_code(text)
            else:
                s = _md_text(text)
            return f"**{s}**" if bold and text not in ("", "-") else s
        lines = ["| " + " | ".join(_md_text(h) for h in self.header) + " |",
                 "|" + "|".join(":---" if a == "l" else "---:" for a in self._align()) + "|"]
        for k, row in enumerate(self.rows):
            cells = [cell(t, b, i == 0) for i, (t, b) in enumerate(row)]
            if self._note(k):
                cells[0] += " " + _md_text(f"({self._note(k)})")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def html(self, ctx):
        al = self._align()
        out = ["<table>", "<thead><tr>" + "".join(
            f'<th class="{"l" if a == "l" else "r"}">{html.escape(h)}</th>'
            for h, a in zip(self.header, al)) + "</tr></thead>", "<tbody>"]
        for k, row in enumerate(self.rows):
            cells = []
            for i, ((text, bold), a) in enumerate(zip(row, al)):
                s = html.escape(text)
                if i == 0 and self.code_first:
                    s = f"<code>{s}</code>"
                if i == 0 and self._note(k):
                    s += f" <small>({html.escape(self._note(k))})</small>"
                if bold and text not in ("", "-"):
                    s = f"<strong>{s}</strong>"
                cells.append(f'<td class="{"l" if a == "l" else "r"}">{s}</td>')
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody></table>")
        # wide tables (a column per task) scroll inside their box; the estimator column stays
        return '<div class="scroll">' + "\n".join(out) + "</div>"


@dataclass
class Img:
    path: Path  # the PNG, under the report folder
    alt: str

    def md(self, ctx):
        return f"![{_md_text(self.alt)}]({self.path.relative_to(ctx['root']).as_posix()})"

    def html(self, ctx):
        data = base64.b64encode(self.path.read_bytes()).decode("ascii")
        return (f'<figure><img alt="{html.escape(self.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(self.alt)}</figcaption></figure>")


@dataclass
class Pre:
    text: str

    def md(self, ctx):
        return "```\n" + self.text.rstrip("\n") + "\n```"

    def html(self, ctx):
        return f"<pre>{html.escape(self.text)}</pre>"


@dataclass
class Rationale:
    tokens: list
    mask: list
    caption: str

    def md(self, ctx):
        words = [f"**{_md_text(t)}**" if m else _md_text(t) for t, m in zip(self.tokens, self.mask)]
        return f"> {' '.join(words)}  \n> <sub>{_md_text(self.caption)}</sub>"

    def html(self, ctx):
        words = [f"<mark>{html.escape(t)}</mark>" if m else html.escape(t)
                 for t, m in zip(self.tokens, self.mask)]
        return (f'<blockquote class="rationale">{" ".join(words)}<br>'
                f"<small>{html.escape(self.caption)}</small></blockquote>")


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks):
        self.blocks.extend(blocks)

    def _ctx(self, root: Path) -> dict:
        return {"root": root,
                "headings": [b.text for b in self.blocks if isinstance(b, H) and b.level == 2]}

    def markdown(self, root: Path) -> str:
        ctx = self._ctx(root)
        return "# " + self.title + "\n\n" + "\n\n".join(b.md(ctx) for b in self.blocks) + "\n"

    def html(self, root: Path) -> str:
        ctx = self._ctx(root)
        body = "\n".join(b.html(ctx) for b in self.blocks)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(self.title)}</h1>\n{body}\n</body>\n</html>\n"
        )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
th,td{border-bottom:1px solid #ddd;padding:0.25em 0.6em}th{border-bottom:2px solid #888}
td.r,th.r{text-align:right}td.l,th.l{text-align:left}
tbody tr:nth-child(even){background:#f7f7f7}
figure{margin:1em 0}figure img{max-width:100%}figcaption{font-size:0.85em;color:#555}
code{font-size:0.92em}pre{background:#f4f4f4;padding:0.6em;overflow-x:auto}
blockquote.rationale{border-left:3px solid #bbb;margin:0.6em 0;padding:0.2em 0.8em}
mark{background:#ffe066;padding:0 0.1em}
div.scroll{overflow-x:auto;max-width:100%}
div.scroll td:first-child,div.scroll th:first-child{position:sticky;left:0;background:#fff}
nav.toc{font-size:0.92em}nav.toc ul{columns:2}
"""


# ---- content ------------------------------------------------------------------------------------
def _mixed_timing(cells) -> dict:
    """{task: what differs} for the tasks whose finished cells were timed in more than one
    environment (compare.ENV_FIELDS: CPU, CUDA device, threads, parallel jobs, huge pages)."""
    by_task: dict = {}
    for (task, *_), envs in compare.timing_envs(cells).items():
        by_task.setdefault(task, []).extend(envs)
    out = {}
    for task, envs in by_task.items():
        if any(e is None for e in envs):
            if not all(e is None for e in envs):
                out[task] = compare.NOT_RECORDED + " for some cells"
            continue
        values = {name: compare.env_values(envs, f) for f, name in compare.ENV_FIELDS.items()}
        differ = [f"{name} {'/'.join(v)}" for name, v in values.items() if len(v) > 1]
        if differ:
            out[task] = ", ".join(differ)
    return out


def _meanings_blocks() -> list:
    """The section a reader checks before quoting a ranking: what each criterion measures and
    when it is conclusive (each criterion's ``meaning``, declared with it in the leaderboard)."""
    items = [[("b", f"By {c.title}"), ": " + c.meaning] for c in lb.CRITERIA if c.meaning]
    return [H(2, "What each ranking measures, and when to trust it"),
            UL(items),
            P(["A ranking is conclusive at its budget where its ties are resolved (Holm-corrected "
               "paired tests within a task), its order survives resampling the seeds (rank "
               "stability: stable), and, across tasks, where the Friedman test rejects (below). "
               "The bias test's verdicts are in the section Bias test."])]


def _common_time_note(common, median_train) -> list:
    """The common training time of a task's ELBO-at-equal-time column, beside the median cell's."""
    if common is None or not math.isfinite(common):
        return []
    text = f" · ELBO at equal time read at T = {common:.3g} s of training"
    if median_train is not None and math.isfinite(median_train) and median_train > 0:
        text += f" ({100 * common / median_train:.0f}% of the median cell's {median_train:.3g} s)"
    return [text]


def _rank_table(board: pd.DataFrame, criterion: str) -> Table | None:
    m = lb.rank_matrix(board, criterion)
    if m.empty:
        return None
    summary = ["mean rank", "relative rank", "tasks"]
    tasks = [c for c in m.columns if c not in summary]
    best = m["relative rank"].min()
    rows = []
    for est, r in m.iterrows():
        row = [(str(est), False)]
        for t in tasks:
            v = r[t]
            row.append(("" if pd.isna(v) else str(int(v)), not pd.isna(v) and int(v) == 1))
        row += [(f"{r['mean rank']:.2f}", False),
                (f"{r['relative rank']:.2f}", bool(r["relative rank"] == best)),
                (str(int(r["tasks"])), False)]
        rows.append(row)
    return Table(["estimator"] + tasks + summary, rows)


def _meta_items(meta: dict, run_dir: Path) -> list:
    from estbench.engine import protocols

    if meta.get("budget") and not meta.get("mode"):  # folders made before meta.json said it
        meta = {**meta, "mode": protocols.mode(meta["budget"])}
    items = [["run folder: ", ("code", str(run_dir))]]
    for key, label in [("unreadable", "meta.json unreadable"),  # build_report: why, if unreadable
                       ("created", "created"), ("git_commit", "git commit"),
                       ("code_version", "code version"), ("estbench", "estbench"),
                       ("platform", "platform"), ("cpu", "CPU"), ("cpu_count", "CPU cores"),
                       ("cuda_device", "GPU"), ("python", "python"), ("torch", "torch"),
                       ("budget", "budget"), ("mode", "mode"), ("command", "command")]:
        v = meta.get(key)
        if v not in (None, ""):
            items.append([f"{label}: ", ("code", str(v))])
    return items


def _protocol_blocks(task_names, meta: dict) -> list:
    """The published protocol each task of the run follows (tasks/protocols/*.yml), and whether
    this run ran it (``--budget paper``) or the suite's own budget."""
    from estbench.engine import protocols

    try:
        found = protocols.available()
    except protocols.ProtocolError as e:
        return [H(2, "Published protocols"), P([f"The protocol files could not be read: {e}"])]
    bases = sorted({t.split("[")[0] for t in task_names} & set(found))
    if not bases:
        return []
    ran = meta.get("budget")
    if ran == protocols.PAPER:
        this_run = "This run ran each task's protocol (--budget paper): its options and budget."
    elif ran == protocols.PUBLISHED:
        this_run = ("This run ran each task's protocol as its source ran it (--budget published): "
                    "the as-published settings, each method at its own (listed by estbench list).")
    else:
        this_run = (f"This run's budget is {ran!r}, the suite's own; the protocol is what "
                    "estbench run --budget paper runs." if ran else
                    "This run's budget is not recorded.")
    blocks = [H(2, "Published protocols"),
              P(["The experiment each real task follows, as its source runs it, and where this "
                 "suite departs from it (", ("code", "tasks/protocols/TASK.yml"), "). " + this_run])]
    for name in bases:
        p = found[name]
        rows = [["source", p.citation()], *[[k, str(v)] for k, v in p.settings.items()],
                ["--budget paper", ", ".join(f"{k}={v}" for k, v in
                                             {**p.task_options, **p.budget}.items())]]
        rows += [[f"{est} (tuned)", ", ".join(f"{k}={v}" for k, v in o.items())]
                 for est, o in p.estimator_options.items()]
        rows += [["differs", d] for d in p.differences]
        if p.cost:
            rows.append(["cost", p.cost])
        blocks += [H(3, f"{name}: {p.name}"),
                   Table(["", "protocol"], [[(a, False), (b, False)] for a, b in rows],
                         code_first=False, align="ll")]
    return blocks


def _task_blocks(cells: pd.DataFrame, board: pd.DataFrame) -> list:
    """The tasks' own sections (``Task.report_section``), from their finished cells' artifacts:
    each task's estimators best first by final ELBO, one cell each (its lowest seed)."""
    if cells is None or cells.empty or "artifacts" not in cells:
        return []
    cells = cells[[isinstance(a, dict) and bool(a) for a in cells.artifacts]]  # those that kept any
    ranks = board[board.criterion == "final_elbo"] if not board.empty else board
    sections: dict = {}  # title -> (introduction, [(task, blocks)])
    for task, df in cells.groupby("task", sort=True):
        cls = quantities.task_class(task)
        if cls is None:
            continue
        order = ranks[ranks.task == task].sort_values(["rank", "mean"], ascending=[True, False])
        ests = [e for e in order.estimator if e in set(df.estimator)]
        ests += sorted(set(df.estimator) - set(ests))
        firsts = [df[df.estimator == e].sort_values("seed").iloc[0] for e in ests]
        got = cls.report_section([(c.estimator, int(c.seed),
                                   c.artifacts if isinstance(c.artifacts, dict) else {})
                                  for c in firsts])
        if got:
            title, intro, blocks = got
            sections.setdefault(title, (intro, []))[1].append((task, blocks))
    out: list = []
    for title, (intro, per_task) in sections.items():
        out += [H(2, title), P([intro])]
        for task, blocks in per_task:
            out.append(H(3, task))
            for kind, *rest in blocks:
                out.append(P(list(rest[0])) if kind == "text" else Rationale(*rest))
    return out


def _problem_cells(cells: pd.DataFrame) -> Table | None:
    if cells is None or cells.empty or "status" not in cells:
        return None
    bad = cells[cells.status != "ok"]
    if bad.empty:
        return None
    rows = []
    for (task, est, status, err), df in bad.fillna({"error": ""}).groupby(
            ["task", "estimator", "status", "error"], sort=True):
        seeds = ",".join(str(int(s)) for s in sorted(df.seed))
        rows.append([(est, False), (task, False), (status, False), (seeds, False),
                     (str(err)[:200], False)])
    return Table(["estimator", "task", "status", "seeds", "message"], rows, align="lllll")


_RANK_RULE = (
    "Per task, estimators are sorted by their mean over seeds; one shares the rank of the group "
    "above it when it is not significantly worse than that group's best, else it gets its position "
    "(competition ranking: 1, 1, 3). Significance: a paired t-test across the seeds both ran for "
    "every pair of the task's estimators, Holm-corrected over those pairs (Holm 1979; the "
    f"familywise error of one task and criterion stays at {lb.ALPHA}), so that a large field "
    "does not split on chance differences; with one seed, ties only on equal values. "
    "Latent families differ, so not every estimator runs on every task and fields differ in size "
    "(rank 3 of 7 is not rank 3 of 21): each rank is also read as a relative rank "
    "(rank - 1) / (field - 1), 0 = best, 1 = last, and estimators are ordered by their mean "
    "relative rank over the tasks they ran on (mean rank and number of tasks beside it).")

FRIEDMAN_TEXT = (
    "Does an order hold across tasks? The Friedman test (Demšar 2006) ranks the estimators within "
    "each task by their mean over seeds (1 = best; the values the leaderboard ranks) and asks "
    "whether their mean ranks over the tasks differ more than chance would make them; where they "
    "do, the Nemenyi test tells two estimators apart when their mean ranks differ by more than the "
    "critical difference CD. It needs every estimator on every task, so it runs on the estimators "
    "common to a set of tasks: all tasks of the run, and each latent family with several tasks "
    "(nearly every estimator that fits a family runs on all its tasks). Conclusive where Friedman "
    f"p < {lb.ALPHA}, and then only about the N tasks x k estimators of that row; with p >= "
    f"{lb.ALPHA} the order across those tasks is inconclusive and no pair is told apart. The "
    "p-value is the chi-squared approximation, conservative with few tasks; where the CD exceeds "
    "the spread ranks can have (2 tasks) the test can find that the ranks differ but not which. "
    "In the diagrams a bar joins estimators the Nemenyi test does not tell apart; in friedman.csv "
    "estimators sharing a letter are not told apart.")

#: the criteria whose critical-difference diagrams the report shows (the others are linked)
CD_SHOWN = ["final_elbo", "grad_error"]

PROFILE_TEXT = (
    "Performance profiles (Dolan & Moré 2002): for each task, an estimator's figure divided by "
    "the best estimator's on that task, a factor tau >= 1; the curve of an estimator is the "
    "fraction of the run's tasks on which it is within a factor tau of the best, against "
    "log2(tau). "
    "Its height at 0 is the share of tasks it is best on; the height where it levels off is the "
    "share it ran on (a task it did not run on, or was not admitted to because the bias test "
    "finds it biased there, counts as failed), and a curve to the upper left beats one to the "
    "lower right at every tolerance. Per-task means over seeds of the raw figures, not of their "
    "logarithms. Unlike the Friedman test it needs no common set of estimators, and unlike the "
    "leaderboard it shows by how much an estimator trails, not only where; it tests nothing (no "
    "seed-to-seed noise enters it). Where an estimator's error is only float rounding (exact "
    "enumeration), every other estimator's factor on that task is enormous.")

#: short panel titles of the performance profiles
PROFILE_TITLES = {"grad_error": "gradient error E‖g − ∇‖²",
                  "error_x_time": "gradient error x ms a step (not found biased)",
                  "error_x_evals": "gradient error x f-evaluations (not found biased)",
                  "step_time": "step time"}


def _friedman_table(ranks: pd.DataFrame, pairs: pd.DataFrame) -> Table | None:
    """One row per criterion x comparison set: the design, the test and its verdict, the best mean
    rank and the estimators the Nemenyi test finds worse than it."""
    if ranks.empty:
        return None
    titles = {c.name: c.name.replace("_", " ") for c in lb.CRITERIA}
    rows = []
    for (crit, comparison), d in ranks.groupby(["criterion", "comparison"], sort=False):
        first = d.iloc[0]
        design = f"{int(first.tasks)} x {int(first.estimators)}"
        if first.status != "tested":
            rows.append([(titles.get(crit, crit), False), (comparison, False), (design, False),
                         ("-", False), ("-", False), (first.status, False), ("-", False),
                         ("-", False), ("-", False)])
            continue
        best = d.iloc[0]
        worse = "-"
        if first.conclusive:
            with_best = ((pairs.estimator_a == best.estimator)
                         | (pairs.estimator_b == best.estimator))
            pr = pairs[(pairs.criterion == crit) & (pairs.comparison == comparison) & with_best
                       & (pairs.p_nemenyi < lb.ALPHA)]
            names = sorted((set(pr.estimator_a) | set(pr.estimator_b)) - {best.estimator})
            worse = ", ".join(names) if names else "none"
        rows.append([(titles.get(crit, crit), False), (comparison, False), (design, False),
                     (f"{first.chi2:.1f}", False), (tb.p_text(first.p), False),
                     ("conclusive" if first.conclusive else "inconclusive", bool(first.conclusive)),
                     (f"{first.cd:.2f}", False),
                     (f"{best.estimator} ({best.mean_rank:.2f})", False), (worse, False)])
    return Table(["criterion", "over", "tasks x estimators", "Friedman χ²", "p", "order across "
                  "tasks", "CD", "best mean rank", "worse than it (Nemenyi)"], rows,
                 code_first=False, align="lllrrlrll")


def _declared_unbiased(name: str):
    """What an estimator configuration declares (``unbiased``, which options may change: NVIL's
    variance normalisation makes it biased), or None for one not loaded here."""
    import estimators
    from estbench.core.spec import parse

    try:
        spec = parse(name)
        return bool(estimators.get(spec.name, **spec.options).unbiased)
    except Exception:  # a plug-in from a file, or a name from another version
        return None


BIAS_TEST_TEXT = (
    "The bias test (estbench.engine.measure.bias_test) asks of each checkpoint whether the M estimates' "
    "mean differs from the reference gradient by more than their Monte Carlo error, the "
    "reference's own and a float32 tolerance, along 16 fixed random directions (Student t, "
    "Bonferroni over the directions). Where q is nearly deterministic (late in training) an "
    "unbiased estimator can put a little probability on large values that M estimates miss, and "
    "then the test rejects it; so where an estimator declared unbiased is rejected with a bias "
    f"under {ms.BIAS_RECHECK_NOISE_RATIO:g}x its noise floor, the checkpoint is tested again on "
    f"{ms.BIAS_RECHECK_FACTOR} M fresh estimates, and that test's p is recorded (the records' "
    "bias_test_samples says where). A cell combines its checkpoints by Bonferroni and rejects "
    f"at alpha {tb.BIAS_TEST_ALPHA}. An estimator is found biased on a task when more than half of "
    "its cells reject: a real bias repeats from seed to seed, while a lone rejection can still "
    "come from rare values the estimates missed. Not found biased is "
    "no proof of unbiasedness: with few estimates a small bias goes unseen.")


def _bias_test_blocks(pc: pd.DataFrame) -> list:
    verdict = tb.estimator_bias(pc)
    if verdict.empty:
        return []
    rows, alarms, lone = [], [], []
    for (task, est), v in verdict.sort_index().iterrows():
        if not v.rejecting:
            continue
        declared = _declared_unbiased(est)
        d = pc[(pc.task == task) & (pc.estimator == est)]
        share = f"{int(v.rejecting)}/{int(v.cells)}"
        if not v.biased:
            if declared:
                lone.append(f"{est} on {task} ({share})")
            continue
        noise = d["bias_noise"].mean() if "bias_noise" in d else float("nan")
        net = d["net_bias"].mean() if "net_bias" in d else float("nan")
        rows.append([(est, bool(declared)), (task, False),
                     ({True: "unbiased", False: "biased", None: "?"}[declared], bool(declared)),
                     (share, False), (tb.p_text(v.p), False), (f"{d['bias'].mean():.3g}", False),
                     (f"{noise:.3g}" if noise == noise else "-", False),
                     (f"{net:.3g}" if net == net else "-", False),
                     (f"{d['grad_error'].mean():.3g}" if "grad_error" in d else "-", False)])
        if declared:
            alarms.append(f"{est} on {task} ({share} cells reject, p {tb.p_text(v.p)}, "
                          f"bias {d['bias'].mean():.3g})")
    out = [H(2, "Bias test"), P([BIAS_TEST_TEXT])]
    if alarms:
        out.append(P([("b", "Declared unbiased but found biased: " + "; ".join(alarms) + ".")]))
    if rows:
        out.append(P(["Found biased (bold: declared unbiased):"]))
        out.append(Table(["estimator", "task", "declares", "cells rejecting", "p (Bonferroni)",
                          "measured bias", "noise floor", "bias beyond noise", "gradient error"],
                         rows, align="lllllrrrr"))
    else:
        out.append(P(["No estimator is found biased on any task."]))
    if lone:
        out.append(P(["Declared unbiased, rejected in a minority of cells (not a verdict; see "
                      "above): " + "; ".join(lone) + "."]))
    return out


STABILITY_TEXT = (
    "Would the order survive other seeds? The seeds are resampled with replacement "
    f"({lb.BOOTSTRAP} draws, the same seeds for every estimator), the estimators re-ordered by "
    "their means in each draw and compared with the order of all seeds: the median Kendall tau and "
    f"how often the leader stays first. Stable: tau >= {lb.STABLE_TAU} and the leader first in "
    f"at least {lb.STABLE_LEADER:.0%} of the draws; otherwise the ranking is unstable at this "
    "budget and number of seeds (estimators missing a seed are left out). A ranking over fewer "
    f"than {lb.MIN_STABLE_SEEDS} seeds is never called stable: a bootstrap over n seeds has "
    "only C(2n-1, n) distinct draws (3 at two seeds, 10 at three), most of them repeating a "
    "seed, so it would only show that those few seeds agree.")


def _stability_table(st: pd.DataFrame, criterion: str, blocks: str = "seeds") -> Table | None:
    """The stability of each task's order by ``criterion``; ``blocks``: what was resampled
    (seeds of training cells, snapshots of a probe)."""
    d = st[st.criterion == criterion]
    if d.empty:
        return None
    rows = []
    for _, r in d.iterrows():
        tau = "-" if pd.isna(r.median_tau) else f"{r.median_tau:.2f}"
        kept = "-" if pd.isna(r.leader_kept) else f"{r.leader_kept:.0%}"
        rows.append([(str(r.task), False), (str(r.leader or "-"), False), (tau, False),
                     (kept, False), (str(r.verdict).replace("seeds", blocks), bool(r.stable)),
                     (f"{int(r.estimators)} x {int(r.seeds)}", False)])
    return Table(["task", "leader", "median tau", "leader kept", "ranking",
                  f"estimators x {blocks}"], rows, align="lllrll")


def _glance_table(board: pd.DataFrame, st: pd.DataFrame, pc: pd.DataFrame) -> Table | None:
    """Per task: the rank-1 group by final ELBO and by gradient error, with their figures (means
    over seeds), ms a step, and whether each ranking is stable."""
    per_task = board[board.task != "overall"]
    if per_task.empty:
        return None
    verdict = {(r.criterion, r.task): (r.verdict, r.stable) for r in st.itertuples()} \
        if not st.empty else {}
    ms = pc.groupby(["task", "estimator"])["step_ms"].mean()
    rows = []
    for task in sorted(per_task.task.unique()):
        row = [(str(task), False)]
        for crit, fmt in (("final_elbo", "{:.4g}"), ("grad_error", "10^{:.2f}")):
            d = per_task[(per_task.task == task) & (per_task.criterion == crit) & (per_task["rank"] == 1)]
            if d.empty:
                row += [("-", False), ("-", False), ("-", False)]
                continue
            names = ", ".join(d.estimator)
            val = d["mean"].iloc[0]
            row += [(names, False),
                    (fmt.format(val) if pd.notna(val) and abs(val) != float("inf") else str(val), False),
                    verdict.get((crit, task), ("-", False))]
        leaders = per_task[(per_task.task == task) & (per_task.criterion == "final_elbo")
                           & (per_task["rank"] == 1)].estimator
        times = [ms.get((task, e)) for e in leaders]
        times = [t for t in times if t is not None and pd.notna(t)]
        row.append((f"{min(times):.3g}-{max(times):.3g}" if len(times) > 1 else
                    (f"{times[0]:.3g}" if times else "-"), False))
        rows.append(row)
    return Table(["task", "best by final ELBO", "ELBO", "", "best by gradient error",
                  "log10 error", "", "ms a step (ELBO best)"], rows, align="llrllrlr")


def _leaderboard_doc(board: pd.DataFrame, run_dir: Path, st: pd.DataFrame | None = None,
                     friedman: tuple | None = None) -> Document:
    doc = Document(f"estbench leaderboard: {run_dir.name}")
    doc.add(P([_RANK_RULE + " Bold: rank 1."]))
    for crit in lb.CRITERIA:
        t = _rank_table(board, crit.name)
        if t is not None:
            doc.add(H(2, f"By {crit.title}"), t)
            s = _stability_table(st, crit.name) if st is not None else None
            if s is not None:
                doc.add(P(["Rank stability: " + STABILITY_TEXT]), s)
    t = _friedman_table(*friedman) if friedman is not None else None
    if t is not None:
        doc.add(H(2, "Across tasks: Friedman test"), P([FRIEDMAN_TEXT, " (",
                ("link", "friedman.csv", "friedman.csv"), ")"]), t)
    return doc


def _across_tasks_blocks(friedman: tuple, profiles: pd.DataFrame, style, fdir: Path) -> list:
    """The Friedman tests with their critical-difference diagrams, and the performance profiles."""
    ranks, pairs = friedman
    out = [H(2, "Across tasks: Friedman test and critical differences"), P([FRIEDMAN_TEXT])]
    table = _friedman_table(ranks, pairs)
    if table is None:
        out.append(P(["No criterion has values on several tasks: nothing to test across tasks."]))
    else:
        out.append(table)
    titles = {c.name: c.title for c in lb.CRITERIA}
    linked = []
    for crit in lb.CRITERIA:
        fig = [] if ranks.empty else plots.critical_difference(
            ranks, pairs, crit.name, style, fdir, f"mean rank by {titles[crit.name]}")
        if not fig:
            continue
        if crit.name in CD_SHOWN:
            out.append(Img(fig[0], f"Critical differences by {titles[crit.name]}: mean ranks over "
                                   "tasks (1 = best); a bar joins estimators the Nemenyi test does "
                                   "not tell apart"))
        else:
            linked.append(("link", crit.name.replace("_", " "),
                           fig[0].relative_to(fdir.parent).as_posix()))
    files = [("link", "friedman.csv", "friedman.csv"), ", ",
             ("link", "friedman_pairs.csv", "friedman_pairs.csv"), " (Nemenyi p-values)"]
    if linked:
        files += ["; critical-difference diagrams by "]
        for i, link in enumerate(linked):
            files += ([", "] if i else []) + [link]
    out.append(P(["Files: ", *files, "."]))

    fig = [] if profiles.empty else plots.performance_profiles(profiles, style, fdir,
                                                               PROFILE_TITLES)
    if fig:
        out += [H(2, "Performance profiles"), P([PROFILE_TEXT, " (",
                ("link", "performance_profiles.csv", "performance_profiles.csv"), ")"]),
                Img(fig[0], "Performance profiles: fraction of tasks within a factor tau of the "
                            "best estimator, against log2(tau)")]
    return out


ORACLE_TEXT = (
    "Oracles (Estimator.oracle: exact enumeration) are references outside the budget: they "
    "spend as many f-evaluations as the latent space has configurations, so they are excluded "
    "from every ranking, performance profile and Friedman test, shown as reference rows in the "
    "per-task tables (never marked best) and as black dashed reference lines in the figures.")

RESULTS_TEXT = (
    "Mean ± 95% confidence half-width over seeds (Student t). final ELBO: evaluate(final=True) "
    "at the end of training, higher is better -- the test ELBO of a model, the exact objective "
    "E_q[f] on a closed-form toy (the header says which). ELBO at equal time: each cell's curve "
    "(evaluate(final=False) along training: the validation ELBO of a model, the exact objective "
    "on a toy) read at the task's common training time T (the shortest training of any cell "
    "there), by linear interpolation between its evaluation points. Gradient figures are "
    "averaged over the checkpoints along each cell's training trajectory: variance is the trace "
    "of the covariance of one gradient estimate, gradient error E‖g − ∇‖². bias beyond noise: "
    "the measured bias ‖mean of M estimates − ∇‖ net of its Monte Carlo noise floor, "
    "sqrt(max(0, bias² − floor²)) at each checkpoint; for an unbiased estimator it is 0 up to "
    "noise, so it is read with the bias test's verdict beside it (section Bias test) and never "
    "marked best. Near the floor the figure is itself noisy (a measured bias 1% above a large "
    "floor gives 14% of the floor), so a high-variance estimator not found biased can show a "
    "sizeable value that is still noise. step time: training only; f-evals: f-evaluations per "
    "data point per step. Bold: best in column among the competitors (not marked where all "
    "are equal; the variance only among estimators not found biased). Reference rows (oracles, "
    "outside the budget) are never bold and never ranked. Curves: means over seeds at each "
    "evaluation point with 95% bands.")

BIAS_VARIANCE_TEXT = (
    "Per estimator: the measured bias ‖mean of M estimates − ∇‖ against the variance, each "
    "averaged over checkpoints, then over seeds (whiskers: 95% CI). The black bar at the same "
    "variance, joined to the marker by a dotted line, is the estimator's noise floor: the bias "
    "Monte Carlo noise alone produces with M estimates (sqrt(tr Cov / M + the reference's own "
    "error²), bias_noise in the records), which grows with the variance. An unbiased estimator "
    "sits on its floor, whatever its measured bias; a marker well above its floor is a bias "
    "beyond noise. The verdict is the bias test's (section Bias test). Oracles (no variance) "
    "are not drawn.")


def _curve_note(records: pd.DataFrame, task: str) -> str:
    """What a task's curves show against its final figure, and why the curves' last point and the
    final figure differ (or do not), with both figures: means over the cells that have both."""
    r = records[records.task == task]
    keys = list(CELL_KEYS)
    last = r[r.metric == "elbo"].sort_values("step").groupby(keys)["value"].last()
    final = r[r.metric == "final_elbo"].groupby(keys)["value"].last()
    both = pd.concat([last.rename("last"), final.rename("final")], axis=1).dropna()
    kind = tb.closed_form(task)
    if both.empty:
        said = ""
    else:
        gap = float((both["final"] - both["last"]).mean())
        said = (f" The curves end at {both['last'].mean():.5g} and the final figure is "
                   f"{both['final'].mean():.5g} (means over the {len(both)} cells): "
                   + (f"a gap of {gap:+.3g}." if gap else "no gap."))
    if kind:
        return ("Curves: the exact objective E_q[f] at each evaluation point (evaluate(final="
                "False)); the final figure is the same objective after the last step "
                "(evaluate(final=True)): a toy has no data to split, so the curve's last point is "
                "the final figure." + said)
    if kind is None:
        return ("Curves: the task's evaluate(final=False) along training; the final figure is "
                "its evaluate(final=True), which may use other data." + said)
    return ("Curves: the validation ELBO along training (evaluate(final=False), on a validation "
            "split); the final ELBO is the test ELBO (evaluate(final=True), on the test split, "
            "with the task's final evaluation: its own number of samples and images). Both "
            "evaluate the same model after the last step, so the curve's last point and the final "
            "ELBO differ by the split and the evaluation, not by training." + said)


@dataclass
class Analysis:
    """Everything a report shows, computed once from a run folder's records (finished cells only:
    a failed or diverged cell's partial checkpoint records are no measurement; it is listed with
    the problem cells instead).  Every section reads it; none computes a figure of its own."""

    run_dir: Path
    out: Path
    meta: dict
    records: pd.DataFrame
    cells: pd.DataFrame
    pc: pd.DataFrame              # per-cell figures (analysis.figures.per_cell)
    tables: dict                  # {task: per-task table} (analysis.tables.task_tables)
    task_figures: dict            # {task: the task's own final figures}
    board: pd.DataFrame           # the leaderboard (analysis.leaderboard.leaderboard)
    stability: pd.DataFrame
    friedman: tuple
    profiles: pd.DataFrame
    ranked: Optional[str]         # the estimator ``estbench rank`` ranks (meta.json "ranked")
    style: "plots.Style"
    estimators: set
    published: pd.DataFrame       # ours beside the published figures (analysis.published)

    @property
    def fdir(self) -> Path:
        return self.out / "figures"


def analyse(run_dir, out_dir=None) -> Analysis:
    """The analysis of a run folder for its report.  FileNotFoundError for a missing folder,
    ValueError for a folder without records."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no results folder at {run_dir}")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    records, cells = store.load(run_dir)
    if records.empty:
        raise ValueError(f"no results in {run_dir} (no cell records under {run_dir / 'cells'})")
    meta, unreadable = store.meta_status(run_dir)
    if unreadable:  # one line on stderr, and the report says it where the provenance goes
        import warnings

        warnings.warn(store.meta_warning(run_dir, unreadable), stacklevel=3)
        meta = {"unreadable": unreadable}
    records = store.finished(records, cells)
    against = pubmod.against_published(records)  # by the cells' own task names
    records, cells = tb.label_settings(records, cells)
    pc = figures.per_cell(records)
    all_est = set(records.estimator)
    if cells is not None and not cells.empty:
        all_est |= set(cells.estimator)
    ranked = meta.get("ranked") if isinstance(meta.get("ranked"), str) else None
    return Analysis(run_dir, out, meta, records, cells, pc, tb.task_tables(pc),
                    tb.task_figures(records), lb.leaderboard(pc), lb.stability(pc),
                    lb.friedman_tests(pc), lb.performance_profiles(pc), ranked,
                    plots.Style(all_est, ranked=ranked), all_est, against)


def write_files(a: Analysis) -> None:
    """The report's tables as files: CSV and LaTeX per task, the leaderboard and its statistics,
    leaderboard.md.  Files of a report written here before for tasks no longer in the run go."""
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    tdir = out / "tables"
    tdir.mkdir(exist_ok=True)
    previous = out / "report.md"
    if previous.is_file() and previous.read_text(errors="replace").startswith("# estbench report"):
        for old in [*tdir.glob("*.csv"), *tdir.glob("*.tex"), *a.fdir.glob("*.png"),
                    *a.fdir.glob("*.svg")]:
            old.unlink()
    tb.to_csv_frame(a.tables).to_csv(tdir / "all_tasks.csv", index=False)
    for task, t in a.task_figures.items():
        t.to_csv(tdir / f"{tb.slug(task)}_figures.csv", index=False)
    for task, t in a.tables.items():
        t.to_csv(tdir / f"{tb.slug(task)}.csv", index=False)
        (tdir / f"{tb.slug(task)}.tex").write_text(tb.to_latex(t, task, a.ranked))
    a.board.to_csv(out / "leaderboard.csv", index=False)
    a.stability.to_csv(out / "stability.csv", index=False)
    a.friedman[0].to_csv(out / "friedman.csv", index=False)
    a.friedman[1].to_csv(out / "friedman_pairs.csv", index=False)
    a.profiles.to_csv(out / "performance_profiles.csv", index=False)
    if not a.published.empty:
        a.published.to_csv(out / "against_published.csv", index=False)
    elif (out / "against_published.csv").is_file():
        (out / "against_published.csv").unlink()
    (out / "leaderboard.md").write_text(
        _leaderboard_doc(a.board, a.run_dir, a.stability, a.friedman).markdown(out))


# ---- the sections of report.md, in order: each a function of the analysis -> blocks ---------------
def _overview(a: Analysis) -> list:
    n_cells = len(a.cells) if a.cells is not None else 0
    status = a.cells.status.value_counts().to_dict() if n_cells else {}
    records = a.records
    blocks = [UL(_meta_items(a.meta, a.run_dir)),
              P([f"{n_cells} cells ({', '.join(f'{v} {k}' for k, v in sorted(status.items()))}); "
                 f"{records.task.nunique()} tasks, {records.estimator.nunique()} estimators, "
                 f"{records.seed.nunique()} seeds. Everything below is derived from the tidy records "
                 "(", ("code", "cells/*.parquet"), "). Files: ",
                 ("link", "leaderboard.csv", "leaderboard.csv"), ", ",
                 ("link", "leaderboard.md", "leaderboard.md"), ", ",
                 ("link", "all tables (CSV)", "tables/all_tasks.csv"), "."])]
    if a.ranked:
        blocks.append(P([("b", f"This run ranks {a.ranked}"), " (estbench rank): it is marked "
                         f"{tb.RANKED_NOTE} in the per-task tables and drawn thicker, with a black "
                         "edge, in every figure."]))
    return blocks + [P(["Contents:"]), TOC()]


def _at_a_glance(a: Analysis) -> list:
    glance = _glance_table(a.board, a.stability, a.pc)
    if glance is None:
        return []
    return [H(2, "At a glance"), *_as_published_blocks(a),
            P(["Per task, the estimators ranked first (with their ties) by final ELBO and by "
               "gradient error E‖g − ∇‖², the figure (mean over seeds) and whether the "
               "ranking survives resampling the seeds; ms a step of the ELBO leaders. What "
               "each ranking measures and when to trust it: the section of that name below."]),
            glance]


#: said above the rankings of a run in the as-published mode
AS_PUBLISHED_NOTE = ("This run is as published (--budget published): each method ran at its "
                     "source's own settings, so a task configuration holds only the methods that "
                     "share its settings, and the rankings below are no fair comparison of the "
                     "methods: that is the equal-settings paper budget's. The section Against the "
                     "published figures is what this run is for.")


def _as_published_blocks(a: Analysis) -> list:
    from estbench.engine import protocols

    return [P([("b", "Not a fair comparison. "), AS_PUBLISHED_NOTE])] \
        if a.meta.get("budget") == protocols.PUBLISHED else []


def _leaderboard(a: Analysis) -> list:
    blocks = [H(2, "Leaderboard"), *_as_published_blocks(a),
              P([_RANK_RULE + " Only finished cells are ranked and tabulated: cells that "
                 "diverged, failed or were infeasible are left out and listed at the end."])]
    mixed = _mixed_timing(a.cells)
    if mixed:
        blocks.append(P([("b", "Timed in different environments: "),
                         "; ".join(f"{t} ({why})" for t, why in sorted(mixed.items())),
                         ". On these tasks the rankings by step time, by error x time and by ELBO at "
                         "equal time compare cells timed on different machines, threads or parallel "
                         "jobs (a reference made elsewhere, reused by estbench rank, or cells added "
                         "later): read them with care, or recompute the cells on one machine (--force)."]))
    oracles = sorted(e for e in a.estimators if a.style.is_oracle(e))
    if oracles:
        blocks.append(P([ORACLE_TEXT + " Here: " + ", ".join(oracles) + "."]))
    heat = plots.rank_heatmap(lb.rank_matrix(a.board, "final_elbo"),
                              lb.rank_matrix(a.board, "final_elbo", values="relative"), a.fdir,
                              "rank by final ELBO (number: rank, 1 = best; colour: relative rank; "
                              "blank = not run)", ranked=a.ranked)
    for crit in lb.CRITERIA:
        t = _rank_table(a.board, crit.name)
        if t is not None:
            blocks += [H(3, f"By {crit.title}"), t]
            s = _stability_table(a.stability, crit.name)
            if s is not None:
                blocks += [P([f"Rank stability by {crit.name.replace('_', ' ')}: "
                              "stable, unstable, or too few seeds to say, per task (see below)."]), s]
        if crit.name == "final_elbo" and heat:
            blocks.append(Img(heat[0], "Rank by final ELBO, estimators x tasks"))
    return blocks + [P(["Rank stability: " + STABILITY_TEXT]), *_meanings_blocks()]


def _across_tasks(a: Analysis) -> list:
    return _across_tasks_blocks(a.friedman, a.profiles, a.style, a.fdir)


def _results_per_task(a: Analysis) -> list:
    blocks = [H(2, "Results per task"), P([RESULTS_TEXT])]
    common = a.pc.groupby("task")["common_time"].first()
    median_train = a.pc.groupby("task")["median_time"].first()
    for task, t in a.tables.items():
        header, rows = tb.display_rows(t, task)
        s = tb.slug(task)
        blocks += [H(3, task), Table(header, rows, notes=tb.row_notes(t, a.ranked)),
                   P([("link", "CSV", f"tables/{s}.csv"), " · ", ("link", "LaTeX", f"tables/{s}.tex")]
                     + _common_time_note(common.get(task), median_train.get(task)))]
        if task in a.task_figures:
            fh, frows = tb.figure_rows(a.task_figures[task], list(t.estimator))
            blocks += [P(["The task's own final figures, mean ± 95% CI over seeds (",
                          ("link", "CSV", f"tables/{s}_figures.csv"), "):"]),
                       Table(fh, frows)]
        curves = plots.training_curves(a.records, task, a.style, a.fdir)
        if curves:
            blocks += [P([_curve_note(a.records, task)]),
                       Img(curves[0], f"{task}: "  # (no brackets: E_q[f] would end the alt text)
                                      + tb.elbo_labels(task)[0].split(" (")[0].split(" E_q")[0]
                                      + " vs steps and wall-clock; "
                                      "gradient variance along training"
                                      + ("; oracle: dashed black reference line" if
                                         set(a.style.oracles) & set(t.estimator) else ""))]
    return blocks


def _f(x: float, fmt: str = ".2f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _against_published(a: Analysis) -> list:
    """Ours beside the published figures, for the tasks whose protocol carries them."""
    from estbench.engine import protocols

    try:
        found = protocols.available()
    except protocols.ProtocolError:
        return []  # the protocols section says why
    bases = sorted({t.split("[")[0] for t in a.records.task.unique()} & set(found))
    with_figures = [b for b in bases if found[b].as_published is not None
                    and found[b].as_published.published is not None]
    if not with_figures:
        return []
    blocks = [H(2, "Against the published figures")]
    t = a.published
    if t.empty:
        return blocks + [P(["None of this run's cells ran a method as its source ran it, so none "
                            "is put beside the published figures of "
                            + ", ".join(with_figures) + " (they are the protocol's: ",
                            ("code", "estbench list"), "; ", ("code", "estbench run --budget "
                                                             "published"), " runs them).", ])]
    blocks.append(P(["Each method as its source ran it (", ("code", "--budget published"),
                     ": the source's data, length and per-method settings), beside the figure the "
                     "source published for it. Ours: mean and 95% CI over our seeds. Published: "
                     "mean ± standard error over its seeds. Difference: ours − published, ± its "
                     "standard error; p: Welch's two-sample t-test from the two summaries, or, "
                     "where the source published one run, the test of that run as one more draw "
                     "from our seeds' spread (the prediction interval). "
                     "Verdict: reproduced (no difference beyond the noise, p ≥ 0.05), ours "
                     "lower / ours higher (beyond the noise), not tested (one seed of ours), not "
                     "comparable (a run cut short of the source's length). Lower is better for "
                     "a figure reported as a loss (−ELBO)."]))
    for task, df in t.groupby("task", sort=True):
        ap = found[task].as_published
        rows = []
        for _, r in df.sort_values(["figure", "published_mean"]).iterrows():
            cut = r.steps < r.published_steps
            fmt = protocols.figure_format(r.published_mean)
            pub = (f"{_f(r.published_mean, fmt)} ± {_f(r.published_se, fmt)} ({r.published_n})"
                   if r.published_n > 1 else f"{_f(r.published_mean, fmt)} (one run)")
            on = f" [{r.device}]" if df.device.nunique() > 1 else ""
            rows.append([(r.estimator + on, False), (r.source_name, False), (r.label, False),
                         (f"{_f(r.ours_mean, fmt)} ± {_f(r.ours_ci, fmt)} ({r.ours_n})"
                          + (f", {r.steps} steps" if cut else ""), False),
                         (pub, False),
                         (f"{_f(r.difference, '+' + fmt)} ± {_f(r.difference_se, fmt)}", False),
                         (_f(r.p_value, ".3f"), False), (r.verdict, r.verdict == "reproduced")])
        blocks += [H(3, f"{task}: {found[task].name}"),
                   Table(["estimator", "source's name", "figure", "ours (seeds)",
                          "published (seeds)", "difference", "p", "verdict"], rows,
                         align="lllrrrrl")]
        for o in pubmod.orderings(df):
            if o.agrees:
                line = (f"{o.label}: the published order of the methods ({' < '.join(o.published)}, "
                        "best first) is reproduced.")
            else:
                flips = "; ".join(f"{x} and {y} ({'beyond' if sep else 'within'} the source's "
                                  "own noise)" for x, y, sep in o.flipped)
                line = (f"{o.label}: the published order ({' < '.join(o.published)}, best first) "
                        f"is not reproduced: ours is {' < '.join(o.ours)}; swapped: {flips}.")
            blocks.append(P([line]))
        pub = ap.published
        blocks.append(P(["Published figures: " + pub.citation() + "."]))
        if ap.differences:
            blocks.append(UL([[f"differs: {d}"] for d in ap.differences]))
    return blocks


def _protocols(a: Analysis) -> list:
    return _protocol_blocks(list(a.tables), a.meta)


def _bias_test(a: Analysis) -> list:
    return _bias_test_blocks(a.pc)


def _bias_variance(a: Analysis) -> list:
    bv = plots.bias_variance(a.pc, a.style, a.fdir)
    if not bv:
        return []
    return [H(2, "Bias vs variance"), P([BIAS_VARIANCE_TEXT]),
            Img(bv[0], "Measured bias vs variance per task (log axes); black bars: each "
                       "estimator's noise floor")]


def _time_per_step(a: Analysis) -> list:
    bars = plots.step_time_bars(a.pc, a.style, a.fdir)
    if not bars:
        return []
    return [H(2, "Time per step"), Img(bars[0], "Training time per step (ms), 95% CI over seeds")]


def _tasks_own(a: Analysis) -> list:
    cells = a.cells
    return _task_blocks(cells[cells.status == "ok"] if "status" in cells else cells, a.board)


def _problems(a: Analysis) -> list:
    prob = _problem_cells(a.cells)
    return [H(2, "Failed, diverged and infeasible cells"),
            prob if prob is not None else P(["None: every cell finished."])]


#: report.md's sections, in order: adding a section is one function of the analysis and one entry
SECTIONS = [_overview, _against_published, _at_a_glance, _leaderboard, _across_tasks, _results_per_task, _protocols,
            _bias_test, _bias_variance, _time_per_step, _tasks_own, _problems]


# ---- a probe's report: gradient quality at shared parameters (estbench probe) --------------------
@dataclass
class ProbeAnalysis:
    """What a probe folder's report shows, computed once from its records (finished cells only):
    the shared-parameter table, leaderboard and stability (:mod:`estbench.analysis.probe`)."""

    run_dir: Path
    out: Path
    meta: dict
    records: pd.DataFrame
    cells: pd.DataFrame
    table: pd.DataFrame
    board: pd.DataFrame
    stability: pd.DataFrame
    style: "plots.Style"
    ranked: Optional[str] = None

    @property
    def fdir(self) -> Path:
        return self.out / "figures"


#: what the shared-parameter view measures, said at the top of its section (and in the README)
SHARED_TEXT = (
    "Every estimator measured at the same parameters: the snapshots of one training trajectory "
    "of each task (its driver's), with the same measurement batch and reference gradient at each "
    "snapshot, so no estimator is judged where its own training took the model. No training: "
    "the figures are those of one gradient estimate (M estimates per snapshot, batched). The "
    "trajectory view of a training run measures each estimator along its own trajectory instead, "
    "which mixes where an estimator drives the model with how well it estimates there. Ranks: the "
    "leaderboard's rules with the snapshots as the paired blocks (seeds in a training run's "
    "leaderboard): a paired t-test over the snapshots for every pair, Holm-corrected; an "
    "estimator's rank is 1 + those significantly better, and variance and error x f-evaluations "
    "rank only the estimators the bias test does not find biased in most snapshots.")


def analyse_probe(run_dir, out_dir=None) -> ProbeAnalysis:
    from estbench.analysis import probe as pv

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    records, cells = store.load(run_dir)
    if records.empty:
        raise ValueError(f"no results in {run_dir} (no cell records under {run_dir / 'cells'})")
    meta, _ = store.meta_status(run_dir)
    records = store.finished(records, cells)
    all_est = set(records.estimator) | (set(cells.estimator) if not cells.empty else set())
    st = pv.stability(records)
    st = st[st.estimators > 0].reset_index(drop=True)
    return ProbeAnalysis(run_dir, out, meta, records, cells, pv.table(records, cells),
                         pv.board(records), st, plots.Style(all_est))


def _set_lines(meta: dict) -> list:
    """One item per snapshot set of a probe: task, driver and why, seed, steps."""
    from estbench.engine import snapshots

    items = []
    for s in meta.get("snapshot_sets", []):
        why = ""
        try:
            why = snapshots.load(s["path"]).manifest.get("driver_why", "")
        except (snapshots.SnapshotError, KeyError, TypeError):
            pass
        items.append([("code", str(s.get("task"))), f": driver {s.get('driver')}, seed "
                      f"{s.get('seed')}, snapshots at steps {', '.join(map(str, s.get('steps', [])))}"
                      + (f" (why this driver: {why})" if why else "")])
    return items


def _at_shared_parameters(a: ProbeAnalysis) -> list:
    from estbench.analysis import probe as pv

    blocks = [H(2, "At shared parameters"), P([SHARED_TEXT])]
    sets = _set_lines(a.meta)
    if sets:
        blocks += [P(["The snapshot sets:"]), UL(sets)]
    header = ["estimator"] + [h for _, h, _, _ in pv.COLUMNS]
    for (task, device), df in a.table.groupby(["task", "device"], sort=True):
        rows = []
        ordered = df.assign(_o=[a.style.is_oracle(e) for e in df.estimator]).sort_values(
            ["_o", "grad_error"], na_position="last")
        best = ordered[~ordered._o].grad_error.min()
        for _, r in ordered.iterrows():
            row = [(r.estimator + (" (oracle)" if r._o else ""), False)]
            for name, _, _, spec in pv.COLUMNS:
                v = r[name]
                text = "-" if isinstance(v, float) and math.isnan(v) else (
                    format(v, spec) if spec else str(v))
                row.append((text, name == "grad_error" and not r._o and v == best))
            rows.append(row)
        on = f" [{device}]" if a.table.device.nunique() > 1 else ""
        blocks += [H(3, task + on), Table(header, rows, align="l" + "r" * (len(header) - 1))]
        fig = plots.shared_parameter_curves(a.records[a.records.device == device], task, a.style,
                                            a.fdir)
        if fig:
            blocks.append(Img(fig[0], f"{task}: gradient error, variance, cosine and SNR at each "
                                      "snapshot, every estimator at the same parameters"))
    blocks.append(P(["Grad error, variance and SNR: geometric means over the snapshots; cosine: "
                     "the mean cosine of one estimate to the reference; cos(mean): the cosine of "
                     "the mean of many estimates to the exact gradient w.r.t. the distribution's "
                     "parameters, the estimated term only, where the snapshot set asks for it "
                     "(the ReinMax reproduction's figure: the direction of the bias); bias test: biased when "
                     "more than half of the snapshots reject 'unbiased' at 0.01; ms/est: median "
                     "seconds per estimate (batched); f-evals: per data point per estimate, "
                     "counted by the harness; options: the estimator's defaults, those its task's "
                     "protocol tunes, or given."]))
    blocks += [H(3, "Leaderboard at shared parameters")]
    for crit in lb.CRITERIA:
        t = _rank_table(a.board, crit.name)
        if t is None:
            continue
        blocks += [P([("b", f"By {crit.title}.")]), t]
        s = _stability_table(a.stability, crit.name, blocks="snapshots")
        if s is not None:
            blocks += [P(["Does the order survive resampling the snapshots? (The leaderboard's "
                          "stability rule: stable when the median Kendall tau over bootstrap "
                          "resamples of the snapshots is at least 0.8 and the leader stays first in "
                          "90% of them; at least 5 snapshots to say.)"]), s]
    return blocks


def _probe_overview(a: ProbeAnalysis) -> list:
    n = len(a.cells)
    status = a.cells.status.value_counts().to_dict() if n else {}
    return [UL(_meta_items(a.meta, a.run_dir)),
            P([f"{n} probe cells ({', '.join(f'{v} {k}' for k, v in sorted(status.items()))}); "
               f"{a.records.task.nunique()} tasks, {a.records.estimator.nunique()} estimators. "
               "Everything below is derived from the tidy records (", ("code", "cells/*.parquet"),
               "). Files: ", ("link", "shared_parameters.csv", "shared_parameters.csv"), ", ",
               ("link", "leaderboard.csv", "leaderboard.csv"), "."]),
            P(["Contents:"]), TOC()]


#: a probe report's sections, in order
PROBE_SECTIONS = [_probe_overview, _at_shared_parameters, _problems]


def write_probe_report(run_dir, out_dir=None) -> ProbeAnalysis:
    """The report of a probe folder (``estbench probe``): its files (shared_parameters.csv,
    leaderboard.csv, stability.csv), then report.md and report.html from :data:`PROBE_SECTIONS`."""
    a = analyse_probe(run_dir, out_dir)
    a.out.mkdir(parents=True, exist_ok=True)
    for old in [*a.fdir.glob("*.png"), *a.fdir.glob("*.svg")]:
        old.unlink()
    a.table.to_csv(a.out / "shared_parameters.csv", index=False)
    a.board.to_csv(a.out / "leaderboard.csv", index=False)
    a.stability.to_csv(a.out / "stability.csv", index=False)
    _write_document(a, f"estbench probe report: {a.run_dir.name}", PROBE_SECTIONS)
    return a


def _write_document(a, title: str, sections) -> None:
    """report.md and report.html of an analysis, from its sections in order."""
    doc = Document(title)
    for section in sections:
        doc.add(*section(a))
    (a.out / "report.md").write_text(doc.markdown(a.out))
    (a.out / "report.html").write_text(doc.html(a.out))


def is_probe(run_dir) -> bool:
    """Whether a results folder holds a probe (``estbench probe``) rather than training cells."""
    meta, _ = store.meta_status(Path(run_dir))
    return meta.get("budget") == "probe"


def write_report(run_dir, out_dir=None) -> Analysis:
    """Write the report of a run folder and return its analysis: the analysis (:func:`analyse`),
    its files (:func:`write_files`), then report.md and report.html from :data:`SECTIONS` in
    order; a probe folder gets its own report (:func:`write_probe_report`).  Raises
    FileNotFoundError for a missing folder and ValueError for a folder without records."""
    if Path(run_dir).is_dir() and is_probe(run_dir):
        return write_probe_report(run_dir, out_dir)
    a = analyse(run_dir, out_dir)
    write_files(a)
    _write_document(a, f"estbench report: {a.run_dir.name}", SECTIONS)
    return a


def build_report(run_dir, out_dir=None) -> Path:
    """Write the report of a run folder (:func:`write_report`); the path of its ``report.md``."""
    return write_report(run_dir, out_dir).out / "report.md"
