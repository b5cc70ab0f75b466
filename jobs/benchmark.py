"""Benchmark the embed job against its encoders' ceiling, in one run on one machine; prints a table, writes JSON.

    python jobs/benchmark.py --config configs/benchmark.yaml --pairs 512 --precisions fp32,bf16
    python jobs/benchmark.py --config configs/benchmark-gpu.yaml      # one GPU, 16 cores, sized for 5 minutes
    python jobs/benchmark.py --tiny --pairs 32      # smoke run with tiny models (CI): figures mean nothing

A GPU config first runs the GPU checks (pipeline/bench/gpu_checks.py), then also 1-4 encoders per GPU
(--encoders-per-gpu). Where Ray is not installed (the lent GPU machine has none, and cannot install it), the
stages run without Ray, one spawned process per encoder (pipeline/bench/inprocess.py), and every figure is
labelled so. A run that fails half-way writes the figures it has, with the failure, and exits 1; the JSON
is also written after every phase (marked "unfinished"), so a run stopped on a time limit keeps its figures.
"""

import argparse
import logging
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import dump, load_config  # noqa: E402
from pipeline.logs import drop_false_alarms  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/benchmark.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs in each end-to-end run (default 512; 30720 on a GPU config)")
    parser.add_argument("--per-shard", type=int, default=None, help="pairs per generated shard (64; 256 on a GPU config)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated: fp32, bf16, fp16 (GPU); default fp16 on a GPU config "
                             "(encoder.num_gpus > 0: the 5-minute budget), else fp32,bf16")
    parser.add_argument("--encoders-per-gpu", default=None,
                        help="comma-separated encoder actors (processes) per GPU to run decode_on=encoder with, "
                             "each with its own ceiling (default 1,2,3,4 on a GPU config; ignored on CPU)")
    parser.add_argument("--decode-on", default=None,
                        help="comma-separated read.decode_on placements to run end to end (default tasks,encoder)")
    parser.add_argument("--fidelity-photos", type=int, default=None,
                        help="photos for the decode_on=encoder fidelity figures (0: skip; default 159 when "
                             "encoder is among the placements)")
    parser.add_argument("--without-ray", action="store_true",
                        help="drive the stages in this process even if Ray is installed (as on a machine without it)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "taiyi-embed-bench"),
                        help="generated shards are kept here between runs")
    parser.add_argument("--ceiling-seconds", type=float, default=None,
                        help="minimum encoder-only timing (20 s; 8 s on a GPU config: hundreds of batches)")
    parser.add_argument("--no-memory-check", action="store_true", help="skip the two runs (N and 8N shards) that check memory scaling")
    parser.add_argument("--tiny", action="store_true", help="tiny random towers (smoke test only)")
    parser.add_argument("--json", default="benchmark.json", help="where to write the figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.bench.benchmark import run_benchmark, tiny_checkpoints
    from pipeline.bench.table import format_table, write_json

    overrides = list(args.set)
    if args.tiny:
        text, image = tiny_checkpoints(Path(args.cache))
        overrides = [f"model.text={text}", f"model.image={image}", "model.random_weights=false", *overrides]
    cfg = load_config(args.config, overrides)
    log = logging.getLogger("benchmark")
    log.info("resolved config:\n%s", dump(cfg))
    use_ray = not args.without_ray
    if use_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            use_ray = False
            log.warning("Ray is not installed here: the stages run without Ray (read + tokenize in worker "
                        "processes, each encoder a process of its own); every figure is labelled 'without Ray'")
    precisions = (args.precisions or ("fp16" if cfg.encoder.num_gpus else "fp32,bf16")).split(",")
    encoders_per_gpu = [int(k) for k in (args.encoders_per_gpu or ("1,2,3,4" if cfg.encoder.num_gpus else "1")).split(",")]
    placements = (args.decode_on or "tasks,encoder").split(",")
    pairs = args.pairs or (30_720 if cfg.encoder.num_gpus else 512)
    per_shard = args.per_shard or (256 if cfg.encoder.num_gpus else 64)
    fidelity_photos = args.fidelity_photos if args.fidelity_photos is not None else (
        159 if "encoder" in placements else 0)
    report = {"tiny_models": args.tiny,
              "command": " ".join(["python", "jobs/benchmark.py", *(argv if argv is not None else sys.argv[1:])])}

    def unfinished(phase: str) -> None:  # after each phase: a run killed on a time limit keeps its figures
        write_json({**report, "unfinished": f"written after phase {phase}: the run went on, or was stopped"}, args.json)
        log.info("phase %s done; the figures so far are in %s", phase, args.json)

    try:
        run_benchmark(cfg, pairs, per_shard, precisions, placements, Path(args.cache),
                      memory_check=not args.no_memory_check,
                      ceiling_seconds=args.ceiling_seconds or (8.0 if cfg.encoder.num_gpus else 20.0),
                      use_ray=use_ray, fidelity_photos=fidelity_photos, encoders_per_gpu=encoders_per_gpu,
                      report=report, after_phase=unfinished)
    except Exception:  # a GPU hour is dear: keep what was measured before the failure
        report["failed"] = traceback.format_exc()
        write_json(report, args.json)
        log.exception("the benchmark failed; the figures measured before it are in %s", args.json)
        return 1
    write_json(report, args.json)
    print(format_table(report))
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    drop_false_alarms()  # one known false alarm of Ray's core worker (pipeline/logs.py)
    sys.exit(main())
