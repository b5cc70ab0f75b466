"""Benchmark the filter job's near-duplicate search on synthetic embeddings with planted duplicates.

    python jobs/benchmark_dedup.py                      # 1M pairs on this machine's local Ray
    python jobs/benchmark_dedup.py --pairs 20000 --subset 5000      # smoke run (CI)
    python jobs/benchmark_dedup.py --no-dedup --concepts 10          # 1M pairs, 10 concepts of 3 queries
    python jobs/benchmark_dedup.py --copy-cosines --config configs/benchmark.yaml

Prints and writes: wall time, peak memory, recall against brute force (pipeline/bench/dedup.py). With
--copy-cosines instead: how close reposted copies of a photo (re-encoded, resized, cropped, watermarked) stay
to it through the config's image tower, against distinct photos: a guide for choosing dedup_threshold.
"""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.logs import drop_false_alarms  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--per-table", type=int, default=10_000, help="rows per embedding table (input shard)")
    parser.add_argument("--threshold", type=float, default=0.95, help="dedup_threshold")
    parser.add_argument("--partition-size", type=int, default=None,
                        help="dedup_partition_size (default: the filter job's default)")
    parser.add_argument("--probes", type=int, default=None, help="dedup_probes (default: the filter job's default)")
    parser.add_argument("--subset", type=int, default=50_000, help="pairs searched by brute force for recall")
    parser.add_argument("--no-dedup", action="store_true", help="run the filter job without dedup")
    parser.add_argument("--concepts", type=int, default=0, help="concept rules of 3 Chinese queries each, embedded "
                        "by the real text tower with random weights (time and memory only)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--folder", default=None, help="where the synthetic tables go (default: a temporary folder)")
    parser.add_argument("--json", default="benchmark-dedup.json")
    parser.add_argument("--copy-cosines", action="store_true", help="measure reposted copies' cosines instead")
    parser.add_argument("--config", default="configs/benchmark.yaml", help="embed config whose image tower "
                        "--copy-cosines uses (the benchmark's: real architectures, random weights)")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    parser.add_argument("--photos", type=int, default=48, help="photos for --copy-cosines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.curate.run import FilterCfg
    from pipeline.bench.dedup import copy_cosines, run_dedup_benchmark
    from pipeline.bench.table import write_json

    if args.copy_cosines:
        from pipeline.config import load_config

        report = copy_cosines(load_config(args.config, args.set), args.photos)
    else:
        with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
            report = run_dedup_benchmark(
                Path(args.folder or tmp), args.pairs, args.per_table, None if args.no_dedup else args.threshold,
                args.partition_size or FilterCfg.dedup_partition_size, args.probes or FilterCfg.dedup_probes,
                args.subset, args.num_cpus, concepts=args.concepts)
    report["command"] = " ".join(["python", "jobs/benchmark_dedup.py", *(argv if argv is not None else sys.argv[1:])])
    write_json(report, args.json)
    print(json.dumps(report, indent=2))
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    drop_false_alarms()  # one known false alarm of Ray's core worker (pipeline/logs.py)
    sys.exit(main())
