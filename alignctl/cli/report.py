"""Look at finished work: `alignctl runs [DIR]` (a table of runs) and `alignctl report DIR`
(PNG curves per stage and the held-out accuracy after each stage, printed and written to report.md).

Everything here reads run directories only (lineage.json, metrics.jsonl, eval.json): no model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from alignctl.core.errors import UserError
from alignctl.runs.runfiles import DamagedFile, read_json, read_lineage, read_metrics, recorded_overrides

# Curves drawn for a stage, when its metrics.jsonl has them (train lines, then eval lines).
CURVES = ("loss", "reward", "objective/kl", "rewards/margins", "accuracy", "eval_exact_match", "eval_accuracy", "eval_reward")
# The one number that says how good a stage's model is, by what its eval measured.
HEADLINE = ("eval_exact_match", "eval_accuracy")


def read_run(run_dir: Path) -> dict[str, Any]:
    """A run's lineage, metrics and final evaluation. A damaged file does not stop a listing of many
    runs: the run comes back marked broken (status "broken", `error` naming the file), metrics-less."""
    try:
        lineage = read_lineage(run_dir)
        records = read_metrics(run_dir / "metrics.jsonl")
        eval_file = run_dir / "eval.json"
        final = read_json(eval_file) if eval_file.exists() else {}
    except DamagedFile as err:
        stage = _stage_of(run_dir)
        return {"dir": run_dir, "lineage": {"stage": stage, "status": "broken"}, "records": [], "eval": {}, "error": str(err)}
    return {"dir": run_dir, "lineage": lineage, "records": records, "eval": final}


def _stage_of(run_dir: Path) -> str:
    """The stage of a run whose lineage may be unreadable: from lineage.json if it parses, else '?'."""
    try:
        return str(read_lineage(run_dir).get("stage", "?"))
    except DamagedFile:
        return "?"


def _started(run_dir: Path) -> str:
    try:
        return str(read_lineage(run_dir).get("started_at", ""))
    except DamagedFile:
        return ""  # a broken run sorts first; it is listed, not skipped


def find_runs(root: Path) -> list[Path]:
    """Run directories under `root` (its own, if it is one), oldest first; links to runs are not followed twice."""
    if not root.exists():
        raise UserError(f"{root}: no such directory")
    found = {p.parent.resolve() for p in root.rglob("lineage.json") if "eval" not in p.parent.parent.name}
    return sorted(found, key=_started)


def _fmt(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, float) else "-"


def _headline(run: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """(metric name, value at step 0, final value) of the stage's headline eval metric."""
    evals = [r for r in run["records"] if any(k in r for k in HEADLINE)]
    for key in HEADLINE:
        if key in run["eval"]:
            first = next((r[key] for r in evals if r.get("step") == 0 and key in r), None)
            return key, first, run["eval"][key]
    return "", None, None


def accuracy_rows(runs: list[tuple[str, dict[str, Any], bool]]) -> list[tuple[str, str, str, str, str]]:
    """(stage, metric, before, after, run) per (name, read_run(...), cached), led by the model the
    first stage started from."""
    rows = []
    for index, (name, run, cached) in enumerate(runs):
        metric, before, after = _headline(run)
        if index == 0 and metric == "eval_exact_match":
            rows.append(("(starting model)", metric.removeprefix("eval_"), "", _fmt(before), ""))
        broken = ", broken" if "error" in run else ""
        stopped = f", guard stop at step {run['lineage']['guard_stop']['step']}" if "guard_stop" in run["lineage"] else ""
        label = f"{name} ({run['lineage'].get('stage', '?')}{', cached' if cached else ''}{broken}{stopped})"
        rows.append((label, metric.removeprefix("eval_"), _fmt(before), _fmt(after), run["dir"].name))
    return rows


def accuracy_table(title: str, stages: list[tuple[str, Path, bool]], runs: list[tuple[str, dict[str, Any], bool]] | None = None) -> Table:
    """Held-out accuracy after each stage (name, run dir, cached), starting from the model the first stage started from."""
    table = Table(title=f"pipeline {title}: held-out accuracy after each stage", header_style="bold")
    for column in ("stage", "metric", "before", "after", "run"):
        table.add_column(column, justify="right" if column in ("before", "after") else "left")
    for row in accuracy_rows(runs or [(name, read_run(run_dir), cached) for name, run_dir, cached in stages]):
        table.add_row(*row)
    return table


def run_records(root: Path, sort: str | None = None, ascending: bool = False) -> list[dict[str, Any]]:
    """Every run under `root` as a record (what `alignctl runs` shows, and `--json` prints); with
    `sort`, ranked by that final metric (eval.json, else the last train value), best first, each with
    its command-line overrides (what a sweep varied)."""
    records = []
    for run_dir in find_runs(root):
        run = read_run(run_dir)
        lineage = run["lineage"]
        metric, _, after = _headline(run)
        try:
            name = str(run_dir.relative_to(root.resolve()))
        except ValueError:
            name = str(run_dir)
        record = {"run": name, "stage": lineage.get("stage", "?"), "status": "broken" if "error" in run else lineage.get("status", "?"),
                  "parents": {role: p["run_dir"] for role, p in lineage.get("parents", {}).items()},
                  "headline": {metric.removeprefix("eval_"): after} if metric else {}, "steps": run["eval"].get("step")}
        if "error" in run:  # a damaged file: say which, keep listing the others
            record["error"] = run["error"]
        if "guard_stop" in lineage:  # recipe.guard=stop ended it early: where, and the guard's line
            record["guard_stop"] = lineage["guard_stop"]
        if sort:
            record[sort] = run["eval"].get(sort, lineage.get("final_metrics", {}).get(sort))
            record["overrides"] = _overrides(run_dir)
        records.append(record)
    if sort:
        if all(r[sort] is None for r in records):
            raise UserError(f"runs --sort {sort}: no run under {root} has that metric (e.g. eval_exact_match, eval_loss, loss)")
        known = sorted((r for r in records if r[sort] is not None), key=lambda r: r[sort], reverse=not ascending)
        records = known + [r for r in records if r[sort] is None]
    return records


def runs_table(root: Path, sort: str | None = None, ascending: bool = False) -> Table:
    """`run_records` as a table."""
    table = Table(title=f"runs under {root}" + (f", ranked by {sort}" if sort else ""), header_style="bold")
    columns = ["run", "stage", "status", "parents", "headline", "steps"] + ([sort, "overrides"] if sort else [])
    for column in columns:
        table.add_column(column, overflow="fold")  # a run path must stay whole, even on a narrow terminal
    for r in run_records(root, sort, ascending):
        status = {"finished": "[green]finished[/]", "failed": "[red]failed[/]"}.get(r["status"], r["status"])
        if "error" in r:
            status = f"[red]broken[/]: {escape(r['error'])}"
        if "guard_stop" in r:
            status += f" [yellow](guard stop at step {r['guard_stop']['step']})[/]"
        parents = ", ".join(f"{role}: {Path(p).name}" for role, p in r["parents"].items()) or "-"
        headline = " ".join(f"{k} {_fmt(v)}" for k, v in r["headline"].items()) or "-"
        row = [r["run"], r["stage"], status, parents, headline, "-" if r["steps"] is None else str(r["steps"])]
        if sort:
            row += ["-" if r[sort] is None else f"{r[sort]:.4g}", escape(r["overrides"])]
        table.add_row(*row)
    return table


def _overrides(run_dir: Path) -> str:
    try:
        return " ".join(recorded_overrides(run_dir, without=("hydra.", "resume=")))
    except DamagedFile as err:
        return f"(broken: {err})"


def plot_run(run: dict[str, Any], out: Path) -> Path | None:
    """One PNG with a panel per curve the run logged; None when it logged none."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    present = [key for key in CURVES if any(key in r for r in run["records"])]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.0), squeeze=False)
    for ax, key in zip(axes[0], present):
        points = [(r["step"], r[key]) for r in run["records"] if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if key.startswith("eval_") else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run['lineage']['stage']}: {run['dir'].name}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_accuracy(rows: list[tuple[str, float]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.2))
    bars = ax.bar([r[0] for r in rows], [100 * r[1] for r in rows], color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f %%")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(root: Path) -> tuple[Table, list[Path]]:
    """Plots and report.md for the latest run of each stage of a pipeline directory (or every run under DIR)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("alignctl report draws with matplotlib: pip install 'alignctl[report]'") from None
    links = [p for p in root.iterdir() if p.is_symlink() and (p / "lineage.json").exists()] if root.is_dir() else []
    runs = [(link.name, read_run(link.resolve()), False) for link in links] or [(p.name, read_run(p), False) for p in find_runs(root)]
    if not runs:
        raise UserError(f"{root}: no alignctl runs found (no lineage.json)")
    runs.sort(key=lambda item: str(item[1]["lineage"].get("started_at", "")))  # the order the stages ran in
    for name, run, _ in runs:
        if "error" in run:
            from alignctl.core.console import console

            console.print(f"[red]{escape(name)}: broken[/]: {escape(run['error'])}")
    out = root / "report"
    out.mkdir(exist_ok=True)
    files = [f for name, run, _ in runs if (f := plot_run(run, out / f"{name}.png"))]
    accuracy = []
    for name, run, _ in runs:
        metric, before, after = _headline(run)
        if metric == "eval_exact_match":
            if not accuracy and before is not None:
                accuracy.append(("start", before))
            accuracy.append((name, after))
    if accuracy:
        files.append(plot_accuracy(accuracy, out / "accuracy.png"))
    rows = accuracy_rows(runs)
    table = accuracy_table(root.name, [], runs)
    lines = ["| stage | metric | before | after | run |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *(f"![{f.stem}]({f.name})" for f in files)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return table, files


def runs_command(args: list[str]) -> None:
    """`alignctl runs [DIR] [--sort METRIC [--ascending]] [--json]`."""
    from alignctl.core.console import console

    ascending, as_json = "--ascending" in args, "--json" in args
    args = [a for a in args if a not in ("--ascending", "--json")]
    sort = None
    if "--sort" in args:
        at = args.index("--sort")
        if at + 1 >= len(args):
            raise UserError("runs --sort needs a metric name: alignctl runs DIR --sort eval_exact_match")
        sort = args[at + 1]
        args = args[:at] + args[at + 2 :]
    unknown = [a for a in args if a.startswith("-")]
    if unknown or len(args) > 1:
        raise UserError(f"runs: unexpected {' '.join(unknown or args[1:])}; usage: alignctl runs [DIR] [--sort METRIC [--ascending]] [--json]")
    root = Path(args[0] if args else "runs")
    if as_json:  # for scripts: one JSON list on stdout
        print(json.dumps(run_records(root, sort, ascending), indent=2))
        return
    console.print(runs_table(root, sort, ascending))


def report_command(args: list[str]) -> None:
    """`alignctl report DIR`."""
    from alignctl.core.console import console

    if len(args) != 1:
        raise UserError("report needs one directory: alignctl report runs/pipelines/<name> (or any directory of runs)")
    table, files = write_report(Path(args[0]))
    console.print(table)
    for file in files:
        console.print(f"wrote {file}")
