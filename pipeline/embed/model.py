"""The towers' weights: real ones by Hugging Face id or local folder, or random weights of the real architectures
(the demo offline, the benchmark), drawn once per machine and loaded like real ones."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import JobCfg
from pipeline.io.schema import EMBEDDING_DIM

log = logging.getLogger(__name__)


# architectures of the real checkpoints, for the demo's random-weight fallback and the benchmark
TEXT_ARCH = dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, num_labels=EMBEDDING_DIM)


IMAGE_ARCH = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32, projection_dim=EMBEDDING_DIM, hidden_act="quick_gelu")


class ModelUnavailable(ValueError):
    """The configured weights cannot be found: a user's setup to fix, reported before any work."""


def weights_reachable(name: str, revision: str | None) -> bool:
    """Whether from_pretrained(name) can find a config: a local folder, the HF cache, or a reachable Hub.

    Runs on the driver for the demo's fallback decision only; it fetches a config file, never weights.
    """
    if Path(name).is_dir():
        return (Path(name) / "config.json").exists()
    from huggingface_hub import hf_hub_download

    with contextlib.suppress(Exception):
        hf_hub_download(name, "config.json", revision=revision, local_files_only=True)
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)  # offline machines fail here at once instead of after retries
        hf_hub_download(name, "config.json", revision=revision)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


def decide_random_weights(cfg: JobCfg) -> bool:
    """Production configs never fall back; the demo does, loudly, when the weights cannot be fetched."""
    if cfg.model.random_weights:
        log.warning("model.random_weights=true: RANDOM weights of the real architectures (benchmark only)")
        return True
    missing = [name for name, rev in ((cfg.model.text, cfg.model.text_revision),
                                      (cfg.model.image, cfg.model.image_revision))
               if not weights_reachable(name, rev)]
    if not missing:
        return False
    if cfg.model.random_init_fallback:
        banner = "!" * 78
        log.warning("\n%s\n!! cannot fetch %s: using RANDOM weights of the same architecture.\n"
                    "!! Similarities are meaningless; files record random_weights=true.\n%s",
                    banner, ", ".join(missing), banner)
        return True
    raise ModelUnavailable(f"cannot load model weights for {', '.join(missing)}: not a local folder with "
                           "config.json and not reachable on the Hugging Face Hub. Download them where there is "
                           "network (hf download NAME --local-dir DIR) and point model.text / model.image at DIR.")


def load_towers(cfg: JobCfg, random_weights: bool):
    """(text model, image model) in eval mode. Only the vision tower and projection of CLIP are loaded."""
    from transformers import BertForSequenceClassification, CLIPVisionModelWithProjection

    text_source, text_revision = cfg.model.text, cfg.model.text_revision
    image_source, image_revision = cfg.model.image, cfg.model.image_revision
    if random_weights:
        log.warning("RANDOM WEIGHTS of the architectures of %s / %s: embeddings are meaningless",
                    cfg.model.text, cfg.model.image)
        text_source, image_source = random_checkpoints()
        text_revision = image_revision = None
    # safetensors are preferred when present, and mapped, not copied: the actors of a node share the pages;
    # .bin files load with torch.load(weights_only=True)
    with quiet_transformers(errors_only=False):
        text, text_info = BertForSequenceClassification.from_pretrained(
            text_source, revision=text_revision, output_loading_info=True)
    with quiet_transformers():  # skipping CLIP's text tower is intended, not worth a warning table
        image, image_info = CLIPVisionModelWithProjection.from_pretrained(
            image_source, revision=image_revision, output_loading_info=True)
    # a checkpoint without the 512-way classifier or the visual projection would load with those
    # layers randomly initialised, and every score would be noise: refuse instead
    for name, info in ((cfg.model.text, text_info), (cfg.model.image, image_info)):
        if info.get("missing_keys"):
            raise ValueError(f"{name} lacks weights the embedding needs (they would be random): "
                             f"{', '.join(sorted(info['missing_keys'])[:5])}")
    if text.config.num_labels != EMBEDDING_DIM or image.config.projection_dim != EMBEDDING_DIM:
        raise ValueError(f"expected {EMBEDDING_DIM}-d towers, got text num_labels={text.config.num_labels}, "
                         f"image projection_dim={image.config.projection_dim}")
    if image.config.image_size != cfg.read.image_size:
        raise ValueError(f"read.image_size={cfg.read.image_size} but {cfg.model.image} expects "
                         f"{image.config.image_size}x{image.config.image_size} images")
    return text.eval(), image.eval()


RANDOM_SEED = 0


def cache_dir() -> Path:
    """This machine's cache of the pipeline: $TAIYI_EMBED_CACHE, else ~/.cache/taiyi-embed."""
    return Path(os.environ.get("TAIYI_EMBED_CACHE") or Path.home() / ".cache" / "taiyi-embed")


def random_checkpoints() -> tuple[str, str]:
    """Folders of the two towers with random weights of the real architectures (text, image).

    Drawn once per machine (seed 0, so every node draws the same ones) and saved in the cache; every actor
    then loads them as it loads real weights. So all actors of a run embed with the same weights, and the
    actors of a node map one copy of them (~760 MB) instead of each drawing its own. The first actor of a
    node draws and saves them (~3.5 s more than loading them, on one core) while the others wait on a lock."""
    import fcntl
    import hashlib
    import json

    import torch
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, CLIPVisionConfig, CLIPVisionModelWithProjection

    towers = {"text": (BertForSequenceClassification, BertConfig(**TEXT_ARCH)),
              "image": (CLIPVisionModelWithProjection, CLIPVisionConfig(**IMAGE_ARCH))}
    key = hashlib.sha256(json.dumps([TEXT_ARCH, IMAGE_ARCH, RANDOM_SEED, torch.__version__,
                                     transformers.__version__]).encode()).hexdigest()[:12]
    root = cache_dir() / "random-weights" / key
    folders = {name: root / name for name in towers}
    if not all((folder / "config.json").exists() for folder in folders.values()):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"random weights are saved in a cache folder, and {root} cannot be made ({exc}): "
                               "set TAIYI_EMBED_CACHE to a writable folder") from exc
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            for name, (model_class, config) in towers.items():
                if (folders[name] / "config.json").exists():  # saved by another actor while this one waited
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(RANDOM_SEED)
                    model = initialised_once(model_class, config)
                staging = root / f".{name}-{uuid.uuid4().hex[:8]}"
                with quiet_transformers():
                    model.save_pretrained(staging)
                staging.rename(folders[name])  # readers see a whole checkpoint or none
                log.warning("random weights for %s drawn and saved in %s", name, folders[name])
    return str(folders["text"]), str(folders["image"])


def initialised_once(model_class, config):
    """A model of random weights, drawn once by the model's own init (transformers' _init_weights).

    Built the usual way, every layer is first filled by torch's default init and then drawn again by
    transformers': ~1.6 s per tower on one core. Built on the meta device, the layers hold no memory until
    to_empty; init_weights then draws each parameter and buffer once, from the same distributions."""
    import torch

    with torch.device("meta"):
        model = model_class(config)
    model = model.to_empty(device="cpu")
    model.init_weights()
    return model


@contextlib.contextmanager
def quiet_transformers(errors_only: bool = True):
    """No "Loading weights" progress bar in every actor's log; with errors_only, no warnings either."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
