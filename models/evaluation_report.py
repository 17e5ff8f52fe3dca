"""The report of an evaluation (`tagstream evaluate`): one per run, the models side by side.

`write_report` writes, into one folder:

- ``report.md`` and ``report.html``: the same content, built once as blocks (headings,
  paragraphs, tables, plots). The HTML page is self-contained (the plots inlined as
  ``data:`` URIs, no script, no request) and every piece of text in it is escaped: class
  names, paths and model ids come from files a user did not necessarily write;
- ``report.json``: every number of the report, and what it was computed on;
- PNG plots (models/plots.py): per model the confusion matrix and the reliability
  diagram, and for all models the latency per stage and the throughput over time;
- ``photos-mN.jsonl``: per model, each photo's truth and outcome, for digging in.

The first model is the baseline: every other one is shown with its deltas against it.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation import Accounting, AccuracyTable, StageLatency
from models.manifest import Manifest
from models.plots import bar_chart_png, confusion_matrix_png, line_chart_png, reliability_png


@dataclass
class ModelRun:
    """One model's pass over the replay, and what came of it."""

    folder: Path
    manifest: Manifest
    size_bytes: int
    run_id: str
    accounting: Accounting
    table: AccuracyTable
    latencies: list[StageLatency]
    throughput_width_s: float
    throughput: list[tuple[float, float]]
    busy_images: int
    busy_rate: float  # images per busy second
    replay_counts: dict[str, int] = field(default_factory=dict)
    waited_s: float = 0.0  # after the replay, for the last outcomes

    def stage(self, name: str) -> StageLatency:
        return next(s for s in self.latencies if s.stage.name == name)


@dataclass
class Evaluation:
    """A whole evaluation: what was replayed, how, against which truth, and each model."""

    version: str
    created_at: str
    input: dict[str, Any]  # kind, where, bounds, hashes, tweets, not_tweets
    speed: str
    truth: str  # where the truth came from, in words
    truth_kind: str  # "labels" or "rules"
    admission: str  # how the run admitted, in words
    admission_kind: str  # "none" (nothing shed for load) or "configured"
    broker: str
    settings: dict[str, Any]
    runs: list[ModelRun]
    wait_s: float = 0.0


# Blocks: the report's content, rendered to Markdown and HTML alike ---------------------


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str = ""  # per column: "l" or "r"; default: first left, the rest right


#: ("h1" | "h2" | "h3" | "p", text), ("ul", items), ("table", Table) or ("img", (file, alt)).
Block = tuple[str, Any]


def _num(value: float, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _ms(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def _delta(value: float, base: float, digits: int = 4, *, pct: bool = False) -> str:
    if not (math.isfinite(value) and math.isfinite(base)):
        return ""
    if pct:
        return f" ({(value / base - 1) * 100:+.1f}%)" if base else ""
    return f" ({value - base:+.{digits}f})"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def model_label(n: int, run: ModelRun) -> str:
    return f"m{n} {run.manifest.name}"


def _models_table(ev: Evaluation) -> Table:
    base = ev.runs[0]
    header = [""] + [model_label(n, r) for n, r in enumerate(ev.runs, start=1)]

    def row(name: str, cell) -> list[str]:
        return [name] + [cell(r, n == 0) for n, r in enumerate(ev.runs)]

    def with_delta(get, digits=4, pct=False):
        def cell(r: ModelRun, first: bool) -> str:
            value = get(r)
            text = _num(value, digits) if not pct else f"{value:.1f}"
            return text if first else text + _delta(value, get(base), digits, pct=pct)

        return cell

    rows = [
        row("folder", lambda r, f: f"`{r.folder}`"),
        row("precision", lambda r, f: r.manifest.precision),
        row(
            "size",
            lambda r, f: (
                _mb(r.size_bytes) + ("" if f else _delta(r.size_bytes, base.size_bytes, pct=True))
            ),
        ),
        row("sha256", lambda r, f: r.manifest.sha256[:16]),
        row("input", lambda r, f: f"{r.manifest.input_size}px, {len(r.manifest.classes)} classes"),
        row("images/s while busy", with_delta(lambda r: r.busy_rate, pct=True)),
        row("top-1 accuracy", with_delta(lambda r: r.table.top1)),
        row("micro F1 (hashtags)", with_delta(lambda r: r.table.micro[2])),
        row("macro F1 (hashtags)", with_delta(lambda r: r.table.macro[2])),
        row("calibration error (ECE)", with_delta(lambda r: r.table.ece)),
        row(
            "end to end p50 / p99 ms",
            lambda r, f: f"{_ms(r.stage('end to end').p50)} / {_ms(r.stage('end to end').p99)}",
        ),
        row(
            "photos judged / classified / in",
            lambda r, f: f"{r.table.photos} / {r.accounting.results} / {r.accounting.photos}",
        ),
    ]
    return Table(header, rows)


def _ranking(ev: Evaluation) -> str:
    if len(ev.runs) < 2:
        return ""

    def key(i: int) -> tuple[float, float]:
        return (-round(ev.runs[i].table.top1, 12), -round(ev.runs[i].table.micro[2], 12))

    order = sorted(range(len(ev.runs)), key=lambda i: (key(i), i))
    text = model_label(order[0] + 1, ev.runs[order[0]])
    for before, i in zip(order, order[1:], strict=False):
        text += (" = " if key(i) == key(before) else " > ") + model_label(i + 1, ev.runs[i])
    return f"Ranked by top-1 accuracy, then micro F1: {text}."


def _accuracy_blocks(n: int, run: ModelRun) -> list[Block]:
    t = run.table
    blocks: list[Block] = [("h3", f"{model_label(n, run)}")]
    if not t.photos:
        blocks.append(("p", "No classified photo has a truth: no accuracy table."))
        return blocks
    micro, macro = t.micro, t.macro
    blocks.append(
        (
            "p",
            f"Top-1 accuracy {_num(t.top1)} ({t.top1_correct} of {t.photos} photos); "
            f"micro F1 {_num(micro[2])}, macro F1 {_num(macro[2])}; "
            f"expected calibration error {_num(t.ece)}"
            + (
                f"; {t.unlabelled} classified photo{'s' if t.unlabelled > 1 else ''} had no truth"
                if t.unlabelled
                else ""
            )
            + ".",
        )
    )
    rows = [
        [
            r.hashtag,
            _num(r.precision),
            _num(r.recall),
            _num(r.f1),
            str(r.support),
            str(r.predicted),
        ]
        for r in t.rows
    ]
    rows.append(["micro avg", *(_num(v) for v in micro), str(sum(r.support for r in t.rows)), ""])
    rows.append(["macro avg", *(_num(v) for v in macro), "", ""])
    blocks.append(
        ("table", Table(["hashtag", "precision", "recall", "F1", "support", "served"], rows))
    )
    blocks.append(("img", (f"confusion-m{n}.png", f"confusion matrix of {model_label(n, run)}")))
    blocks.append(("img", (f"reliability-m{n}.png", f"reliability of {model_label(n, run)}")))
    return blocks


def _f1_side_by_side(ev: Evaluation) -> list[Block]:
    if len(ev.runs) < 2:
        return []
    names = list(dict.fromkeys(r.hashtag for run in ev.runs for r in run.table.rows))
    if not names:
        return []
    by_run = [{r.hashtag: r for r in run.table.rows} for run in ev.runs]
    header = ["hashtag", "support"] + [f"F1 m{n}" for n in range(1, len(ev.runs) + 1)]
    rows = []
    for name in sorted(names):
        support = next((b[name].support for b in by_run if name in b), 0)
        base = by_run[0][name].f1 if name in by_run[0] else 0.0
        cells = []
        for n, b in enumerate(by_run):
            f1 = b[name].f1 if name in b else 0.0
            cells.append(_num(f1) + ("" if n == 0 else _delta(f1, base)))
        rows.append([name, str(support), *cells])
    return [("h3", "F1 per hashtag, side by side"), ("table", Table(header, rows))]


def _latency_blocks(ev: Evaluation) -> list[Block]:
    rows = []
    multi = len(ev.runs) > 1
    for i, stage in enumerate(ev.runs[0].latencies):
        for n, run in enumerate(ev.runs, start=1):
            s = run.latencies[i]
            rows.append(
                [
                    stage.stage.name if n == 1 else "",
                    *([f"m{n}"] if multi else []),
                    str(s.count),
                    _ms(s.p50),
                    _ms(s.p90),
                    _ms(s.p99),
                    _ms(s.max),
                    stage.stage.spans if n == 1 else "",
                ]
            )
    header = ["stage", *(["model"] if multi else []), "n", "p50", "p90", "p99", "max", "spans"]
    align = "l" + ("l" if multi else "") + "rrrrrl"
    return [
        ("h2", "Latency per stage (ms)"),
        (
            "p",
            "From the timestamps every result carries (epoch ms, stamped by each stage); "
            "percentiles interpolate linearly between ranks. Latencies vary from run to "
            "run; the accuracy table does not.",
        ),
        ("table", Table(header, rows, align)),
        ("img", ("latency.png", "latency per stage, p50 and p99, per model")),
        ("h2", "Throughput"),
        (
            "p",
            "Results per second by the time each was produced, from the replay's first "
            "tweet: "
            + "; ".join(
                f"m{n} {run.accounting.results} results in "
                f"{_span_s(run):.1f} s, buckets of {run.throughput_width_s:g} s"
                for n, run in enumerate(ev.runs, start=1)
            )
            + ".",
        ),
        ("img", ("throughput.png", "throughput over time, per model")),
    ]


def _span_s(run: ModelRun) -> float:
    return run.throughput[-1][0] + run.throughput_width_s / 2 if run.throughput else 0.0


def _accounting_blocks(ev: Evaluation) -> list[Block]:
    header = ["", *(f"m{n}" for n in range(1, len(ev.runs) + 1))]
    accs = [r.accounting for r in ev.runs]

    def row(name: str, get) -> list[str]:
        return [name, *(str(get(a)) for a in accs)]

    rows = [row("tweets in", lambda a: a.tweets_in)]
    if any(a.not_tweets for a in accs):
        rows.append(row("input lines that were no tweet", lambda a: a.not_tweets))
    rows += [
        row("photos", lambda a: a.photos),
        row("results", lambda a: a.results),
    ]
    if any(a.cached for a in accs):
        rows.append(row("  of which cached", lambda a: a.cached))
    if any(a.deletes for a in accs):
        rows.append(row("deletions", lambda a: a.deletes))
    if any(a.retracted for a in accs):
        rows.append(row("photos retracted", lambda a: a.retracted))
    for reason in sorted({r for a in accs for r in a.shed_tweets}):
        rows.append(row(f"tweets shed: {reason}", lambda a, r=reason: a.shed_tweets[r]))
    rows.append(row("photos shed with their tweet", lambda a: a.shed_photos))
    for stage in sorted({s for a in accs for s in a.dead_letters}):
        rows.append(row(f"dead letters: {stage}", lambda a, s=stage: a.dead_letters[s]))
    for kind in sorted({k for a in accs for k in a.duplicates}):
        rows.append(row(f"duplicates: {kind}", lambda a, k=kind: a.duplicates[k]))
    rows.append(row("missing", lambda a: a.missing))
    blocks: list[Block] = [
        ("h2", "Accounting"),
        (
            "p",
            "Every tweet taken in ends as a shed record, a result or a dead letter per "
            "photo (a deletion as a retraction); repeats of a record (at-least-once "
            "delivery) are duplicates.",
        ),
        ("table", Table(header, rows)),
    ]
    for n, run in enumerate(ev.runs, start=1):
        a = run.accounting
        if a.missing:
            shown = [*a.missing_tweets, *a.missing_photos]
            more = f" and {len(shown) - 50} more (report.json)" if len(shown) > 50 else ""
            blocks.append(
                (
                    "p",
                    f"m{n}: missing after waiting {run.waited_s:.0f} s: "
                    + ", ".join(shown[:50])
                    + more,
                )
            )
    if not any(a.missing for a in accs):
        blocks.append(("p", "Nothing missing: every tweet and photo is accounted for."))
    return blocks


def blocks_of(ev: Evaluation) -> list[Block]:
    """The report's content, once, for every format."""
    inp = ev.input
    where = (
        f"archive `{inp['where']}` (sha256 {inp.get('sha256', '')[:16]})"
        if inp["kind"] == "archive"
        else f"topic `{inp['where']}`"
    )
    bounds = ""
    if inp.get("from") is not None or inp.get("to") is not None:
        bounds = f", from {inp.get('from', 'the start')} to {inp.get('to', 'the end')}"
    blocks: list[Block] = [
        ("h1", "tagstream evaluation"),
        (
            "ul",
            [
                f"tagstream {ev.version}, {ev.created_at}, broker: {ev.broker}",
                f"input: {where}{bounds}: {inp['tweets']} tweets "
                f"(sha256 of the tweets {inp['tweets_sha256'][:16]})"
                + (f", {inp['not_tweets']} lines that are no tweet" if inp["not_tweets"] else ""),
                f"replayed at {ev.speed}, once per model, each under its own run id on "
                "fresh topics",
                f"truth: {ev.truth}",
                f"admission: {ev.admission}",
                "waited for the last outcomes up to "
                f"{ev.wait_s:g} s without a new one after each replay",
            ],
        ),
        ("h2", "Models side by side"),
        (
            "p",
            "The first model is the baseline; the others show their difference to it in "
            "brackets. images/s while busy: each consumer's batches, from their first "
            "image consumed to their last result produced.",
        ),
        ("table", _models_table(ev)),
    ]
    ranking = _ranking(ev)
    if ranking:
        blocks.append(("p", ranking))
    blocks.append(("h2", "Accuracy"))
    blocks.append(
        (
            "p",
            "Per hashtag: the hashtags served (the model's thresholds applied) against the "
            "truth, over the classified photos that have one. Top-1: the top class is one "
            "of the true classes (a photo with no hashtag: the no-hashtag class, e.g. "
            "others). Macro: the unweighted mean over the hashtags in the truth or "
            "served. Confusion matrix rows: the true class (the top class when right), "
            "columns: the top class. Reliability: the top score, in ten bins.",
        )
    )
    if ev.admission_kind == "configured":
        for n, run in enumerate(ev.runs, start=1):
            a = run.accounting
            coverage = a.results / a.photos if a.photos else 0.0
            blocks.append(
                (
                    "p",
                    f"m{n} coverage: {a.results} of {a.photos} photos classified "
                    f"({coverage:.1%}); accuracy is over what was classified.",
                )
            )
    for n, run in enumerate(ev.runs, start=1):
        blocks += _accuracy_blocks(n, run)
    blocks += _f1_side_by_side(ev)
    blocks += _latency_blocks(ev)
    blocks += _accounting_blocks(ev)
    settings_rows = [[k, f"`{v}`"] for k, v in sorted(ev.settings.items())]
    blocks += [
        ("h2", "Settings"),
        (
            "p",
            "Run ids: "
            + ", ".join(f"m{n} `{r.run_id}`" for n, r in enumerate(ev.runs, start=1))
            + ". Model sha256: "
            + ", ".join(f"m{n} `{r.manifest.sha256}`" for n, r in enumerate(ev.runs, start=1))
            + ".",
        ),
        ("table", Table(["setting", "value"], settings_rows, "ll")),
    ]
    return blocks


# Markdown ----------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {content}\n")
        elif kind == "p":
            out.append(f"{content}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in content) + "\n")
        elif kind == "table":
            align = content.align or "l" + "r" * (len(content.header) - 1)
            out.append("| " + " | ".join(_md_cell(h) for h in content.header) + " |")
            out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in content.rows)
            out.append("")
        elif kind == "img":
            file, alt = content
            out.append(f"![{alt}]({file})\n")
    return "\n".join(out)


# HTML --------------------------------------------------------------------------------

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; }
td.r { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f4; padding: 0 3px; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0.8em 0.8em 0; }
"""


def _inline(text: str) -> str:
    """Escaped text, with `code` spans as <code> (the only markup of the report's text)."""
    parts = text.split("`")
    return "".join(
        f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts)
    )


def to_html(blocks: Sequence[Block], folder: Path) -> str:
    """A self-contained page: plots read from `folder` and inlined as data: URIs."""
    body: list[str] = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(content)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(content)}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in content) + "</ul>")
        elif kind == "table":
            align = content.align or "l" + "r" * (len(content.header) - 1)
            head = "".join(f"<th>{_inline(h)}</th>" for h in content.header)
            rows = "".join(
                "<tr>"
                + "".join(
                    f'<td class="{a}">{_inline(c)}</td>' for c, a in zip(row, align, strict=False)
                )
                + "</tr>"
                for row in content.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            file, alt = content
            data = base64.b64encode((folder / file).read_bytes()).decode("ascii")
            body.append(
                f'<img alt="{html.escape(alt)}" title="{html.escape(alt)}" '
                f'src="data:image/png;base64,{data}">'
            )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>tagstream evaluation</title>"
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# JSON and plots ----------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON has no NaN: an undefined number is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def as_json(ev: Evaluation) -> dict[str, Any]:
    base = ev.runs[0]

    def deltas(run: ModelRun) -> dict[str, float]:
        return {
            "top1_accuracy": run.table.top1 - base.table.top1,
            "micro_f1": run.table.micro[2] - base.table.micro[2],
            "macro_f1": run.table.macro[2] - base.table.macro[2],
            "ece": run.table.ece - base.table.ece,
            "images_per_busy_s_ratio": run.busy_rate / base.busy_rate if base.busy_rate else None,
            "size_ratio": run.size_bytes / base.size_bytes if base.size_bytes else None,
        }

    return _finite(
        {
            "tagstream_version": ev.version,
            "created_at": ev.created_at,
            "input": ev.input,
            "speed": ev.speed,
            "truth": {"kind": ev.truth_kind, "description": ev.truth},
            "admission": {"kind": ev.admission_kind, "description": ev.admission},
            "broker": ev.broker,
            "wait_s": ev.wait_s,
            "settings": ev.settings,
            "models": [
                {
                    "label": f"m{n}",
                    "name": run.manifest.name,
                    "folder": str(run.folder),
                    "precision": run.manifest.precision,
                    "size_bytes": run.size_bytes,
                    "sha256": run.manifest.sha256,
                    "classes": run.manifest.classes,
                    "thresholds": run.manifest.thresholds,
                    "run_id": run.run_id,
                    "replay": run.replay_counts,
                    "images_busy": run.busy_images,
                    "images_per_busy_s": run.busy_rate,
                    "accuracy": run.table.as_dict(),
                    "latency": [s.as_dict() for s in run.latencies],
                    "throughput": {
                        "bucket_s": run.throughput_width_s,
                        "points": [list(p) for p in run.throughput],
                    },
                    "accounting": run.accounting.as_dict(),
                    "waited_s": run.waited_s,
                    "deltas_vs_m1": deltas(run) if n > 1 else None,
                }
                for n, run in enumerate(ev.runs, start=1)
            ],
        }
    )


def _plots(ev: Evaluation, folder: Path) -> None:
    for n, run in enumerate(ev.runs, start=1):
        t = run.table
        confusion_matrix_png(
            np.asarray(t.confusion, dtype=np.int64).reshape(len(t.labels), len(t.labels)),
            t.labels,
            folder / f"confusion-m{n}.png",
            title=f"{model_label(n, run)}: top class (columns) by true class (rows)",
        )
        reliability_png(
            [(b.low, b.high, b.count, b.confidence, b.accuracy) for b in t.bins],
            folder / f"reliability-m{n}.png",
            title=f"{model_label(n, run)}: reliability of the top score, ECE {_num(t.ece)}",
        )
    groups: dict[str, dict[str, float]] = {}
    for i, stage in enumerate(ev.runs[0].latencies):
        groups[stage.stage.name] = {}
        for n, run in enumerate(ev.runs, start=1):
            s = run.latencies[i]
            groups[stage.stage.name][f"m{n} p50"] = s.p50
            groups[stage.stage.name][f"m{n} p99"] = s.p99
    bar_chart_png(groups, folder / "latency.png", title="latency per stage", unit="ms")
    series = {f"m{n}": run.throughput for n, run in enumerate(ev.runs, start=1) if run.throughput}
    if not series:
        series = {"no results": [(0.0, 0.0)]}
    line_chart_png(
        series,
        folder / "throughput.png",
        title="results per second over time",
        x_label="seconds since the replay's first tweet",
        y_label="results/s",
    )


def _photos_jsonl(run: ModelRun, path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        for o in run.accounting.outcomes:
            r = o.result or {}
            line = {
                "tweet_id": o.tweet_id,
                "media_key": o.media_key,
                "url": o.url,
                "truth": sorted(o.truth) if o.truth is not None else None,
                "outcome": o.outcome,
                "reason": o.reason,
                "top_class": r.get("top_class"),
                "top_score": (r.get("scores") or {}).get(r.get("top_class")),
                "hashtags": r.get("hashtags"),
            }
            out.write(json.dumps(line) + "\n")


def write_report(ev: Evaluation, folder: Path) -> dict[str, Path]:
    """Write the report of `ev` into `folder`; returns the main files by format."""
    if not ev.runs:
        raise ValueError("an evaluation needs at least one model run")
    folder.mkdir(parents=True, exist_ok=True)
    _plots(ev, folder)
    for n, run in enumerate(ev.runs, start=1):
        _photos_jsonl(run, folder / f"photos-m{n}.jsonl")
    blocks = blocks_of(ev)
    paths = {
        "md": folder / "report.md",
        "html": folder / "report.html",
        "json": folder / "report.json",
    }
    paths["md"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["html"].write_text(to_html(blocks, folder), encoding="utf-8")
    paths["json"].write_text(json.dumps(as_json(ev), indent=2) + "\n", encoding="utf-8")
    return paths
