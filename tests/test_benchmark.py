"""Benchmark smoke run with tiny models: the job runs and reports every figure (timing is not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# What the lent GPU machine lacks (/work/.library/device/KINDS.md: no Ray, no registry to install it from);
# the benchmark must run there as it is
NOT_ON_THE_GPU_MACHINE = ("ray", "webdataset", "s3fs", "braceexpand", "boto3", "botocore", "aiobotocore", "moto")

BLOCKER = """import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {missing!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed on the GPU machine)")
sys.meta_path.insert(0, Missing())
"""


def without_packages(folder: Path, names) -> dict:
    """An environment whose Python processes (their spawned children too) cannot import `names`."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(missing=set(names)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def benchmark_command(tmp_path, *args: str) -> list[str]:
    return [sys.executable, "jobs/benchmark.py", "--tiny", "--pairs", "32", "--per-shard", "4", "--ceiling-seconds",
            "1", "--set", "encoder.batch_size=4", "--set", "read.batch_size=4", "--fidelity-photos", "4",
            "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "bench.json"), *args]


def run_benchmark_job(tmp_path, *args: str, env: dict | None = None) -> tuple[dict, str]:
    result = subprocess.run(benchmark_command(tmp_path, *args), cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "unfinished" not in report  # a run that ended says so
    return report, result.stdout


def check_end_to_end(run: dict) -> None:
    assert set(run["decode_on"]) == {"tasks", "encoder"}  # both placements, by default
    for placed in run["decode_on"].values():
        e2e = placed["end_to_end"]
        assert e2e["pairs"] == 32 and e2e["ok"] == 32
        for field in ("wall_s", "startup_s", "steady_pairs_per_s", "whole_run_pairs_per_s", "peak_memory_mib",
                      "peak_rss_sum_mib", "parquet_bytes_per_pair"):
            assert e2e[field] > 0, field
        assert e2e["gpu_busy_steady"] is None  # no GPU here: not measured, and not made up
        assert placed["steady_ratio"] > 0 and placed["whole_run_ratio"] > 0


def check_fidelity(report: dict) -> None:
    fidelity = report["fidelity"]
    assert fidelity["photos"] == 4 and fidelity["took_device_path"] == 4 and "random" in fidelity["weights"]
    # on CPU, PIL stands in for nvJPEG and the batched resize is PIL's: the device path is the exact path
    assert fidelity["pixel_levels_max"] == 0 and fidelity["embedding_max_component_diff"] == 0
    assert fidelity["similarity_abs_diff_max"] == 0 and set(fidelity["decided_differently"].values()) == {0.0}
    corrupted = fidelity["corrupted_jpegs"]  # 10 per photo: every one the exact path fails on kept from the device
    assert corrupted["jpegs"] == 40 and corrupted["exact_path_fails"] + corrupted["exact_path_decodes"] == 40
    assert corrupted["of_those_kept_from_the_device"] == corrupted["exact_path_fails"] > 0


def test_benchmark_smoke(tmp_path):
    report, stdout = run_benchmark_job(tmp_path, "--precisions", "fp32,bf16")
    assert report["tiny_models"] is True and report["pairs"] == 32 and report["shards"] == 8 and report["ray"]
    assert report["ray_start_s"] > 0
    for field in ("decode_images_per_s_per_core", "encoder_path_on_cpu_images_per_s_per_core",
                  "tokenize_captions_per_s_per_core", "mean_jpeg_kb"):
        assert report["cpu"][field] > 0
    assert set(report["runs"]) == {"fp32", "bf16"}
    # bf16: the ceiling again with the weights cast by autocast on every batch, as before they were cast once
    variants = report["runs"]["bf16"]["ceiling_variants"]
    assert set(variants) == {"as_configured", "weights_cast_per_batch"} and variants["weights_cast_per_batch"][
        "pairs_per_s"] > 0 and "bf16 ceiling as configured" in stdout and "ceiling_variants" not in report["runs"]["fp32"]
    assert report["encoder_actors"] == 2  # configs/benchmark.yaml: one single-threaded actor per core
    for run in report["runs"].values():
        assert run["encoder_ceiling"]["pairs_per_s"] > 0 and run["encoder_ceiling"]["model_load_s"] > 0
        # the ceiling is all the pool's actors timed at once
        per_actor = run["encoder_ceiling"]["per_actor_pairs_per_s"]
        assert len(per_actor) == 2 and all(rate > 0 for rate in per_actor)
        assert run["encoder_ceiling"]["pairs_per_s"] == round(sum(per_actor), 3)
        check_end_to_end(run)
    check_fidelity(report)
    memory = report["memory_scaling"]
    # 2 actors x batch 4 = 2 shards of 4 pairs keep every actor busy; then 8x as many shards
    assert memory["pairs_small"] == 8 and memory["pairs_large"] == 64 and memory["precision"] == "bf16"
    for field in ("peak_mib_small", "peak_mib_large", "peak_rss_sum_mib_small", "peak_rss_sum_mib_large"):
        assert memory[field] > 0, field
    assert "ceiling/s" in stdout and "fidelity" in stdout  # the printed table
    assert "the bound |delta similarity| <= 1e-3 is met" in stdout  # 0 on CPU, where the paths are the same
    # where the time went: every phase, adding up to the whole
    assert {"start", "shards", "cpu_rates", "fp32_ceiling_before", "fp32_tasks", "bf16_encoder", "memory_scaling",
            "fidelity"} <= set(report["phase_s"]) and "time:" in stdout
    assert abs(sum(report["phase_s"].values()) - report["total_s"]) < 1.0
    # the generated shards are realistic: JPEGs of 200-1000 px a side with Chinese captions
    import tarfile
    import io
    from PIL import Image
    with tarfile.open(tmp_path / "cache" / "shards-v2-4" / "00000.tar") as tar:
        names = tar.getnames()
        image = Image.open(io.BytesIO(tar.extractfile(names[0]).read()))
        text = tar.extractfile(names[1]).read().decode()
    assert image.format == "JPEG" and all(200 <= side <= 1000 for side in image.size)
    assert 8 <= len(text) <= 80 and any("\u4e00" <= ch <= "\u9fff" for ch in text)


def test_benchmark_runs_where_ray_is_not_installed(tmp_path):
    """What the lent GPU machine does: Ray (and webdataset, s3fs, braceexpand) cannot be imported there, in the
    benchmark nor in the processes it spawns; the same stages run driven by the benchmark, each encoder a
    spawned process of its own, labelled in table and JSON. Here on a logical GPU (the towers on CPU), with 1
    and 2 encoders sharing it."""
    env = without_packages(tmp_path / "site", NOT_ON_THE_GPU_MACHINE)
    report, stdout = run_benchmark_job(tmp_path, "--precisions", "fp32", "--encoders-per-gpu", "1,2",
                                       "--set", "encoder.num_gpus=1", "--set", "encoder.device=cpu",
                                       "--set", "encoder.actors=1", "--set", "encoder.num_cpus=0.5", env=env)
    assert report["ray"] is False
    assert "1 encoder process(es) spawned" in report["without_ray"] and stdout.startswith("MEASURED WITHOUT RAY")
    run = report["runs"]["fp32"]
    assert len(run["encoder_ceiling"]["per_actor_pairs_per_s"]) == 1
    check_end_to_end(run)
    assert all(placed["end_to_end"]["ray"] is False for placed in run["decode_on"].values())
    assert run["decode_on"]["encoder"]["end_to_end"]["decoded_on_device"] == 32  # every JPEG took the device path
    layouts = run["encoders_per_gpu"]
    assert set(layouts) == {"1", "2"}  # JSON keys
    shared = layouts["2"]
    assert shared["encoder_actors"] == 2 and shared["num_gpus_each"] == 0.5
    assert len(shared["encoder_ceiling"]["per_actor_pairs_per_s"]) == 2  # two processes timed at once
    e2e = shared["end_to_end"]
    assert e2e["encoder_processes"] == 2 and e2e["pairs"] == e2e["ok"] == 32 and e2e["decoded_on_device"] == 32
    # both processes embedded batches: the steady clock saw two encoders
    assert e2e["encoders_seen"] == 2
    assert "2 encoder(s) per GPU (2 at num_gpus 0.5)" in stdout
    # a GPU config runs the gpu checks first; here they say why they did not run
    assert report["gpu_checks"] == {"skipped": "no CUDA GPU visible to torch"} and "GPU checks" in stdout
    check_fidelity(report)
    assert "memory_scaling" not in report  # the scaling check needs Ray's pool


def test_a_benchmark_killed_on_a_time_limit_keeps_its_figures(tmp_path):
    """The GPU machine runs the benchmark under a time limit that kills it: the figures of every phase that ended
    before the kill are in the JSON, marked unfinished (here killed once its first end-to-end run has ended)."""
    import os
    import signal
    import time

    out = tmp_path / "bench.json"
    run = subprocess.Popen(benchmark_command(tmp_path, "--without-ray", "--precisions", "fp32"), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None:
            if out.exists() and "fp32_tasks" in json.loads(out.read_text()).get("phase_s", {}):
                break
            time.sleep(0.1)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the benchmark and the processes it spawned (its own session)
        run.wait()
    assert run.returncode == -signal.SIGKILL  # killed, not ended
    report = json.loads(out.read_text())
    assert report["unfinished"].startswith("written after phase ")
    fp32 = report["runs"]["fp32"]
    assert fp32["ceiling_before_pairs_per_s"] > 0 and fp32["decode_on"]["tasks"]["end_to_end"]["ok"] == 32


def test_the_figures_go_to_a_folder_that_does_not_exist_yet(tmp_path):
    """--json results/run-7/benchmark.json: the folder is made, not a FileNotFoundError after the first phase (which
    also lost the failure report, written to the same path)."""
    from pipeline.bench.table import write_json

    path = tmp_path / "results" / "run-7" / "benchmark.json"
    write_json({"runs": {"fp16": {"ceiling_pairs_per_s": 1.5}}}, str(path))
    assert json.loads(path.read_text()) == {"runs": {"fp16": {"ceiling_pairs_per_s": 1.5}}}
    assert [p.name for p in path.parent.iterdir()] == ["benchmark.json"]  # nothing left beside it


def test_steady_clock_opens_when_every_actor_is_warm():
    from pipeline.progress import SteadyClock

    clock = SteadyClock()
    # actor a: batches of 10 s; actor b started 5 s later (its weights loaded later)
    clock.add("a", 0.0, 10.0, 60)
    clock.add("a", 10.0, 20.0, 60)
    clock.add("b", 5.0, 15.0, 60)
    clock.add("b", 15.0, 25.0, 40)  # one batch split in two parts (two shards)
    clock.add("b", 15.0, 25.0, 20)
    clock.add("a", 20.0, 30.0, 60)
    assert clock.window_start() == 15.0  # b's first batch done: every actor warm
    # a's batch 10-20 counts half (5 of its 10 s in the window); b's 15-25 and a's 20-30 count whole
    assert clock.steady_rate(30.0) == (30 + 60 + 60) / 15
    assert clock.steady_rate(15.0) is None  # no window yet


def test_steady_clock_an_actor_fed_only_the_last_batch():
    from pipeline.progress import SteadyClock

    clock = SteadyClock()
    for i in range(4):
        clock.add("a", float(i), i + 1.0, 4)
    clock.add("b", 3.5, 4.5, 4)  # b joined late and ran one batch: the window still opens at a's first
    assert clock.window_start() == 1.0
    assert clock.steady_rate(5.0) == (3 * 4 + 4) / 4


def test_steady_clock_one_actor():
    from pipeline.progress import SteadyClock

    clock = SteadyClock()
    assert clock.window_start() is None and clock.steady_rate(10.0) is None
    clock.add("a", 0.0, 4.0, 8)
    assert clock.window_start() is None  # one batch: all of it start-up
    clock.add("a", 4.0, 6.0, 8)
    clock.add("a", 7.0, 9.0, 8)  # the actor waited 1 s for input: that second counts against the rate
    assert clock.window_start() == 4.0 and clock.steady_rate(10.0) == 16 / 6


def test_memory_sampler_keeps_peaks_shorter_than_its_interval():
    import subprocess

    from pipeline.bench.samplers import MemorySampler

    code = ("import numpy as np, time; a = np.ones(40_000_000); a += 1; del a; print('freed', flush=True); "
            "time.sleep(60)")
    memory = MemorySampler(interval_s=600).__enter__()  # one sample now, the next one at __exit__
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "freed"
    finally:
        memory.__exit__()  # while the child still lives, its RSS back to ~30 MB
        child.kill()
        child.wait()
    # 320 MB were resident for a moment, between the samples: the high-water mark kept them
    assert memory.peak_rss[child.pid] >= 300e6
    assert memory.peak_rss_sum_bytes >= memory.peak_rss[child.pid]


def run_dedup_benchmark_job(tmp_path, *args: str) -> dict:
    out = tmp_path / "dedup.json"
    result = subprocess.run([sys.executable, "jobs/benchmark_dedup.py", "--json", str(out), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_dedup_benchmark_smoke(tmp_path):
    report = run_dedup_benchmark_job(tmp_path, "--pairs", "20000", "--per-table", "2000", "--subset", "4000",
                                     "--partition-size", "4000", "--num-cpus", "2")
    assert report["pairs"] == 20000 and report["tables"] == 10
    assert report["search"] == {"partitions": 10, "probes": 2, "exact": False, "reference_images": 0}  # 20000x2/4000
    planted = report["planted"]
    # 10% copies, their cosines to the original spread over [0.93, 0.995]: some are below 0.95
    assert planted["copies"] == 2000 and 1000 < planted["at_threshold"] < 2000
    assert planted["recall"] >= 0.95 and report["subset"]["recall"] >= 0.95
    assert report["subset"]["rows"] == 4000 and report["subset"]["pairs_at_threshold"] > 0
    assert report["near_duplicates_dropped"] > 0 and report["groups"] > 0
    for field in ("wall_s", "dedup_s", "peak_memory_gib_all_processes_pss", "peak_rss_gib_largest_process"):
        assert report[field] > 0, field


def test_copy_cosines_smoke(tmp_path):
    from pipeline.bench.dedup import REPOSTS

    report = run_dedup_benchmark_job(tmp_path, "--copy-cosines", "--photos", "4")
    assert report["weights"].startswith("RANDOM") and report["photos"] == 4
    assert set(report["copies"]) == set(REPOSTS)
    for figures in report["copies"].values():
        assert -1 <= figures["min"] <= figures["p5"] <= figures["median"] <= 1
    # even random weights keep a re-encoded copy closer to its photo than distinct photos are to each other
    assert report["copies"]["jpeg_q60"]["min"] > report["distinct_photos"]["median"]


def table_report(e2e: dict, **cpu) -> dict:
    """The least report format_table takes: one fp32 run with decode_on=tasks, and the CPU rates (plus `cpu`)."""
    return {"models": {"random_weights": False}, "ray": False, "encoder_batch_size": 8,
            "cpu": {"decode_images_per_s_per_core": 1.0, "encoder_path_on_cpu_images_per_s_per_core": 1.0,
                    "mean_jpeg_kb": 1.0, "tokenize_captions_per_s_per_core": 1.0, **cpu},
            "runs": {"fp32": {"encoder_ceiling": {"pairs_per_s": 20.0, "model_load_s": 1.0},
                              "decode_on": {"tasks": {"end_to_end": e2e, "whole_run_ratio": 0.625}}}}}


def test_the_table_says_na_for_what_a_run_did_not_measure():
    from pipeline.bench.table import format_table

    e2e = {"steady_pairs_per_s": None, "whole_run_pairs_per_s": 12.5, "gpu_busy_steady": None, "startup_s": None,
           "peak_memory_mib": 900.0, "parquet_bytes_per_pair": 2100.0}
    row = format_table(table_report(e2e)).splitlines()[1]
    assert row.split() == ["fp32", "tasks", "20.00", "n/a", "n/a", "12.50", "0.625", "n/a", "n/a", "1.0", "900", "2100"]


def test_without_ray_every_sample_is_embedded_once_across_shard_files_and_the_spool_is_emptied(
        tiny_models, tmp_path, monkeypatch):
    """The driver without Ray cuts batches out of the spooled shard files (5 rows each, batches of 4: most
    batches span two files, two encoder processes take them): every key comes out once, each file is
    removed once all its rows are embedded, and the spool folder goes at the end."""
    import os

    import pyarrow.parquet as pq

    from conftest import job_config, make_shards
    from pipeline.bench import inprocess
    from pipeline.embed.preprocess import resolve_tokenizer

    shards = make_shards(tmp_path / "shards", 7, 5)
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(inprocess, "spool_folder", lambda: str(spool))
    removed = []
    remove = os.remove
    monkeypatch.setattr(inprocess.os, "remove", lambda path: (removed.append(path), remove(path)))
    cfg = job_config(tiny_models, "unused", "unused", "encoder.actors=2", "encoder.batch_size=4", "ray.num_cpus=2")
    figures = inprocess.run_without_ray(cfg, [str(s) for s in shards], False,
                                        resolve_tokenizer(cfg, random_weights=False), tmp_path / "out")
    keys = sorted(k for p in (tmp_path / "out").glob("*.parquet") for k in pq.read_table(p).column("key").to_pylist())
    assert keys == sorted(f"{s:05d}{i:04d}" for s in range(7) for i in range(5))
    assert figures["pairs"] == figures["ok"] == 35 and figures["encoders_seen"] == 2
    assert len(removed) == len(set(removed)) == 7 and not spool.exists()


def test_a_benchmark_that_fails_half_way_keeps_what_it_measured(tmp_path, monkeypatch):
    """A GPU hour is dear: a run that fails after its first figures writes them, with the failure, and exits 1."""
    import importlib.util

    from pipeline.bench import benchmark

    spec = importlib.util.spec_from_file_location("benchmark_job", REPO / "jobs" / "benchmark.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    def broken(*args, **kwargs):
        raise RuntimeError("the end-to-end run broke")

    monkeypatch.setattr(benchmark, "end_to_end", broken)
    out = tmp_path / "bench.json"
    code = job.main(["--tiny", "--pairs", "8", "--per-shard", "4", "--ceiling-seconds", "0.5", "--without-ray",
                     "--precisions", "fp32", "--fidelity-photos", "0", "--set", "encoder.batch_size=4",
                     "--set", "read.batch_size=4", "--cache", str(tmp_path / "cache"), "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and "RuntimeError: the end-to-end run broke" in report["failed"]
    assert report["cpu"]["decode_images_per_s_per_core"] > 0 and "fp32_ceiling_before" in report["phase_s"]


def test_the_table_gives_the_gpu_decode_rate_of_each_resize():
    """The GPU run times the device path with each read.device_resize; the table says both, or why one failed."""
    from pipeline.bench.table import format_table

    e2e = {"steady_pairs_per_s": 10.0, "whole_run_pairs_per_s": 8.0, "gpu_busy_steady": 0.5, "startup_s": 1.0,
           "peak_memory_mib": 900.0, "parquet_bytes_per_pair": 2100.0}
    report = table_report(e2e, gpu_decode_resize_images_per_s=5949.0, gpu_decode_resize_triton_images_per_s=12000.5)
    line = next(line for line in format_table(report).splitlines() if line.startswith("GPU decode"))
    assert "5949.0 images/s with the torch resize, 12000.5 with the fused Triton kernels" in line
    report["cpu"]["gpu_decode_resize_triton_images_per_s"] = "FAILED: ImportError: no triton"
    assert "FAILED: ImportError: no triton with the fused" in format_table(report)
