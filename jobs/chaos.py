"""Chaos run: the embed job while its own processes are killed at random, then its driver killed and rerun.

    python jobs/chaos.py                                   # the published run (BENCHMARKS.md, "Chaos")
    python jobs/chaos.py --shards 40 --kills 5 --node-losses 1 --driver-kills 2     # a short one

Worker phase: a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster); read, encoder, write and
commit processes SIGKILLed at random moments and whole worker nodes removed (and added back) while the job
runs; it must end with exit 0 without a rerun. Driver phase: on a local Ray, the driver SIGKILLed at random
moments, each time rerun, until a run ends with exit 0. Both outputs are checked key by key: 0 lost, 0 written
twice, 0 clean samples written as errors. Tiny random towers of the real layouts: the run tests the plumbing,
the towers' size only changes how long a batch takes. Exit 0 when every check holds and every kill was made
(every stage killed at least once).
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
    parser.add_argument("--shards", type=int, default=160, help="generated shards: enough work for every kill to "
                        "land while the job runs (the kills stop when made; a job that ends first fails the run)")
    parser.add_argument("--per-shard", type=int, default=24, help="samples per shard")
    parser.add_argument("--kills", type=int, default=50, help="worker and actor kills in the worker phase")
    parser.add_argument("--node-losses", type=int, default=5, help="worker nodes lost in the worker phase")
    parser.add_argument("--driver-kills", type=int, default=10, help="driver kills in the driver phase")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments and victims")
    parser.add_argument("--no-baseline", action="store_true", help="skip the undisturbed run (extra wall time)")
    parser.add_argument("--folder", default=None, help="shards, outputs and logs (default: a temporary folder)")
    parser.add_argument("--json", default="chaos.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.bench.benchmark import tiny_checkpoints
    from pipeline.bench.chaos import counted, driver_phase, make_chaos_shards, passed, worker_phase
    from pipeline.bench.samplers import machine
    from pipeline.bench.table import write_json

    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        folder = Path(args.folder or tmp)
        models = tiny_checkpoints(folder / "models")
        report = {"command": " ".join(["python", "jobs/chaos.py", *(argv if argv is not None else sys.argv[1:])]),
                  "machine": machine(), "driver_kills_asked": args.driver_kills}
        phases = [("worker_phase", lambda work, expected: worker_phase(
                       work, expected, models, args.kills, args.node_losses, args.seed, not args.no_baseline))]
        if args.driver_kills:
            phases.append(("driver_phase", lambda work, expected: driver_phase(
                work, expected, models, args.driver_kills, args.seed)))
        for name, run in phases:
            work = folder / name
            expected = make_chaos_shards(work / "shards", args.shards, args.per_shard)
            logging.info("%s: %d shards of %d samples under %s", name, args.shards, args.per_shard, work)
            report[name] = run(work, expected)
            report[name]["check"] = counted(report[name]["check"])
            print(f"{name}: " + json.dumps({k: v for k, v in report[name].items() if k != "summary"},
                                          ensure_ascii=False), flush=True)
        report["passed"] = passed(report, args.kills, args.node_losses)
    write_json(report, args.json)
    print(f"chaos {'passed' if report['passed'] else 'FAILED'}; figures written to {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    drop_false_alarms()  # one known false alarm of Ray's core worker (pipeline/logs.py)
    sys.exit(main())
