"""The CUDA paths (pipeline/bench/gpu_checks.py): run on CUDA wherever torch sees a GPU, skipped with the reason
elsewhere; and every check's own code run on CPU as a dry run (the device path there is the exact path).

    python -m pytest -q tests/test_gpu.py      # on a GPU machine (no Ray needed)
    python jobs/benchmark.py --config configs/benchmark-gpu.yaml   # runs the same checks first, without pytest
"""

import pytest
import torch

from conftest import job_config
from pipeline.bench.gpu_checks import CHECKS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_on_cuda(name, tiny_models, tmp_path):
    CHECKS[name]("cuda", job_config(tiny_models, "unused", str(tmp_path / "out"), "encoder.num_gpus=1"))


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_check_itself_runs_on_cpu(name, tiny_models, tmp_path):
    CHECKS[name]("cpu", job_config(tiny_models, "unused", str(tmp_path / "out")))


def passing_check(device, cfg):
    pass


def failing_check(device, cfg):
    raise AssertionError("pixels differ")


def dying_check(device, cfg):  # what a crash in a decoder or a broken CUDA context does to a process
    import os

    os._exit(3)


def test_the_checks_run_in_a_process_of_their_own_and_a_crash_costs_only_the_rest(tiny_models, tmp_path):
    """The GPU benchmark runs the checks first: a failing check is reported with its reason, and one that kills
    its process costs the checks after it (reported as not run), never the benchmark."""
    from pipeline.bench.gpu_checks import run_gpu_checks

    cfg = job_config(tiny_models, "unused", str(tmp_path / "out"))
    results = run_gpu_checks(cfg, "cpu", {"first": passing_check, "second": failing_check, "third": dying_check,
                                          "fourth": passing_check})
    assert results["first"] == "passed" and results["second"].startswith("FAILED: ")
    assert "AssertionError: pixels differ" in results["second"]
    assert results["third"] == results["fourth"] == "NOT RUN: the check process exited with 3"
    if not torch.cuda.is_available():
        assert run_gpu_checks(cfg) == {"skipped": "no CUDA GPU visible to torch"}
