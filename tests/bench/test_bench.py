"""The benchmark harness runs end to end (CPU, tiny models) and its full-size builder matches the
SDXL architecture configs."""

import json
import subprocess
import sys

import pytest

from helpers.paths import REPO

pytestmark = pytest.mark.slow  # the benchmarks end to end: minutes

BENCH = REPO / "bench"


def test_full_size_model_has_sdxl_parameter_counts():
    sys.path.insert(0, str(BENCH))
    import full_size

    base, refiner = full_size.build("meta")  # shapes only: no memory, no time
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert round(count(base.unet) / 1e6) == 2567 and round(count(refiner.unet) / 1e6) == 2260
    assert round(count(base.text_encoder_2) / 1e6) == 695 and refiner.text_encoder_2 is base.text_encoder_2


def test_harness_runs_on_cpu(tmp_path):
    run = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--device", "cpu", "--runs", "2", "--warmup", "1", "--steps", "4",
         "--clients", "1", "4", "--requests_per_client", "1", "--results", str(tmp_path),
         "--long_steps", "12", "--mixed_clients", "4", "--mixed_requests_per_client", "2", "--mixed_steps", "2,6",
         "--gain_rounds", "1", "--mixed_rounds", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = tmp_path.glob("cpu-*.json")
    report = json.loads(result.read_text())
    for key in ("device", "torch", "diffusers", "unet_it_per_s", "e2e_ratio_vs_diffusers", "mlperf_images_per_s",
                "batch_gain_kept", "head_of_line_ratio", "mixed_over_identical"):
        assert report[key], key
    assert len(report["server"]["baseline"]["latency_s"]["runs"]) == 2 and report["server"]["cold_start_s"] > 0
    assert [m["clients"] for m in report["server"]["mlperf"]] == [1, 4]
    assert result.with_suffix(".md").read_text().startswith("# sdserve benchmark")
    assert set(report["server"]["mixed_traffic"]["mixed"]["latency_by_steps"]) == {"2", "6"}
    assert "9. step-level scheduling" in result.with_suffix(".log").read_text()


def test_few_step_bench_runs_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH / "few_step.py"), "--device", "cpu", "--runs", "1", "--steps", "4",
                          "--size", "128", "--results", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = tmp_path.glob("few-step-cpu-*.json")
    report = json.loads(result.read_text())
    assert set(report["results"]) == {"guidance 1.0 ÷ guidance 7, same steps", "guidance 1.0 ÷ guidance 7, twice the steps",
                                      "guidance 1.0 ÷ guidance 7, per denoising step",
                                      "4-step LCM (guidance 1.0) ÷ 30-step default"}
    assert all(r["ratio"] > 0 for name, r in report["results"].items() if "per denoising step" not in name)
    assert result.with_suffix(".md").read_text().startswith("# sdserve few-step benchmark")


def test_mixed_adapters_bench_runs_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH / "mixed_adapters.py"), "--device", "cpu", "--runs", "1",
                          "--calls", "1", "--steps", "3", "--size", "64", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = tmp_path.glob("mixed-adapters-cpu-*.json")
    report = json.loads(result.read_text())
    shares = report["concurrent_requests"]
    assert set(shares) == {"8 adapters, one call", "1 adapter shared", "8 adapters, a call per adapter (before)"}
    # one call for 8 adapters beats a call per adapter by far, even on one noisy round
    assert shares["8 adapters, one call"]["steps_per_s"] > 2 * shares["8 adapters, a call per adapter (before)"]["steps_per_s"]
    assert set(report["denoiser_call_by_rows"]) == {"1", "2", "4", "8", "16"}
    assert result.with_suffix(".md").read_text().startswith("# sdserve mixed adapters")


def test_step_savings_bench_runs_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH / "step_savings.py"), "--device", "cpu", "--runs", "1", "--steps", "6",
                          "--size", "64", "--results", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = tmp_path.glob("step-savings-cpu-*.json")
    report = json.loads(result.read_text())
    assert {"guidance_interval [0.2, 0.8] ÷ every step guided, per denoising step",
            "cache deep, interval 3 ÷ plain, per denoising step"} <= set(report["results"])
    saved = report["rows_saved"]
    assert saved["cache deep, interval 3 ÷ plain, end to end"]["cache"] == 8  # 4 of 6 steps, two rows each
    assert result.with_suffix(".md").read_text().startswith("# sdserve fewer denoiser FLOPs")


def test_full_size_flux_has_flux_parameter_counts():
    sys.path.insert(0, str(BENCH))
    import full_size_flux

    schnell, dev = full_size_flux.parameters(), full_size_flux.parameters(dev=True)
    assert round(dev["transformer"] / 1e6) == 11901 and round(dev["text_encoder_2"] / 1e6) == 4762
    assert round((dev["transformer"] - schnell["transformer"]) / 1e6, 1) == 10.2  # the guidance embedding
    pipe = full_size_flux.build("meta")  # the pipeline the bench writes, shapes only
    assert type(pipe).__name__ == "FluxPipeline" and not pipe.transformer.config.guidance_embeds


def test_flux_bench_runs_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH / "flux.py"), "--device", "cpu", "--runs", "1", "--steps", "3",
                          "--size", "64", "--results", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = tmp_path.glob("flux-cpu-*.json")
    report = json.loads(result.read_text())
    bare, mixed = report["results"].values()
    assert bare["http_s"] > 0 and bare["bare_s"] > 0 and mixed["mixed_steps_per_s"] > 0
    assert mixed["mixed_steps"] == [1, 2, 3, 4, 5, 1, 2, 3]
    assert result.with_suffix(".md").read_text().startswith("# sdserve FLUX.1 benchmark")


def test_controls_bench_runs_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH / "controls.py"), "--device", "cpu", "--runs", "1", "--calls", "2",
                          "--steps", "3", "--size", "64", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = tmp_path.glob("controls-cpu-*.json")
    report = json.loads(result.read_text())
    mixed = report["concurrent_requests"]
    # half the images with a ControlNet cost at most about that ControlNet's own calls (one noisy round: margin)
    assert mixed["mixed_ratio_to_plain_plus_controlnet"] > 0.6, mixed
    assert set(report["step_by_rows"]) == {"2", "8", "16"}
    assert result.with_suffix(".md").read_text().startswith("# sdserve ControlNets")
