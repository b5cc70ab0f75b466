"""Benchmark smoke run with tiny models: the job runs and reports every figure (timing is not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "jobs/benchmark.py", "--tiny", "--pairs", "32", "--per-shard", "4", "--precisions",
         "fp32,bf16", "--ceiling-seconds", "1", "--set", "encoder.batch_size=4", "--set", "read.batch_size=4",
         "--cache", str(tmp_path / "cache"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny_models"] is True and report["pairs"] == 32 and report["shards"] == 8
    assert report["ray_start_s"] > 0
    for field in ("decode_images_per_s_per_core", "tokenize_captions_per_s_per_core", "mean_jpeg_kb"):
        assert report["cpu"][field] > 0
    assert set(report["runs"]) == {"fp32", "bf16"}
    assert report["encoder_actors"] == 2  # configs/benchmark.yaml: one single-threaded actor per core
    for run in report["runs"].values():
        assert run["encoder_ceiling"]["pairs_per_s"] > 0 and run["encoder_ceiling"]["model_load_s"] > 0
        # the ceiling is all the pool's actors timed at once
        per_actor = run["encoder_ceiling"]["per_actor_pairs_per_s"]
        assert len(per_actor) == 2 and all(rate > 0 for rate in per_actor)
        assert run["encoder_ceiling"]["pairs_per_s"] == round(sum(per_actor), 3)
        e2e = run["end_to_end"]
        assert e2e["pairs"] == 32 and e2e["ok"] == 32
        for field in ("wall_s", "startup_s", "steady_pairs_per_s", "whole_run_pairs_per_s", "peak_memory_mib",
                      "peak_rss_sum_mib", "parquet_bytes_per_pair"):
            assert e2e[field] > 0, field
        assert run["steady_ratio"] > 0 and run["whole_run_ratio"] > 0
    memory = report["memory_scaling"]
    # 2 actors x batch 4 = 2 shards of 4 pairs keep every actor busy; then 8x as many shards
    assert memory["pairs_small"] == 8 and memory["pairs_large"] == 64 and memory["precision"] == "bf16"
    for field in ("peak_mib_small", "peak_mib_large", "peak_rss_sum_mib_small", "peak_rss_sum_mib_large"):
        assert memory[field] > 0, field
    assert "ceiling/s" in result.stdout  # the printed table
    # the generated shards are realistic: JPEGs of 200-1000 px a side with Chinese captions
    import tarfile
    import io
    from PIL import Image
    with tarfile.open(tmp_path / "cache" / "shards-4" / "00000.tar") as tar:
        names = tar.getnames()
        image = Image.open(io.BytesIO(tar.extractfile(names[0]).read()))
        text = tar.extractfile(names[1]).read().decode()
    assert image.format == "JPEG" and all(200 <= side <= 1000 for side in image.size)
    assert 8 <= len(text) <= 80 and any("\u4e00" <= ch <= "\u9fff" for ch in text)


def test_steady_clock_opens_when_every_actor_is_warm():
    from pipeline.run import SteadyClock

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
    from pipeline.run import SteadyClock

    clock = SteadyClock()
    for i in range(4):
        clock.add("a", float(i), i + 1.0, 4)
    clock.add("b", 3.5, 4.5, 4)  # b joined late and ran one batch: the window still opens at a's first
    assert clock.window_start() == 1.0
    assert clock.steady_rate(5.0) == (3 * 4 + 4) / 4


def test_steady_clock_one_actor():
    from pipeline.run import SteadyClock

    clock = SteadyClock()
    assert clock.window_start() is None and clock.steady_rate(10.0) is None
    clock.add("a", 0.0, 4.0, 8)
    assert clock.window_start() is None  # one batch: all of it start-up
    clock.add("a", 4.0, 6.0, 8)
    clock.add("a", 7.0, 9.0, 8)  # the actor waited 1 s for input: that second counts against the rate
    assert clock.window_start() == 4.0 and clock.steady_rate(10.0) == 16 / 6


def test_memory_sampler_keeps_peaks_shorter_than_its_interval():
    import subprocess

    from pipeline.benchmark import MemorySampler

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
