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
    for run in report["runs"].values():
        assert run["encoder_ceiling"]["pairs_per_s"] > 0 and run["encoder_ceiling"]["model_load_s"] > 0
        e2e = run["end_to_end"]
        assert e2e["pairs"] == 32 and e2e["ok"] == 32
        for field in ("wall_s", "startup_s", "steady_pairs_per_s", "whole_run_pairs_per_s", "peak_memory_mib",
                      "parquet_bytes_per_pair"):
            assert e2e[field] > 0, field
        assert run["steady_ratio"] > 0 and run["whole_run_ratio"] > 0
    memory = report["runs"]["fp32"]["memory_scaling"]
    assert memory["pairs_small"] == 4 and memory["peak_mib_small"] > 0
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
