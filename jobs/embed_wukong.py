"""Embed image-caption WebDataset shards with Taiyi-CLIP into Parquet tables (one per shard) on Ray.

    python jobs/embed_wukong.py --config configs/demo.yaml
    ray job submit --working-dir . -- python jobs/embed_wukong.py --config configs/wukong.yaml --set input=...
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from pipeline.config import dump, load_config  # noqa: E402
from pipeline.logs import drop_false_alarms, print_summary  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value",
                        help="override a config field, e.g. --set encoder.actors=8 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="check the config, list the shards, say what is "
                        "committed and what Ray would be asked for; start nothing, write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.set)
    except (ValueError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("embed").info("resolved config:\n%s", dump(cfg))

    from pipeline.embed.demo import make_demo_shards
    from pipeline.embed.plan import plan_embed_run
    from pipeline.embed.run import dry_run_report, init_ray, run_embed_job
    from pipeline.io.storage import StorageError

    if cfg.make_demo_shards and not args.dry_run:  # a dry run writes nothing, demo shards included
        make_demo_shards(cfg)
    try:  # the input, the output's access and settings, the model: all checked before Ray starts
        plan = plan_embed_run(cfg)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("dry run: " + json.dumps(dry_run_report(cfg, plan), ensure_ascii=False, indent=2), flush=True)
        return 0
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    try:
        summary = run_embed_job(cfg, plan)
    except StorageError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 2
    report = {k: summary[k] for k in ("run_id", "shards_in_input", "shards_skipped_already_committed",
                                      "shards_committed", "shards_failed", "samples", "ok", "error",
                                      "errors_by_reason", "pairs_per_s", "wall_s", "random_weights")}
    print_summary(report)
    for url, reason in summary["failed_shards"].items():
        print(f"failed shard {url}: {reason}", file=sys.stderr)
    return 1 if summary["failed_shards"] else 0


if __name__ == "__main__":
    drop_false_alarms()  # one known false alarm of Ray's core worker (pipeline/logs.py)
    sys.exit(main())
