"""Regenerate the figures section of benchmarks/README.md from the JSON files in benchmarks/results/.

Every benchmark writes its own JSON; this script reads the latest of each and renders one
table (benchmark, figure, value, reference measured in the same run, ratio, device, date)
plus the quality study's own table, between the README's ``<!-- figures:begin -->`` and
``<!-- figures:end -->`` markers. The README therefore never holds hand-copied numbers.

    python benchmarks/summarize.py            # rewrite the section in benchmarks/README.md
    python benchmarks/summarize.py --check    # exit 1 if the README is out of date
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


@dataclass(frozen=True)
class Row:
    """One figure: ``value`` against ``reference`` (same run), ``ratio`` = how many times better."""

    benchmark: str
    figure: str
    value: str
    reference: str = "-"
    ratio: Optional[float] = None


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _ops(r: dict[str, Any]) -> Iterator[Row]:
    for c in r["cases"]:
        shape = "x".join(str(s) for s in c["shape"])
        yield Row("ops", f"{c['op']} {shape} {c['passes']} ({c['impl']})", f"{_num(c['compiled_ms'])} ms",
                  f"reference path {_num(c['ref_ms'])} ms", c["ratio"])


def _generator(r: dict[str, Any]) -> Iterator[Row]:
    for row in r["results"]:
        impl = row["impl"]
        yield Row("generator", f"forward {row['resolution']}px, batch {row['batch']} ({impl})",
                  f"{_num(row[f'{impl}_img_per_s'])} img/s", f"reference path {_num(row['ref_img_per_s'])} img/s",
                  row["ratio"])


def _domain(r: dict[str, Any]) -> Iterator[Row]:
    for size, modes in r["img_per_s"].items():
        single = modes.get("threads=1", {}).get("best")
        for mode, figures in modes.items():
            if mode == "threads=1":
                continue
            yield Row("domain", f"heads {size}px, {mode}", f"{_num(figures['best'])} labeled img/s",
                      f"1 thread {_num(single)} img/s", figures["best"] / single if single else None)
    target = r.get("target_64")
    best64 = max((m["best"] for m in r["img_per_s"].get("64", {}).values()), default=None)
    if target and best64:
        yield Row("domain", "heads 64px, best mode vs target", f"{_num(best64)} img/s", f"target {_num(target)} img/s",
                  best64 / target)


def _inversion(r: dict[str, Any]) -> Iterator[Row]:
    rows = r["results"]
    names = list(rows)
    first = rows[names[0]]["rendered"] if names else None
    for name in names:
        rendered = rows[name]["rendered"]
        ratio = first["lpips"] / rendered["lpips"] if first and rendered["lpips"] else None
        yield Row("inversion", f"held-out LPIPS / PSNR {name}",
                  f"{_num(rendered['lpips'])} / {_num(rendered['psnr'])} dB",
                  f"{names[0]}: LPIPS {_num(first['lpips'])}", ratio)


def _generate(r: dict[str, Any]) -> Iterator[Row]:
    figures = r["img_per_s"]
    gen = figures["generator"]["best"]
    for key, label in (("labeled", "generator + labeler"), ("engine", "engine: label, filter, write shards")):
        yield Row("generate", label, f"{_num(figures[key]['best'])} img/s", f"generator only {_num(gen)} img/s",
                  figures[key]["best"] / gen)
    write = r.get("writing")
    if write:
        yield Row("writing", f"write_shard ({write.get('shard_MB', '?')} MB shards)",
                  f"{_num(write['MB_per_s'])} MB/s, {_num(write['samples_per_s'])} samples/s")


def _quality(r: dict[str, Any]) -> Iterator[Row]:
    profile = r.get("profile", "full")
    for task, verdict in r["claims"].items():
        metric = verdict["metric"]
        for arm in ("handsoff-filtered", "handsoff"):
            for n, v in verdict.get(arm, {}).get("by_labeled", {}).items():
                if "missing" in v:
                    continue
                yield Row(f"quality ({profile})", f"{task} {metric}, {arm}, {n} labeled",
                          f"{_num(v['handsoff'])} (oracle {_num(v['oracle'])})", f"baseline {_num(v['baseline'])}",
                          v["gap_closed"])
    est = r.get("full_study_estimate_one_job")
    if est and est.get("total_hours") is not None:
        yield Row(f"quality ({profile})", f"full study, estimated from this run's rates ({est['trainings']} trainings, "
                  f"{est['corpora']} corpora, one job)", f"{est['total_hours']} h",
                  f"training {est['training_hours']} h + generation {est['generation_hours']} h "
                  f"(at {est['generated_per_s']} img/s, ensemble {est['measured_with_ensemble']})")
    if not r["claims"] or all(not any(arm in v for arm in ("handsoff", "handsoff-filtered"))
                              for v in r["claims"].values()):
        for task, arms in r["table"].items():
            for arm, cells in arms.items():
                for n, cell in cells.items():
                    yield Row(f"quality ({profile})", f"{task} {arm}, {n} labeled",
                              _num(cell["primary"]["mean"]))


def _sd(margin: Optional[float]) -> str:
    return "not measured" if margin is None else f"{margin:+.1f} sd"


def _headroom(r: dict[str, Any]) -> Iterator[Row]:
    for config, tasks in r["checks"].items():
        for task, check in tasks.items():
            oracle = (r["curve"][config][task].get("oracle") or {}).get("mean")
            margins = ", ".join(f"n={n} {_sd(v.get('margin_sd'))}" for n, v in check["by_labeled"].items())
            parts = check.get("parts")
            extra = "" if not parts else "; oracle " + ", ".join(
                f"{k} {_num(v, 2)}" for k, v in parts["oracle_iou"].items())
            yield Row("headroom", f"{task} {check['metric']}, {config}: oracle over the baselines (in their sds)"
                      f"{extra}", f"{_num(oracle)}: {margins}", "headroom " + ("yes" if check["holds"] else "no"))


def _levers(r: dict[str, Any]) -> Iterator[Row]:
    for name, row in r["rows"].items():
        for task, result in row.get("downstream", {}).items():
            primary, base = result["primary"], r["baseline"][task]["primary"]
            better = primary["higher_is_better"]
            ratio = primary["value"] / base["value"] if better else base["value"] / primary["value"]
            yield Row("levers", f"{task} {primary['name']}, corpus of the '{name}' pipeline (draw 0 of 16)",
                      _num(primary["value"]), f"16 labeled images alone {_num(base['value'])}", ratio)


def _alignment(r: dict[str, Any]) -> Iterator[Row]:
    for task, t in r["tasks"].items():
        for name, metrics in t["inverted"].items():
            inv = r["inversion"][name]
            yield Row("alignment", f"{task} {t['metric']}, oracle model on inversions ({name}: LPIPS "
                      f"{_num(inv['lpips'])}, PSNR {_num(inv['psnr'])} dB)", _num(metrics[t["metric"]]),
                      f"real images {_num(t['real'][t['metric']])}", t["kept"][name])


def _downstream(r: dict[str, Any]) -> Iterator[Row]:
    default = r["default_model"]
    ref = r["models"][default]
    for name, m in r["models"].items():
        yield Row("downstream", f"{name} ({m['parameters']:,} parameters) training, batch {r['batch']}",
                  f"{_num(m['train_img_per_cpu_s'])} img/CPU-s", f"{default}: {_num(ref['train_img_per_cpu_s'])}",
                  m["train_img_per_cpu_s"] / ref["train_img_per_cpu_s"])


def _labeler(r: dict[str, Any]) -> Iterator[Row]:
    for res, row in r["inference"].items():
        fact, naive = row["factorised"], row["naive"]
        yield Row("labeler", f"inference {res}px, factorised hypercolumns ({row['hypercolumn_channels']} channels)",
                  f"{_num(fact['cpu_seconds'])} CPU-s/img", f"naive stack {_num(naive['cpu_seconds'])} CPU-s/img",
                  naive["cpu_seconds"] / fact["cpu_seconds"])
        yield Row("labeler", f"inference {res}px, peak memory", f"{fact['peak_bytes'] / 2**20:.0f} MiB",
                  f"naive stack {naive['peak_bytes'] / 2**20:.0f} MiB", naive["peak_bytes"] / fact["peak_bytes"])
        t = row.get("throughput")
        if t:
            yield Row("labeler", f"generator + labeler {res}px, batch {t['batch']}",
                      f"{_num(t['labeled_img_per_s'])} img/s", f"generator only {_num(t['generator_img_per_s'])} img/s",
                      t["labeled_img_per_s"] / t["generator_img_per_s"])
    train = r.get("training")
    if train:
        yield Row("labeler", f"training peak RSS, {train['images']} images at {train['resolution']}px",
                  f"{train['peak_rss_bytes'] / 2**30:.2f} GiB",
                  f"naive hypercolumn matrix {train['naive_matrix_bytes'] / 2**30:.1f} GiB",
                  train["naive_matrix_bytes"] / train["peak_rss_bytes"])


def _threads(r: dict[str, Any]) -> Iterator[Row]:
    for kind, settings in r["results"].items():
        for name, cell in settings.items():
            yield Row("threads", f"{kind}, torch threads {name}, beside one single-threaded process",
                      f"{_num(cell['loaded']['img_per_s'])} img/s",
                      f"quiet machine {_num(cell['quiet']['img_per_s'])} img/s",
                      cell["quiet"]["img_per_s"] / max(cell["loaded"]["img_per_s"], 1e-9))


def _agreement(r: dict[str, Any]) -> Iterator[Row]:
    base = r["arms"].get("baseline", {})
    for arm, tasks in r["arms"].items():
        if arm == "baseline":
            continue
        for task, s in tasks.items():
            b = base.get(task)
            if not b:
                continue
            lower = task == "depth"
            spread = lambda x: f"{_num(x['mean'])}" + (f" ± {_num(x['sd'], 2)}" if x.get("sd") else "") + \
                f" (n={x['n']})"  # noqa: E731
            ratio = b["mean"] / s["mean"] if lower else s["mean"] / b["mean"]
            yield Row("agreement", f"{task} {'rmse' if lower else 'score'}, arm '{arm}' (draw 0 of 16, training seeds)",
                      spread(s), f"16 labeled images alone {spread(b)}", ratio)


def _soak(r: dict[str, Any]) -> Iterator[Row]:
    for commit, c in r["commits"].items():
        yield Row("soak", f"{' + '.join(Path(t).name for t in c['tests'])}, runs in a row at commit {commit[:7]}",
                  f"{c['failures']} failed of {c['runs_done']}", f"{_num(c['seconds_per_run']['mean'])} s per run")


#: How each results file becomes rows, by the file name's first word; the ratio's meaning.
READERS: dict[str, tuple[Callable[[dict[str, Any]], Iterator[Row]], str, str]] = {
    "ops": (_ops, "reference time / compiled time", "python benchmarks/ops.py"),
    "generator": (_generator, "compiled img/s / reference img/s", "python benchmarks/generator.py"),
    "domain": (_domain, "img/s / single-thread img/s (or / target)", "python benchmarks/domain.py"),
    "inversion": (_inversion, "first stage's LPIPS / this stage's LPIPS", "python benchmarks/inversion.py"),
    "labeler": (_labeler, "naive / factorised (time, memory); labeled / generator-only img/s",
                "python benchmarks/labeler.py"),
    "generate": (_generate, "img/s / generator-only img/s", "python benchmarks/generate.py"),
    "downstream": (_downstream, "img/CPU-s / the default model's", "python benchmarks/downstream.py"),
    "alignment": (_alignment, "share of the real images' score kept on their inversions",
                  "python benchmarks/alignment.py"),
    "quality": (_quality, "share of the baseline-to-oracle gap closed", "python benchmarks/quality.py"),
    "headroom": (_headroom, "-", "python benchmarks/headroom.py"),
    "levers": (_levers, "corpus score / baseline score (RMSE: baseline / corpus; above 1 beats the labeled images)",
               "python benchmarks/levers.py"),
    "agreement": (_agreement, "arm score / baseline score (RMSE: baseline / arm; above 1 beats the labeled images)",
                  "python benchmarks/agreement.py"),
    "soak": (_soak, "-", "python benchmarks/soak.py"),
    "threads": (_threads, "slowdown beside one other process: quiet img/s / loaded img/s (lower is better)",
                "python benchmarks/threads.py"),
}


def _meta(r: dict[str, Any]) -> tuple[str, str]:
    device = r.get("device", "?")
    if isinstance(device, dict):
        device = device.get("name", "?")
    return str(device), str(r.get("date", "?"))[:10]


def rows_of(path: Path) -> tuple[list[Row], str, str, str]:
    """(rows, device, date, rerun command) of one results file; unreadable parts become one row saying so."""
    kind = path.stem.split("-")[0]
    reader, _, command = READERS.get(kind, (None, "", f"see {path.name}"))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        return [Row(kind, path.name, f"unreadable ({err})")], "?", "?", command
    device, date = _meta(record)
    if reader is None:
        return [Row(kind, path.name, "no summary for this benchmark yet")], device, date, command
    try:
        rows = list(reader(record))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        rows = [Row(kind, path.name, f"format not understood ({type(err).__name__}: {err})")]
    command = record.get("how_to_rerun", command)  # the exact invocation, where the benchmark records it
    return rows, device, date, command


def render(results: Path) -> str:
    """The markdown of the figures section."""
    lines = ["| benchmark | figure | value | reference (same run) | ratio | device | date |",
             "|---|---|---|---|---|---|---|"]
    commands: dict[str, tuple[str, str]] = {}
    quality_tables = []
    for path in sorted(results.glob("*.json")):
        rows, device, date, command = rows_of(path)
        kind = path.stem.split("-")[0]
        commands[path.name] = (command, READERS.get(kind, (None, "-", ""))[1])
        for row in rows:
            ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
            lines.append(f"| {row.benchmark} | {row.figure} | {row.value} | {row.reference} | {ratio} | {device} "
                         f"| {date} |")
        if kind == "quality":
            record = json.loads(path.read_text(encoding="utf-8"))
            quality_tables.append((path.name, record.get("markdown", ""), device, date))
    lines += ["", "Ratios: " + "; ".join(f"**{k}**: {v[1]}" for k, v in READERS.items()) + ".", "",
              "| results file | rerun with |", "|---|---|"]
    lines += [f"| `results/{name}` | `{command}` |" for name, (command, _) in commands.items()]
    for name, table, device, date in quality_tables:
        lines += ["", f"### Quality study: `results/{name}` ({device}, {date})", "", table]
    return "\n".join(lines)


def update(readme: Path, section: str) -> str:
    """``readme``'s text with the part between the markers replaced by ``section``."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    note = "<!-- generated by benchmarks/summarize.py from benchmarks/results/*.json: do not edit by hand -->"
    return f"{head}{BEGIN}\n{note}\n\n{section}\n\n{END}{tail}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--readme", type=Path, default=HERE / "README.md")
    p.add_argument("--check", action="store_true", help="only check that the README is up to date")
    args = p.parse_args(argv)
    new = update(args.readme, render(args.results))
    if args.check:
        current = args.readme.read_text(encoding="utf-8") if args.readme.exists() else ""
        if current != new:
            print(f"{args.readme} is out of date: run python benchmarks/summarize.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new, encoding="utf-8")
    print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
