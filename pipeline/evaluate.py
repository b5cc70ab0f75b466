"""Retrieval Recall@1/5/10 (both directions) and zero-shot top-1/top-5, with the pipeline's own encoders.

Retrieval follows Fengshenbang's evaluation: a similarity matrix between every caption and every unique
image; text-to-image is a hit when the caption's image ranks in the top K, image-to-text when any of the
image's captions does. Zero-shot: each class's text embedding is the normalised mean of its prompt
embeddings (Chinese templates), and an image's prediction is the nearest class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import ray

from pipeline import storage
from pipeline.config import EncoderCfg, JobCfg, ModelCfg, ReadCfg, StorageCfg, _build, read_raw
from pipeline.preprocess import decode_caption, decode_image, load_tokenizer, tokenize
from pipeline.read import IMAGE_EXTENSIONS, RawSample, read_shard

log = logging.getLogger(__name__)

KS = (1, 5, 10)
# Chinese prompt templates in the style of Chinese-CLIP's zero-shot ImageNet templates
DEFAULT_TEMPLATES = ["{}的照片。", "一张{}的照片。", "一张{}的图片。", "一幅{}的图像。", "{}的特写照片。",
                     "一张清晰的{}的照片。", "一张模糊的{}的照片。", "一张{}的黑白照片。", "一张小{}的照片。",
                     "一张大{}的照片。", "一张{}的裁剪照片。", "一张明亮的{}的照片。"]


@dataclass(frozen=True)
class EvalCfg:
    # image-caption shards for retrieval (samples of one image share `image_id` or `url` in KEY.json); null: skip
    retrieval: str | None = None
    # image shards with KEY.cls (class index) for zero-shot classification; null: skip
    zeroshot: str | None = None
    # class names, one per line (e.g. Chinese-CLIP's ImageNet label_cn.txt); required with zeroshot
    classes: str | None = None
    # prompt templates, one per line with {} for the class name; null: the built-in Chinese templates
    templates: str | None = None
    # where metrics.json is written; null: only printed
    output: str | None = None
    model: ModelCfg = field(default_factory=ModelCfg)
    read: ReadCfg = field(default_factory=ReadCfg)
    encoder: EncoderCfg = field(default_factory=EncoderCfg)
    storage: StorageCfg = field(default_factory=StorageCfg)

    def job_cfg(self) -> JobCfg:
        """The embed job's config with the same model, read and encoder settings (for shared code paths)."""
        return JobCfg(input=self.retrieval or self.zeroshot or "", output=self.output or "(none)", model=self.model,
                      read=self.read, encoder=self.encoder, storage=self.storage)


def load_eval_config(path, overrides=()) -> EvalCfg:
    from pipeline.config import validate

    cfg = _build(EvalCfg, read_raw(path, overrides), "")
    if not cfg.retrieval and not cfg.zeroshot:
        raise ValueError("set retrieval and/or zeroshot: the evaluation shards")
    if cfg.zeroshot and not cfg.classes:
        raise ValueError("classes: required with zeroshot (class names, one per line)")
    validate(cfg.job_cfg())
    return cfg


# ---- metrics: plain numpy on L2-normalised embeddings ----

def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray) -> dict:
    """Recall@K both ways. text_image[t] is the index (into image_emb) of caption t's image."""
    sim = text_emb @ image_emb.T  # captions x unique images
    correct = sim[np.arange(len(text_emb)), text_image]
    # rank = images scoring strictly higher than the right one (ties resolved in its favour, as argsort would not)
    t2i_rank = (sim > correct[:, None]).sum(1)
    metrics = {f"text_to_image_R@{k}": float((t2i_rank < k).mean()) for k in KS}
    order = np.argsort(-sim.T, axis=1, kind="stable")  # per image, captions by score
    for k in KS:
        top = text_image[order[:, :k]]
        metrics[f"image_to_text_R@{k}"] = float((top == np.arange(len(image_emb))[:, None]).any(1).mean())
    metrics["mean_recall"] = float(np.mean([metrics[m] for m in metrics]))
    return metrics


def zeroshot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> dict:
    order = np.argsort(-(image_emb @ class_emb.T), axis=1, kind="stable")
    return {"top1": float((order[:, 0] == labels).mean()), "top5": float((order[:, :5] == labels[:, None]).any(1).mean())}


# ---- embedding the evaluation data ----

class EvalEncoder:
    """A Ray actor around the pipeline's Encoder: images and texts separately."""

    def __init__(self, cfg: JobCfg, random_weights: bool, tokenizer: tuple[str, str | None]):
        from pipeline.encode import Encoder

        self.encoder, self.tokenizer = Encoder(cfg, random_weights), load_tokenizer(*tokenizer)
        self.batch_size = cfg.encoder.batch_size

    def images(self, pixels: np.ndarray) -> np.ndarray:
        return np.concatenate([self.encoder.embed_images(pixels[i: i + self.batch_size]).cpu().numpy()
                               for i in range(0, len(pixels), self.batch_size)] or [np.zeros((0, 512), np.float32)])

    def texts(self, texts: list[str]) -> np.ndarray:
        ids = tokenize(self.tokenizer, texts)
        return np.concatenate([self.encoder.embed_texts(ids[i: i + self.batch_size]).cpu().numpy()
                               for i in range(0, len(ids), self.batch_size)])


def _samples(url_pattern: str, cfg: JobCfg) -> list[RawSample]:
    from pipeline.shards import list_shards

    shards = list_shards(JobCfg(input=url_pattern, output="unused", model=cfg.model, read=cfg.read,
                                encoder=cfg.encoder, storage=cfg.storage))
    samples = []
    for shard in shards:
        for item in read_shard(shard.url, cfg):
            if isinstance(item, RawSample):
                samples.append(item)
            elif item[1]:
                raise ValueError(f"evaluation shard {shard.url}: {item[1]}")
    return samples


def _pixels(sample: RawSample, cfg: JobCfg) -> np.ndarray:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
    if ext is None:
        raise ValueError(f"evaluation sample {sample.key} has no image")
    return decode_image(sample.members[ext], cfg.read.image_size, cfg.read.max_image_pixels)


def _image_group(sample: RawSample) -> str:
    import json

    if "json" in sample.members:
        try:
            meta = json.loads(sample.members["json"])
            if isinstance(meta, dict) and (meta.get("image_id") is not None or meta.get("url")):
                return str(meta.get("image_id") if meta.get("image_id") is not None else meta["url"])
        except ValueError:
            pass
    return sample.key


def evaluate(cfg: EvalCfg) -> dict:
    from pipeline.preprocess import resolve_tokenizer
    from pipeline.encode import decide_random_weights

    job = cfg.job_cfg()
    random_weights = decide_random_weights(job)
    tokenizer = resolve_tokenizer(job, random_weights)
    actor = ray.remote(num_cpus=cfg.encoder.num_cpus, num_gpus=cfg.encoder.num_gpus)(EvalEncoder).remote(
        job, random_weights, tokenizer)
    result = {"model": {"text": cfg.model.text, "image": cfg.model.image, "random_weights": random_weights}}
    if cfg.retrieval:
        samples = _samples(cfg.retrieval, job)
        groups, pixels, captions, text_image = {}, [], [], []
        for sample in samples:
            group = _image_group(sample)
            if group not in groups:
                groups[group] = len(pixels)
                pixels.append(_pixels(sample, job))
            for line in decode_caption(sample.members.get("txt")).splitlines():
                if line.strip():
                    captions.append(line.strip())
                    text_image.append(groups[group])
        image_emb = ray.get(actor.images.remote(np.stack(pixels)))
        text_emb = ray.get(actor.texts.remote(captions))
        result["retrieval"] = {"images": len(pixels), "captions": len(captions),
                               **retrieval_recall(image_emb, text_emb, np.array(text_image))}
    if cfg.zeroshot:
        classes = _lines(cfg.classes, cfg.storage)
        templates = _lines(cfg.templates, cfg.storage) if cfg.templates else DEFAULT_TEMPLATES
        prompts = [t.format(c) for c in classes for t in templates]
        prompt_emb = ray.get(actor.texts.remote(prompts)).reshape(len(classes), len(templates), -1)
        class_emb = prompt_emb.mean(1)
        class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
        samples = _samples(cfg.zeroshot, job)
        labels = np.array([int(s.members["cls"].decode().strip()) if "cls" in s.members else -1 for s in samples])
        if (labels < 0).any() or (labels >= len(classes)).any():
            raise ValueError("zeroshot: every sample needs a KEY.cls with a class index into `classes`")
        image_emb = ray.get(actor.images.remote(np.stack([_pixels(s, job) for s in samples])))
        result["zeroshot"] = {"images": len(samples), "classes": len(classes), "templates": len(templates),
                              **zeroshot_accuracy(image_emb, class_emb, labels)}
    ray.kill(actor)
    return result


def _lines(url: str, storage_cfg: StorageCfg) -> list[str]:
    fs, path = storage.filesystem(url, storage_cfg)
    with fs.open(path, "rb") as f:
        return [line.strip() for line in f.read().decode("utf-8-sig").splitlines() if line.strip()]

