#!/usr/bin/env python
"""The summary of ``benchmarks/gpu_suite.sh``: one table (summary.md) and one JSON (summary.json).

    python benchmarks/gpu_summary.py STAGES_TSV OUT_DIR [TEST_METRICS_JSON]
    python benchmarks/gpu_summary.py --merge OUT_JSON TRAIN_STEP_JSON...   # one file of several bench runs

Reads what the stages left in OUT_DIR (JUnit XML of the tests, the benchmarks' JSON,
the FER-2013 run's history) and says for each stage whether it passed and what it measured.
``--merge`` joins the rows of several ``minicnn bench`` JSON files into one (the
device returns at most 8 files), keeping each run's precision and settings beside its rows.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def merge(out_path, paths):
    """Join ``minicnn bench`` reports: the first one's environment, every run's rows, precision and settings."""
    reports = [(p, _read_json(p)) for p in paths]
    reports = [(p, r) for p, r in reports if r]
    if not reports:
        print(f"gpu_summary --merge: none of {list(map(str, paths))} holds a report; {out_path} not written")
        return 1
    merged = {"benchmark": "train_step", "environment": reports[0][1]["environment"], "runs": [], "rows": []}
    for path, report in reports:
        settings = {k: v for k, v in report.items() if k not in ("environment", "rows", "benchmark")}
        merged["runs"].append({"file": Path(path).name, **settings})
        merged["rows"] += [{**row, "precision": report.get("precision")} for row in report["rows"]]
    Path(out_path).write_text(json.dumps(merged, indent=1))
    print(f"merged {len(merged['rows'])} rows of {len(reports)} reports into {out_path}")
    return 0


USAGE = ("usage: python benchmarks/gpu_summary.py STAGES_TSV OUT_DIR [TEST_METRICS_JSON]\n"
         "       python benchmarks/gpu_summary.py --merge OUT_JSON TRAIN_STEP_JSON...")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    if argv and argv[0] == "--merge":
        if len(argv) < 3:
            print(f"gpu_summary: --merge needs OUT_JSON and at least one TRAIN_STEP_JSON\n{USAGE}", file=sys.stderr)
            return 2
        return merge(argv[1], argv[2:])
    if len(argv) not in (2, 3) or any(a.startswith("-") for a in argv):
        print(f"gpu_summary: expected STAGES_TSV OUT_DIR [TEST_METRICS_JSON], got {argv}\n{USAGE}", file=sys.stderr)
        return 2
    stages_tsv, out = Path(argv[0]), Path(argv[1])
    if not stages_tsv.is_file():
        print(f"gpu_summary: {stages_tsv}: no such file (the stages table gpu_suite.sh writes)", file=sys.stderr)
        return 2
    metrics = _read_json(argv[2]) if len(argv) > 2 else None
    stages = []
    for line in stages_tsv.read_text().splitlines():
        name, rc, secs = line.split("\t")
        stages.append({"stage": name, "rc": int(rc), "seconds": int(secs),
                       "status": "ok" if rc == "0" else ("timed out" if rc in ("124", "137") else "FAILED")})
    summary = {"stages": stages, "all_ok": all(s["rc"] == 0 for s in stages)}
    try:
        suite = ET.parse(out / "gpu_tests.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        summary["tests"]["failed_names"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                            if c.find("failure") is not None or c.find("error") is not None]
    except (OSError, ET.ParseError, AttributeError):
        summary["tests"] = None
    step = _read_json(out / "train_step_cupy.json")
    if step:
        summary["gpu"] = step["environment"].get("gpu")
        keys = ("model", "mode", "batch", "minicnn_img_s", "torch_img_s", "ratio", "minicnn_peak_mib", "torch_peak_mib",
                "memory_ratio", "error")
        summary["train_step"] = [{k: r[k] for k in keys if k in r} for r in step["rows"]]
    layers = _read_json(out / "layers_cupy.json")
    if layers:
        total = layers["rows"][-1]
        summary["layers_sum_ms"] = {"minicnn": total["minicnn_ms"], "torch": total["torch_ms"], "ratio": total["ratio"]}
    epoch = _read_json(out / "epoch_cupy.json")
    if epoch:
        summary["epoch"] = epoch["rows"]
    history = _read_json(out / "fer_history.json")
    if history:
        last = history[-1]
        summary["fer_train"] = {"epochs": len(history), "last_val_acc": last.get("val_acc"),
                                "best_val_acc": max(h.get("val_acc") or 0 for h in history),
                                "img_per_s": [h.get("img_per_s") for h in history],
                                "public_test_accuracy": (metrics or {}).get("accuracy")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    lines = [f"# gpu_suite on {summary.get('gpu', 'an unknown GPU')}", "", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s['stage']} | {s['status']} (rc {s['rc']}) | {s['seconds']} |" for s in stages]
    if summary["tests"]:
        t = summary["tests"]
        lines += ["", f"tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"]
        lines += [f"- FAILED {n}" for n in t["failed_names"]]
    if step:
        lines += ["", "| model | mode | batch | minicnn img/s | torch img/s | ratio | minicnn MiB | torch MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['mode']} | {r['batch']} | {r['minicnn_img_s']} | "
                  f"{r.get('torch_img_s', 'failed: ' + r.get('error', '?'))} | {r.get('ratio', '')} | "
                  f"{r.get('minicnn_peak_mib', '')} | {r.get('torch_peak_mib', '')} |" for r in summary["train_step"]]
    if layers:
        s = summary["layers_sum_ms"]
        lines += ["", f"hw3_cnn layers, forward + backward summed: minicnn {s['minicnn']} ms, torch {s['torch']} ms "
                      f"(ratio {s['ratio']})"]
    if epoch:
        lines += [""] + [f"epoch ({r.get('library')}): {r.get('img_s')} img/s" for r in summary["epoch"]]
    if history:
        f = summary["fer_train"]
        lines += ["", f"FER-2013 run: {f['epochs']} epochs, best val acc {f['best_val_acc']}, img/s {f['img_per_s']}, "
                      f"PublicTest {f['public_test_accuracy']}"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
