"""Benchmark the embed job against its encoders' ceiling, in one run on one machine; prints a table, writes JSON.

    python jobs/benchmark.py --config configs/benchmark.yaml --pairs 512 --precisions fp32,bf16
    python jobs/benchmark.py --tiny --pairs 32      # smoke run with tiny models (CI): figures mean nothing
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import dump, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/benchmark.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    parser.add_argument("--pairs", type=int, default=512, help="pairs in the end-to-end run (default %(default)s)")
    parser.add_argument("--per-shard", type=int, default=64, help="pairs per generated shard")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (GPU)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "taiyi-embed-bench"),
                        help="generated shards are kept here between runs")
    parser.add_argument("--ceiling-seconds", type=float, default=20.0, help="minimum encoder-only timing")
    parser.add_argument("--no-memory-check", action="store_true", help="skip the two runs (N and 8N shards) that check memory scaling")
    parser.add_argument("--tiny", action="store_true", help="tiny random towers (smoke test only)")
    parser.add_argument("--json", default="benchmark.json", help="where to write the figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.benchmark import format_table, run_benchmark, tiny_checkpoints

    overrides = list(args.set)
    if args.tiny:
        text, image = tiny_checkpoints(Path(args.cache))
        overrides = [f"model.text={text}", f"model.image={image}", "model.random_weights=false", *overrides]
    cfg = load_config(args.config, overrides)
    logging.getLogger("benchmark").info("resolved config:\n%s", dump(cfg))
    report = run_benchmark(cfg, args.pairs, args.per_shard, args.precisions.split(","), Path(args.cache),
                           memory_check=not args.no_memory_check, ceiling_seconds=args.ceiling_seconds)
    report["tiny_models"] = args.tiny
    report["command"] = " ".join(["python", "jobs/benchmark.py", *(argv if argv is not None else sys.argv[1:])])
    Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(format_table(report))
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
