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
