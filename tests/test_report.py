"""The curation report opens in a real headless browser: the page loads, every image renders, a screenshot."""

import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import CHROMIUM, CHROMIUM_FLAGS, images_decoded_in_chromium, job_config, make_shards, needs_chromium
from pipeline.curate.run import load_filter_config, run_filter_job
from pipeline.embed.run import run_embed_job


@pytest.fixture(scope="module")
def report(local_ray, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    make_shards(root / "shards", 3, 8)
    run_embed_job(job_config(tiny_models, f"{root}/shards/*.tar", str(root / "emb")))
    cfg = load_filter_config(None, [f"embeddings={root / 'emb'}", f"output={root / 'out'}",
                                    "keep_top_fraction=0.5", "gallery_per_band=4"])
    summary = run_filter_job(cfg)
    return root / "out" / "report", summary


def test_report_files(report):
    folder, summary = report
    assert {p.name for p in folder.iterdir()} >= {"index.html", "histogram.png", "shards.png", "errors.png",
                                                 "thumbs"}
    page = (folder / "index.html").read_text()
    assert f"{summary['threshold']:.6f}" in page
    assert page.count('<figure class="') == 12  # 3 bands x 4
    assert "Lowest similarity" in page and "Around the threshold" in page and "Highest similarity" in page
    for name in ("histogram.png", "shards.png", "errors.png"):
        with Image.open(folder / name) as plot:
            assert plot.size[0] > 500 and np.asarray(plot.convert("L")).std() > 5


@needs_chromium
def test_report_renders_in_headless_chromium(report, tmp_path):
    folder, _ = report
    url = (folder / "index.html").as_uri()
    total, loaded = images_decoded_in_chromium(folder / "index.html", tmp_path / "profile")
    assert total == 3 + 12 and loaded == total  # three plots and twelve thumbnails decoded by the browser

    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1280,2400", url], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert image.size == (1280, 2400)
    assert pixels.std() > 20  # plots and photos, not a blank page


def test_the_threshold_gallery_is_in_score_order_and_agrees_with_the_keep_lists(report, tmp_path):
    import re

    import pyarrow.parquet as pq

    root = report[0].parent.parent
    scores = np.sort(np.concatenate([pq.read_table(p).column("similarity").to_numpy(zero_copy_only=False)
                                     for p in (root / "emb" / "embeddings").glob("*.parquet")]))
    scores = scores[~np.isnan(scores)]
    below, above = (float(v) for v in scores[len(scores) // 2: len(scores) // 2 + 2])
    # a cut between two neighbours, nearer the lower: by distance it comes first, by score the upper one does
    threshold = below + 0.3 * (above - below)
    run_filter_job(load_filter_config(None, [f"embeddings={root / 'emb'}", f"output={tmp_path / 'out'}",
                                             f"min_similarity={threshold}", "gallery_per_band=4"]))
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    band = page.split("Around the threshold", 1)[1].split("<h3>", 1)[0]
    cards = re.findall(r'<figcaption><b>(-?\d+\.\d+)</b> <span class="verdict">(\w+)</span>.*?<small>([^<]+)</small>',
                       band)
    assert len(cards) == 4 and all(len(score.split(".")[1]) == 6 for score, _, _ in cards)
    shown = [float(score) for score, _, _ in cards]
    assert shown == sorted(shown, reverse=True)  # the cut falls between two neighbours, not anywhere
    kept = {key for p in (tmp_path / "out" / "keep").glob("*.parquet") for key in pq.read_table(p).column("key").to_pylist()}
    verdicts = [verdict for _, verdict, _ in cards]
    assert verdicts == ["kept" if key in kept else "dropped" for _, _, key in cards]
    assert "kept" in verdicts and "dropped" in verdicts
