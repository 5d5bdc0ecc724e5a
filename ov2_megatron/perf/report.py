"""Benchmark results as markdown, and sweeps: a list of runs, one JSON each, one table.

A sweep file is JSON: a list of entries
    {"name": "l14_s1_mb256", "recipe": "vit_l14", "stage": 1,
     "set": ["train.micro_batch=256", "train.global_batch=2048"], "steps": 20, "warmup": 3}
`tools/bench.py --sweep FILE --out DIR` runs each entry (in its own process locally, or one
per Slurm array task with `--index`), writes DIR/<name>.json, and `merge(DIR)` collects
every JSON there into DIR/results.md (written atomically, so array tasks may all merge).
"""

from __future__ import annotations

import glob
import json
import os
import tempfile

COLUMNS = ("date", "device", "world", "recipe", "layout", "precision", "recompute",
           "mb x m", "img/s", "tok/s", "TFLOP/s/dev", "MFU", "peak GiB (pred.)", "step s",
           "data s", "fwd-bwd s", "optim s", "exp. comm s")


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def layout_name(layout: dict) -> str:
    name = f"TP{layout['tp']} PP{layout['pp']} DP{layout['dp']}"
    if layout.get("vpp"):
        name += f" VPP{layout['vpp']}"
    return name + (" SP" if layout.get("sp") else "")


def markdown_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def markdown_row(r: dict) -> str:
    split = r["split_s"]
    precision = r["precision"] + (f"+fp8 {r['fp8']}" if r.get("fp8") else "")
    cells = (r["date"][:10], r["device"], str(r["world"]),
             f"{r['recipe']} s{r['stage']} {r['image_size']}px", layout_name(r["layout"]),
             precision, r["recompute"], f"{r['micro_batch']} x {r['micro_batches']}",
             _fmt(r["images_per_s"], ",.1f"), _fmt(r["tokens_per_s"], ",.0f"),
             _fmt(r["tflops_per_device"], ".3g"), _fmt(r["mfu"], ".1%"),
             f"{_fmt(r['peak_memory_gib'], '.2f')} ({_fmt(r['predicted_memory_gib'], '.2f')})",
             _fmt(r["step_time_s"], ".3f"), _fmt(split["data_wait"], ".3f"),
             _fmt(split["forward_backward"], ".3f"), _fmt(split["optimizer"], ".3f"),
             _fmt(split["exposed_comm"], ".3f"))
    return "| " + " | ".join(cells) + " |"


def load_sweep(path: str) -> list[dict]:
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: a sweep is a non-empty JSON list of runs")
    names = set()
    for i, entry in enumerate(entries):
        missing = {"name", "recipe"} - set(entry)
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {sorted(missing)}")
        unknown = set(entry) - {"name", "recipe", "stage", "set", "steps", "warmup", "data"}
        if unknown:
            raise ValueError(f"{path}: entry {i} has unknown keys {sorted(unknown)}")
        if entry["name"] in names:
            raise ValueError(f"{path}: duplicate run name {entry['name']!r}")
        names.add(entry["name"])
    return entries


def entry_arguments(entry: dict) -> list[str]:
    """The tools/bench.py arguments of one sweep entry (without "data", bench.py's default:
    the loader when the entry sets data.train_shards, else synthetic batches)."""
    args = ["--recipe", entry["recipe"], "--stage", str(entry.get("stage", 1)),
            "--steps", str(entry.get("steps", 10)), "--warmup", str(entry.get("warmup", 2))]
    if "data" in entry:
        args += ["--data", entry["data"]]
    for assignment in entry.get("set", []):
        args += ["--set", assignment]
    return args


def merge(directory: str) -> str:
    """Every result JSON in `directory` -> one markdown table, also written to results.md."""
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        if "split_s" in result:
            rows.append((os.path.splitext(os.path.basename(path))[0], result))
    lines = ["| run " + markdown_header().replace("\n|", "\n|---|", 1)]
    lines += [f"| {name} |{markdown_row(result)[1:]}" for name, result in rows]
    commands = sorted({result["command"] for _, result in rows})
    text = "\n".join(lines) + "\n\nCommands:\n" + "\n".join(f"    {c}" for c in commands) + "\n"
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".md.tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(directory, "results.md"))
    return text
