"""Filter embedded pairs by similarity: keep-lists, optional filtered WebDataset shards, summary and HTML report.

    python jobs/filter_pairs.py --config configs/filter.yaml --set min_similarity=0.2
    ray job submit --working-dir . -- python jobs/filter_pairs.py --config configs/filter.yaml --set ...
"""

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.curate.run import load_filter_config  # noqa: E402
from pipeline.logs import drop_false_alarms, print_summary  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/filter.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    parser.add_argument("--dry-run", action="store_true", help="check the config and the tables, say what is "
                        "written already and what would change; start nothing, write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_filter_config(args.config, args.set)
    except (ValueError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("filter").info("resolved config:\n%s", json.dumps(asdict(cfg), indent=2))

    from pipeline.curate.plan import dry_run_report, plan_filter_run
    from pipeline.curate.run import run_filter_job
    from pipeline.embed.run import init_ray
    from pipeline.io.storage import StorageError

    try:  # the tables, the output's access and settings: all checked before Ray starts
        plan = plan_filter_run(cfg)
    except (ValueError, StorageError) as exc:
        print(f"{'storage' if isinstance(exc, StorageError) else 'config'} error: {exc}", file=sys.stderr)
        return 2
    if plan.models.get("random_weights"):
        logging.getLogger("filter").warning("RANDOM WEIGHTS: the embeddings in %s were made with random weights; "
                                            "their similarities mean nothing", cfg.embeddings)
    if args.dry_run:
        print("dry run: " + json.dumps(dry_run_report(cfg, plan), ensure_ascii=False, indent=2), flush=True)
        return 0
    init_ray(cfg.ray_address, cfg.ray_num_cpus)
    try:
        summary = run_filter_job(cfg, plan)
    except ValueError as exc:  # found during the work (nothing to rank or evaluate): not a start-up mistake
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if cfg.concepts_dry_run:  # nothing filtered: the preview and what each rule would drop
        would = {r["name"]: r["dropped"] for r in summary["concepts"]["rules"]}
        print("concepts dry run: " + json.dumps({"preview": summary["preview"], "would_drop": would,
                                                 "problems": summary["problems"]}, ensure_ascii=False), flush=True)
        return 1 if summary["problems"] else 0
    report = {k: summary[k] for k in ("rule", "threshold", "pairs", "ok", "errors", "kept", "dropped",
                                      "kept_fraction_of_ok", "random_weights", "shards_skipped_already_written",
                                      "problems")}
    if summary["concepts"]:
        report["concepts"] = {r["name"]: r["dropped"] for r in summary["concepts"]["rules"]}
    if summary["duplicates"]:
        report["duplicates"] = {k: summary["duplicates"][k] for k in ("near_duplicate", "matches_reference", "groups")}
    print_summary(report)
    for name, problem in summary["problems"].items():
        print(f"not done in full: {name}: {problem}", file=sys.stderr)
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    drop_false_alarms()  # one known false alarm of Ray's core worker (pipeline/logs.py)
    sys.exit(main())
