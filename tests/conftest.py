"""Shared fixtures: tiny random Taiyi-layout checkpoints, tiny WebDataset shards, a 2-CPU local Ray."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.embed.demo import encode_image, shape_image, write_tar_shard
from pipeline.embed.preprocess import BUNDLED_VOCAB_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

CAPTIONS = ["一只猫坐在窗台上", "蓝天下的绿色草地", "红色的圆形标志", "城市夜景中的高楼", "桌上的一碗面条",
            "海边的日落", "穿着汉服的女孩", "雪山和湖泊"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """(text dir, image dir): a 2-layer BERT with the real 21128 vocab and 512 labels, and a full 2-layer
    CLIPModel with the real ViT-B/32 patch/image layout, both saved with save_pretrained (safetensors)."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizer, CLIPConfig, CLIPModel)

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    text_dir, image_dir = root / "taiyi-text", root / "clip-image"
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=21128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=512,
        # a larger init than BERT's 0.02: with 77 attended tokens, mostly padding, a tiny model at 0.02 gives
        # nearly the same embedding for every caption, and a fidelity check would prove nothing
        initializer_range=0.5))
    bert.save_pretrained(text_dir)
    BertTokenizer.from_pretrained(str(BUNDLED_VOCAB_DIR)).save_pretrained(text_dir)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=77),
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=512))
    clip.save_pretrained(image_dir)
    return text_dir, image_dir


def sample_members(key: str, caption: str | None, seed: int, size=(300, 200), fmt="JPEG",
                   url: str | None = None) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    color = tuple(int(c) for c in rng.integers(0, 255, 3))
    image = shape_image(color, ["ellipse", "rectangle", "polygon"][seed % 3], size, seed)
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    members = [(f"{key}.{ext}", encode_image(image, fmt))]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode("utf-8")))
    members.append((f"{key}.json", json.dumps({"url": url or f"https://example.com/{key}.jpg"}).encode()))
    return members


def make_shards(folder: Path, n_shards: int, per_shard: int) -> list[Path]:
    """Good shards named 00000.tar ... with keys {shard:05d}{i:04d}."""
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            n = s * per_shard + i
            members += sample_members(f"{s:05d}{i:04d}", CAPTIONS[n % len(CAPTIONS)], n)
        path = folder / f"{s:05d}.tar"
        write_tar_shard(path, members)
        paths.append(path)
    return paths


def job_config(tiny_models, input_url: str, output_url: str, *overrides: str):
    text_dir, image_dir = tiny_models
    return load_config(None, [
        f"input={input_url}", f"output={output_url}", f"model.text={text_dir}", f"model.image={image_dir}",
        "read.batch_size=8", "read.num_cpus=0.5", "read.retry_backoff_s=0.1", "encoder.actors=1",
        "encoder.num_cpus=0.5", "encoder.batch_size=8", "encoder.torch_threads=1", "write.num_cpus=0.25",
        "ray.progress_interval_s=1", *overrides])


@pytest.fixture(scope="module")
def local_ray():
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def encoder_placement(every_s: float = 0.2):
    """{actor id: node id} of the live encoder actors, watched while the block runs (a dead actor's record
    may lack its node, so they are recorded while alive)."""
    from ray.util.state import list_actors

    placement, done = {}, threading.Event()

    def watch():
        while not done.is_set():
            for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True):
                if "Encoder" in actor.class_name and actor.node_id:
                    placement[actor.actor_id] = actor.node_id
            done.wait(every_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield placement
    finally:
        done.set()
        watcher.join()


def rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000", "--allow-file-access-from-files"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")


def images_decoded_in_chromium(page: Path, profile: Path) -> tuple[int, int]:
    """(images on the page, images the browser decoded), as the report's load handler counts them."""
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    total = int(re.search(r'data-images-total="(\d+)"', dom.stdout).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom.stdout).group(1))
    return total, loaded
