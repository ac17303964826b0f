"""The benchmark's log and report (used by run.py): log() prints a line and adds it to the run's raw
log beside its results; write_report() writes the results as JSON and as a markdown table."""

from __future__ import annotations

import json
from pathlib import Path

LOG: Path | None = None  # the run's raw log, beside its results


def start_log(path: Path) -> Path:
    """From now on log() adds its lines to ``path`` too, a fresh file."""
    global LOG
    LOG = path
    LOG.unlink(missing_ok=True)
    return LOG


def log(*parts) -> None:
    print(*parts, flush=True)
    if LOG is not None:
        with LOG.open("a") as f:
            print(*parts, file=f)


def write_report(report: dict, results_dir: Path, stem: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    server, baseline, engine = report["server"], report["server"]["baseline"], report["engine"]
    gains, hol, mixed = server["batch_gains"], server["head_of_line"], server["mixed_traffic"]
    rows = [
        ("plain diffusers, median s", baseline["latency_s"]["median"]),
        ("sdserve HTTP v1, median s (same request, in turn)", server["latency_s"]["median"]),
        ("HTTP ÷ plain diffusers", report["e2e_ratio_vs_diffusers"]),
        ("HTTP ÷ the engine time it wraps (server overhead)", report["http_over_engine"]),
        ("sdserve engine alone, median s", engine["latency_s"]["median"]),
        ("UNet it/s (plain → sdserve's loop)", f'{baseline["unet_it_per_s"]} → {report["unet_it_per_s"]}'),
        ("MFU", report.get("mfu")),
        ("throughput, images/s by clients", ", ".join(f'{m["clients"]}: {m["images_per_s"]}' for m in server["mlperf"])),
        ("best images/s (MLPerf setting)", report["mlperf_images_per_s"]),
        ("base + refiner ensemble, median s", server.get("ensemble_latency_s", {}).get("median")),
        (f"gain: diffusers batch of 4 ÷ 1; server {gains['clients']} clients ÷ 1 (in turn)",
         f'{gains["diffusers_batch4_gain"]}; {gains["server_gain"]}'),
        ("share of diffusers' batch gain the server keeps", report["batch_gain_kept"]),
        ("short request sent while a long one runs ÷ alone (head-of-line)",
         f'{hol["ratio"]} ({hol["short_steps"]} vs {hol["long_steps"]} steps)'),
        (f"mixed ÷ identical settings, steps/s ({mixed['mixed']['clients']} clients, in turn)",
         f'{mixed["mixed_over_identical"]} ({mixed["mixed"]["steps_per_s"]} / {mixed["identical"]["steps_per_s"]})'),
        ("mixed traffic latency p50 / p99 s, by steps", ", ".join(
            f'{n}: {v["p50"]} / {v["p99"]}' for n, v in mixed["mixed"]["latency_by_steps"].items())),
        ("peak GPU memory GiB (plain / sdserve)", f'{baseline["peak_gpu_gib"]} / {engine["peak_gpu_gib"]}'),
        ("cold start s (cold / warm compile cache)", f'{server["cold_start_s"]} / {server.get("cold_start_warm_cache_s")}'),
    ]
    lines = [f"# sdserve benchmark: {report['device']} ({report['date']})", "",
             f"torch {report['torch']}, diffusers {report['diffusers']}; {report['workload']}; "
             f"flags: {' '.join(report['flags']) or 'none'}", "", "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    (results_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
