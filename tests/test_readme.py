"""The README's example estimator works verbatim: it registers, and passes the unbiasedness check."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

import estimators

from estbench.engine.problems import Z_TOL, estimates, problem, z_scores

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_readme_example_estimator_works_verbatim():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "class " in b and "Estimator" in b)
    namespace: dict = {}
    try:
        exec(compile(example, "README.md", "exec"), namespace)
        name = "half_mean_baseline"
        assert name in estimators.available()
        est = estimators.get(name, weight="0.5")
        torch.manual_seed(0)
        for fam in ["bernoulli", "categorical", "gaussian"]:
            G, e = estimates(est, problem(fam, offset=10.0), 4000, 4)
            z, _ = z_scores(G, problem(fam, offset=10.0).exact)
            assert z.abs().max() < Z_TOL
    finally:
        estimators.unregister("half_mean_baseline")


def test_readme_names_exactly_two_setup_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    setup = text.split("## Set up and run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [l.split("#")[0].strip() for l in setup.strip().splitlines()]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_and_docs_relative_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists (and a heading of it,
    where the link has an anchor)."""
    broken = []
    for page in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.is_file() and target.suffix == ".md" and anchor not in {
                    _slug(h) for h in re.findall(r"^#+ (.*)$", target.read_text(), re.M)}:
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, broken


def test_the_docs_copy_of_what_each_ranking_measures_is_the_code_s():
    """Each criterion's meaning is written once, in leaderboard.CRITERIA; docs/methodology.md keeps a
    verbatim copy between markers, which must not drift from it."""
    from estbench.analysis import leaderboard

    text = (README.parent / "docs" / "methodology.md").read_text()
    copy = text.split("tests/test_readme.py checks this copy -->\n", 1)[1].split("\n<!-- criteria: end -->", 1)[0]
    assert copy == leaderboard.criteria_markdown(), (
        "docs/methodology.md's list of criteria differs from leaderboard.CRITERIA: paste "
        "python -c 'from estbench.analysis import leaderboard; print(leaderboard.criteria_markdown())'")


def test_the_readme_table_against_the_published_figures_is_the_committed_sets():
    """Derived, never typed: the README's table is what results/published_table.py reads from the
    committed sets' against_published.csv."""
    sys.path.insert(0, str(ROOT / "results"))
    try:
        import published_table
    finally:
        sys.path.pop(0)
    readme = (ROOT / "README.md").read_text()
    assert published_table.readme_block(readme) == published_table.table(ROOT)
    assert "`paper/sst_rationales`" in published_table.table(ROOT)


def _results_script(name):
    sys.path.insert(0, str(ROOT / "results"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_the_readme_cosines_beside_the_published_are_the_committed_probe():
    """Derived, never typed: results/published_cosine.py over the committed probe of
    results/paper/reinmax_cosine_8x4 and the published per-seed CSV."""
    published_cosine = _results_script("published_cosine")
    readme = (ROOT / "README.md").read_text()
    table = published_cosine.table(ROOT)
    assert published_cosine.readme_block(readme) == table
    # every method the source scored, at the three epochs of the committed snapshots
    assert len(table.splitlines()) == 2 + 5 * 3


def test_the_readme_probe_agreement_tables_are_the_committed_probes():
    """Derived, never typed: results/probe_agreement.py over results/probe, the driver-neutrality
    probe and results/reference."""
    agreement = _results_script("probe_agreement")
    readme = (ROOT / "README.md").read_text()
    assert agreement.readme_block(readme) == agreement.report(ROOT)
    neutral = agreement.driver_neutrality(ROOT)
    assert set(neutral.task) == {"toy_binary", "toy_categorical"}
    assert neutral.tau.notna().all()


def test_readme_says_what_every_tasks_quick_budget_is():
    """Every registered task has a row in the README's quick-budget table, and the row's steps,
    f-evaluations and measurements are the task's declared quick budget (a task added later
    needs its row)."""
    import tasks
    from estbench.engine.sweep import task_budget

    text = README.read_text()
    table = text.split("## The quick budget, task by task", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for name in tasks.available():
        [row] = [r for r in rows if f"`{name}`" in r.split("|")[1]]
        b = task_budget(tasks.get(name), "quick")
        assert f"{b.steps} steps" in row, (name, row)
        assert f"{b.n_samples} f-evals" in row, (name, row)
        assert f"{b.checkpoints} x {b.measure_samples}" in row, (name, row)


def test_quick_budget_check_reads_the_committed_reference(capsys):
    """results/quick_budget_check.py runs on the committed evidence (the reference's curves before
    #23 cut the budgets) and prints the README's tau."""
    sys.path.insert(0, str(ROOT / "results"))
    import quick_budget_check

    assert quick_budget_check.main(["--tasks", "binary_vae"]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[0] == "binary_vae" and row.split()[-1] == "0.87"
    assert "0.87 `binary_vae`" in README.read_text()
