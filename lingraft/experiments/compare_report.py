"""The outputs of ``lingraft compare``: the result dict (one row per entry x plain|grafted), table.md, table.csv,
table.json and the cert_vs_eps.png plot, all built from OUT/results.jsonl and the step records."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

from lingraft.experiments.compare_config import CompareSpec, unit_key
from lingraft.io.files import atomic_write, atomic_write_json, atomic_write_text, read_jsonl


def build_rows(spec: CompareSpec, out: Path, hashes: dict, seed: int) -> list[dict]:
    """One row per entry x {plain, grafted} whose main units (eps x methods) are all in results.jsonl."""
    recs = {r.get("unit"): r for r in read_jsonl(out / "results.jsonl")}
    c = spec.certify
    rows = []
    for e in spec.entries:
        tr, gr = _step_record(out / e.name, "train"), _step_record(out / e.name, "graft")
        for variant in ("plain", "grafted"):
            mh = hashes[e.name]["train" if variant == "plain" else "graft"]
            main = [recs.get(unit_key(mh, spec.eps, m, c["num_samples"], spec, seed)) for m in c["methods"]]
            if any(r is None for r in main):
                continue
            first = main[0]
            grid = {}
            for eps in spec.eps_grid:
                r = recs.get(unit_key(mh, eps, "crown", c["grid_num_samples"], spec, seed))
                grid[f"{eps:g}"] = None if r is None else r["certified_acc"]
            rows.append(
                {
                    "entry": e.name,
                    "variant": variant,
                    "arch": e.arch,
                    "method": e.train.get("method", "ce"),
                    "loss": e.train.get("loss", "ce"),
                    "teacher": e.teacher if e.teacher_entry else (Path(e.teacher).name if e.teacher else None),
                    "clean_acc": first["clean_acc"],
                    "pgd_acc": first["pgd_acc"],
                    "certified": {m: r["certified_acc"] for m, r in zip(c["methods"], main)},
                    "ms_per_img": {
                        m: None if r["time_per_sample_s"] is None else 1000 * r["time_per_sample_s"]
                        for m, r in zip(c["methods"], main)
                    },
                    "unstable": first["unstable"],
                    "train_s": tr.get("train_s") if tr.get("hash") == hashes[e.name]["train"] else None,
                    "graft_s": (gr.get("graft_s") if gr.get("hash") == hashes[e.name]["graft"] else None)
                    if variant == "grafted"
                    else None,
                    "grafted_neurons": gr.get("grafted_neurons", 0) if variant == "grafted" else 0,
                    "relu_neurons": gr.get("relu_neurons"),
                    "cert_vs_eps": grid,
                }
            )
    return rows


def _step_record(folder: Path, step: str) -> dict:
    """The record a finished train / graft step left in ``folder`` ({} when there is none)."""
    try:
        return json.loads((folder / f"{step}.done.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def build_result(spec: CompareSpec, out: Path, hashes: dict, seed: int) -> dict:
    """table.json's dict: the settings and :func:`build_rows`."""
    cfg = {
        "source": spec.source,
        "dataset": spec.dataset,
        "eps": spec.eps,
        "eps_grid": spec.eps_grid,
        "graft": spec.graft,
        "certify": spec.certify,
        "seed": seed,
        "entries": [{"name": e.name, "arch": e.arch, "teacher": e.teacher, **e.train} for e in spec.entries],
    }
    return {
        "schema_version": 1,
        "command": "compare",
        "config": cfg,
        "out_dir": str(out),
        "rows": build_rows(spec, out, hashes, seed),
    }


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def short_number(v, scale: float = 1.0) -> str:
    """Blank for None; one decimal below 10, none above (seconds, ms, neuron counts)."""
    if v is None:
        return ""
    v = v * scale
    return f"{v:.1f}" if abs(v) < 10 else f"{v:.0f}"


def table_columns(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells (percentages, ms, seconds) of the main table of a result dict."""
    methods = result["config"]["certify"]["methods"]
    header = (
        ["entry", "model", "arch", "train", "clean %", "PGD %"]
        + [f"{m} cert %" for m in methods]
        + ["unstable/img"]
        + [f"{m} ms/img" for m in methods]
        + ["train s", "graft s"]
    )
    body = []
    for r in result["rows"]:
        how = r["method"] if r["loss"] == "ce" else f"{r['method']}+{r['loss']}"
        if r["teacher"]:
            how += f" (teacher {r['teacher']})"
        body.append(
            [r["entry"], r["variant"], r["arch"], how, _pct(r["clean_acc"]), _pct(r["pgd_acc"])]
            + [_pct(r["certified"][m]) for m in methods]
            + [short_number(r["unstable"])]
            + [short_number(r["ms_per_img"][m]) for m in methods]
            + [short_number(r["train_s"]), short_number(r["graft_s"])]
        )
    return header, body


def render_markdown(result: dict) -> str:
    """A GitHub markdown table of the rows plus one line describing the setting."""
    cfg = result["config"]
    header, body = table_columns(result)
    c = cfg["certify"]
    lines = [
        f"dataset {cfg['dataset']}, eps {cfg['eps']:g} (L-inf), first {c['num_samples']} test images, "
        f"graft ratio {cfg['graft'].get('ratio', 0.5)}, seed {cfg['seed']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    grid = cfg["eps_grid"]
    if result["rows"]:
        lines += [
            "",
            f"CROWN certified accuracy (%) vs eps (first {c['grid_num_samples']} test images):",
            "",
            "| entry | model | " + " | ".join(f"eps {e:g}" for e in grid) + " |",
            "|---|---|" + "---:|" * len(grid),
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['entry']} | {r['variant']} | "
                + " | ".join(_pct(r["cert_vs_eps"].get(f"{e:g}")) for e in grid)
                + " |"
            )
    return "\n".join(lines) + "\n"


def render_csv(result: dict) -> str:
    """Flat CSV: fractions (not percent), one row per entry x variant, grid columns cert_crown_eps_<eps>."""
    methods = result["config"]["certify"]["methods"]
    grid = result["config"]["eps_grid"]
    fields = (
        ["entry", "variant", "arch", "method", "loss", "teacher", "clean_acc", "pgd_acc"]
        + [f"cert_{m}" for m in methods]
        + ["unstable"]
        + [f"ms_per_img_{m}" for m in methods]
        + ["train_s", "graft_s", "grafted_neurons", "relu_neurons"]
        + [f"cert_crown_eps_{e:g}" for e in grid]
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for r in result["rows"]:
        w.writerow(
            [
                r["entry"],
                r["variant"],
                r["arch"],
                r["method"],
                r["loss"],
                r["teacher"] or "",
                r["clean_acc"],
                r["pgd_acc"],
            ]
            + [r["certified"][m] for m in methods]
            + [r["unstable"]]
            + [None if r["ms_per_img"][m] is None else round(r["ms_per_img"][m], 3) for m in methods]
            + [r["train_s"], r["graft_s"], r["grafted_neurons"], r["relu_neurons"]]
            + [r["cert_vs_eps"].get(f"{e:g}") for e in grid]
        )
    return buf.getvalue()


def plot_cert_vs_eps(result: dict, path) -> bool:
    """CROWN certified accuracy vs eps, one colour per entry, solid plain / dashed grafted. Returns False (and
    warns) when matplotlib is not installed (``pip install lingraft[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless; never opens a window
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: skipping cert_vs_eps.png (pip install 'lingraft[plot]')", stacklevel=2
        )
        return False
    grid = result["config"]["eps_grid"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    entries = list(dict.fromkeys(r["entry"] for r in result["rows"]))
    for r in result["rows"]:
        ys = [r["cert_vs_eps"].get(f"{e:g}") for e in grid]
        pts = [(e, 100 * v) for e, v in zip(grid, ys) if v is not None]
        if not pts:
            continue
        i = entries.index(r["entry"])
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            ms=3,
            linestyle="-" if r["variant"] == "plain" else (0, (4, 2)),
            color=colors[i % len(colors)],
            label=f"{r['entry']}" + (" (grafted)" if r["variant"] == "grafted" else ""),
        )
    ax.set_xlabel("eps (L-inf, pixel space)")
    ax.set_ylabel("CROWN certified accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{result['config']['dataset']}: certified accuracy vs eps (solid plain, dashed grafted)", fontsize=10)
    ax.grid(alpha=0.3)
    # the legend goes outside the axes, so that it never hides a line
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, handlelength=3.5)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return True


def write_outputs(result: dict, out: Path, *, log: Callable[[str], None] = print, plot: bool = True) -> None:
    """Write table.md, table.csv, table.json and (``plot`` and rows to show) cert_vs_eps.png into ``out``."""
    atomic_write_text(out / "table.md", render_markdown(result))
    atomic_write_text(out / "table.csv", render_csv(result))
    atomic_write_json(out / "table.json", result)
    wrote = ["table.md", "table.csv", "table.json"]
    if plot and result["rows"]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = plot_cert_vs_eps(result, out / "cert_vs_eps.png")
        for w in caught:
            log(f"warning: {w.message}")
        if ok:
            wrote.append("cert_vs_eps.png")
    log(f"wrote {', '.join(str(out / w) for w in wrote)}")
