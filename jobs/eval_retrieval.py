"""Retrieval Recall@1/5/10 and zero-shot top-1/top-5 of Taiyi-CLIP on WebDataset evaluation sets.

    python jobs/eval_retrieval.py --config configs/eval.yaml --set retrieval='flickr30k-cn/test-{0000..0004}.tar'
    python jobs/eval_retrieval.py --config configs/eval.yaml --set zeroshot='imagenet-val/*.tar' \
        --set classes=label_cn.txt
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.eval.evaluate import load_eval_config  # noqa: E402
from pipeline.logs import drop_false_alarms  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/eval.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_eval_config(args.config, args.set)
    except (ValueError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from pipeline.embed.run import init_ray
    from pipeline.eval.evaluate import check_before_ray, evaluate
    from pipeline.io import storage

    try:  # the shards, the class and template files, the model: checked before Ray starts
        random_weights = check_before_ray(cfg)
    except (ValueError, storage.StorageError) as exc:
        print(f"{'storage' if isinstance(exc, storage.StorageError) else 'config'} error: {exc}", file=sys.stderr)
        return 2
    init_ray(None, None)
    try:
        metrics = evaluate(cfg, random_weights)
    except ValueError as exc:  # found during the work (nothing to rank or evaluate): not a start-up mistake
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    print(text)
    log = logging.getLogger("eval")
    if random_weights:
        log.warning("RANDOM WEIGHTS: %s / %s could not be loaded; these metrics mean nothing",
                    cfg.model.text, cfg.model.image)
    if metrics["errors"]["samples"]:
        log.warning("%d evaluation samples are errors (%s), left out of the metrics; the first are listed under "
                    "errors.first", metrics["errors"]["samples"], json.dumps(metrics["errors"]["by_reason"]))
    if cfg.output:
        fs, out = storage.filesystem(cfg.output, cfg.storage)
        storage.write_atomically(fs, storage.join(out, "metrics.json"), text.encode())
    return 0


if __name__ == "__main__":
    drop_false_alarms()  # one known false alarm of Ray's core worker (pipeline/logs.py)
    sys.exit(main())
