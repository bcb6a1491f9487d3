"""The PNG plots under docs/img/ (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

from bench import increment, load, randomize, seed

SEED_RANDOMIZE = "seed-randomize.png"
RANDOMIZE_SCALE = "randomize-scale.png"
LOAD = "load.png"
INCREMENT = "increment.png"
DATABASES = ("SQLite", "PostgreSQL")
COLORS = {"ours": "#1f77b4", "baseline": "#d62728", "floor": "#7f7f7f", "hello": "#ff7f0e",
          "search": "#2ca02c", "ours_hot": "#aec7e8", "baseline_hot": "#ff9896", "hello_stock": "#ffbb78"}


def _pyplot():
    """pyplot on the Agg backend (CI and servers have no display). Imported when a plot is drawn:
    the report and its tests need only the plots' file names, and the test extra has no matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def plot_seed_randomize(results: dict, path: Path) -> bool:
    """Bars: maxtwo vs the baselines (median seconds), seed on the left, randomize on the right."""
    panels = [
        ("seed", f"Seed {results['parameters']['rows']:,} users",
         [(seed.OURS, "ours"), (seed.BASELINE, "baseline")]),
        ("randomize", f"Randomize {results['parameters']['rows']:,} users",
         [(randomize.OURS, "ours"), (randomize.NAIVE, "baseline"), (randomize.FLOORS, "floor")]),
    ]
    if not any(_ok(results, section, database) for section, _, _ in panels for database in DATABASES):
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for axis, (section, title, contenders) in zip(axes, panels, strict=True):
        width = 0.8 / len(contenders)
        for index, (names, color) in enumerate(contenders):
            # A tuple: one bar per database, whichever of these contenders it ran (the floors).
            names = names if isinstance(names, tuple) else (names,)
            xs, heights = [], []
            for position, database in enumerate(DATABASES):
                measured = (_ok(results, section, database) or {}).get("contenders", {})
                for name in names:
                    if measured.get(name, {}).get("median") is not None:
                        xs.append(position + (index - (len(contenders) - 1) / 2) * width)
                        heights.append(measured[name]["median"])
            label = randomize.FLOOR_LABEL if len(names) > 1 else names[0]
            bars = axis.bar(xs, heights, width, label=label, color=COLORS[color])
            axis.bar_label(bars, labels=[_seconds(height) for height in heights], fontsize=8, padding=2)
        axis.set_xticks(range(len(DATABASES)), DATABASES)
        axis.set_ylabel(f"seconds (median of {results['parameters']['runs']} runs; lower is better)")
        axis.set_title(title)
        axis.legend(fontsize=8, loc="upper left")
        axis.margins(y=0.3)  # room for the legend above the bars
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_randomize_scale(results: dict, path: Path) -> bool:
    """Seconds vs rows on PostgreSQL: every run, the medians, the linear fit over the fixed sizes,
    and the sizes measured by the search for the largest table within the interval."""
    scaling = _ok(results, "scale", "PostgreSQL")
    if not scaling or not scaling.get("points"):
        return False
    points = scaling["points"]
    probes = (scaling.get("search") or {}).get("probes") or []
    budget = scaling["interval_seconds"]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    for point in points + probes:
        axis.scatter([point["rows"] / 1e6] * len(point["randomize"]["runs"]), point["randomize"]["runs"],
                     color=COLORS["ours"], alpha=0.3, s=14)
    axis.plot([point["rows"] / 1e6 for point in points], [point["randomize"]["median"] for point in points],
              "o", color=COLORS["ours"], label="median of the runs, fixed sizes")
    timed = [probe for probe in probes if probe["randomize"]["median"] is not None]
    if timed:
        axis.plot([probe["rows"] / 1e6 for probe in timed], [probe["randomize"]["median"] for probe in timed],
                  "D", color=COLORS["search"], label=f"median of the runs, sizes searched for the {budget:g} s limit")
    untimed = [probe for probe in probes if probe["randomize"]["median"] is None]
    if untimed:
        axis.plot([probe["rows"] / 1e6 for probe in untimed], [probe["randomize"]["warmup"] for probe in untimed],
                  "x", color=COLORS["search"], label="warm-up only (over the limit)")
    largest = max((point["rows"] for point in points + probes), default=0) / 1e6
    fit = scaling.get("fit")
    if fit:
        span = [0, largest * 1.05]
        slope, intercept = fit["seconds_per_million_rows"], fit["intercept_seconds"]
        label = (f"linear fit over the fixed sizes: {slope:.3f} s per million rows "
                 f"{'+' if intercept >= 0 else '-'} {abs(intercept):.3f} s")
        axis.plot(span, [intercept + slope * x for x in span], "--", color=COLORS["baseline"], label=label)
    notes = []
    if scaling.get("largest_measured_within_interval"):
        notes.append(f"largest measured within {budget:g} s: {scaling['largest_measured_within_interval']:,} rows")
    if "extrapolated_rows_within_interval" in scaling:
        notes.append(f"extrapolated from the fit: ~{scaling['extrapolated_rows_within_interval']:,} rows")
    if notes:
        axis.text(0.02, 0.80, "\n".join(notes), transform=axis.transAxes, fontsize=9)
    medians = [point["randomize"]["median"] or point["randomize"]["warmup"] for point in points + probes]
    if max(medians) > budget / 2:
        axis.axhline(budget, color=COLORS["floor"], linestyle=":", label=f"the {budget:g} s budget")
    axis.set_xlabel("users (millions)")
    axis.set_ylabel("randomize, seconds")
    axis.set_title("Randomize on PostgreSQL: one atomic, durable UPDATE of every user")
    axis.set_xlim(left=0)
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_load(results: dict, path: Path) -> bool:
    """Bars: req/s of maxtwo serve vs the hello-world app on maxtwo's transport and on stock
    waitress, per database and connection count."""
    steady = (results.get("load") or {}).get("steady") or {}
    groups = []
    for database in DATABASES:
        result = steady.get(database)
        if isinstance(result, dict) and "error" not in result:
            groups += [(f"{database}\n{connections} conn.", summary)
                       for connections, summary in result["by_connections"].items()]
    if not groups:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 5))
    width = 0.27
    for offset, (name, color) in ((-width, (load.OURS, "ours")), (0, (load.HELLO, "hello")),
                                  (width, (load.HELLO_STOCK, "hello_stock"))):
        heights = [summary[name]["requests_per_second"] for _, summary in groups]
        bars = axis.bar([index + offset for index in range(len(groups))], heights, width, label=name,
                        color=COLORS[color])
        axis.bar_label(bars, labels=[f"{height:,.0f}" for height in heights], fontsize=8, padding=2)
    axis.set_xticks(range(len(groups)), [f"{label}\nours / hello {summary['ours_over_hello']:.2f}x"
                                         f"\n(stock waitress {summary['ours_over_stock_hello']:.2f}x)"
                                         for label, summary in groups], fontsize=8)
    axis.set_ylabel(f"requests/s (median of {results['parameters'].get('load_runs', results['parameters']['runs'])} wrk runs; higher is better)")
    axis.set_title("GET / under wrk: maxtwo serve vs a hello-world app on maxtwo's transport and on stock waitress",
                   fontsize=10)
    axis.legend(fontsize=8)
    axis.margins(y=0.15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_increment(results: dict, path: Path) -> bool:
    """Bars: POST /increment req/s of maxtwo (random keys, hot key), the do-nothing app (maxtwo's
    transport, stock waitress) and the synchronous approach (random keys, hot key), per database
    and connection count."""
    section = results.get("increment") or {}
    groups = []
    for database in DATABASES:
        result = section.get(database) if isinstance(section, dict) else None
        if isinstance(result, dict) and "error" not in result:
            groups += [(f"{database}\n{connections} conn.", summary)
                       for connections, summary in result["by_connections"].items()]
    if not groups:
        return False
    contenders = [(increment.OURS, "ours"), (increment.OURS_HOT, "ours_hot"), (increment.DO_NOTHING, "hello"),
                  (increment.DO_NOTHING_STOCK, "hello_stock"), (increment.SYNC, "baseline"),
                  (increment.SYNC_HOT, "baseline_hot")]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(8, 3.2 * len(groups)), 5.5))
    width = 0.8 / len(contenders)
    for index, (name, color) in enumerate(contenders):
        offset = (index - (len(contenders) - 1) / 2) * width
        heights = [summary[name]["requests_per_second"] for _, summary in groups]
        bars = axis.bar([position + offset for position in range(len(groups))], heights, width, label=name,
                        color=COLORS[color])
        axis.bar_label(bars, labels=[f"{height:,.0f}" for height in heights], fontsize=7, padding=2, rotation=90)
    axis.set_xticks(range(len(groups)), [
        f"{label}\nours / do-nothing {_times(summary['ours_over_do_nothing'])} (hot {_times(summary['hot_ours_over_do_nothing'])})"
        f"\n(stock waitress {_times(summary.get('ours_over_stock_do_nothing'))})"
        f"\nours / synchronous {_times(summary['ours_over_sync'])} (hot {_times(summary['hot_ours_over_sync'])})"
        for label, summary in groups], fontsize=8)
    parameters = results["parameters"]
    axis.set_ylabel(f"requests/s (median of {parameters.get('load_runs', parameters['runs'])} wrk runs; higher is better)")
    axis.set_title("POST /increment under wrk: group commit vs a do-nothing app and a transaction per request")
    axis.legend(fontsize=8, loc="upper center", ncols=3)
    axis.margins(y=0.35)  # room for the legend above the bars
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _ok(results: dict, section: str, database: str) -> dict | None:
    result = (results.get(section) or {}).get(database)
    return result if isinstance(result, dict) and "error" not in result else None


def _seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
