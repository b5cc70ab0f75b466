"""Retrieval Recall@1/5/10 (both directions) and zero-shot top-1/top-5, with the pipeline's own encoders.

Retrieval follows Fengshenbang's evaluation: a similarity matrix between every caption and every unique
image; text-to-image is a hit when the caption's image ranks in the top K, image-to-text when any of the
image's captions does. Zero-shot: each class's text embedding is the normalised mean of its prompt
embeddings (Chinese templates), and an image's prediction is the nearest class.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.io import storage
from pipeline.config import (EncoderCfg, JobCfg, ModelCfg, ReadCfg, StorageCfg, WriteCfg, build_config, read_raw,
                             resolve_actors)
from pipeline.embed.preprocess import load_tokenizer, preprocess, tokenize
from pipeline.embed.read import CAPTION_EXTENSION, LABEL_EXTENSION, RawSample, read_shard, read_shards
from pipeline.io.schema import EMBEDDING_DIM, STATUS_OK

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
                      read=self.read, encoder=self.encoder, storage=self.storage,
                      write=WriteCfg(embedding_dtype="float32"))  # metrics from full-precision embeddings


def load_eval_config(path, overrides=()) -> EvalCfg:
    from pipeline.config import validate

    cfg = build_config(EvalCfg, read_raw(path, overrides), "")
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

class TextEncoder:
    """A Ray actor around the pipeline's Encoder for the captions and prompts (images go through the pool)."""

    def __init__(self, cfg: JobCfg, random_weights: bool, tokenizer: tuple[str, str | None]):
        from pipeline.embed.encode import Encoder

        self.encoder, self.tokenizer = Encoder(cfg, random_weights), load_tokenizer(*tokenizer)
        self.batch_size = cfg.encoder.batch_size

    def texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        ids = tokenize(self.tokenizer, texts)
        return np.concatenate([self.encoder.embed_texts(ids[i: i + self.batch_size]).cpu().numpy()
                               for i in range(0, len(ids), self.batch_size)])


@dataclass
class EvalSample:
    shard: str
    position: int
    key: str
    group: str                 # samples of one image share it (retrieval)
    captions: list[str]        # the .txt's non-empty lines (retrieval)
    label: int | None          # the .cls class index (zero-shot)


def shard_metadata(url: str, cfg: JobCfg) -> list[EvalSample]:
    """Everything but the image of one evaluation shard's samples (a Ray task per shard; no decoding)."""
    samples = []
    for item in read_shard(url, cfg):
        if not isinstance(item, RawSample):
            if item[1]:
                raise ValueError(f"evaluation shard {url}: {item[1]}")
            continue
        text = item.members.get(CAPTION_EXTENSION)
        label = item.members.get(LABEL_EXTENSION)
        samples.append(EvalSample(
            url, item.position, item.key, _image_group(item),
            [line.strip() for line in text.decode("utf-8-sig").splitlines() if line.strip()] if text else [],
            int(label.decode().strip()) if label and label.strip().isdigit() else None))
    return samples


def _image_group(sample: RawSample) -> str:
    """image_id, else url, of KEY.json; else the key: captions of one image share it."""
    import json

    if "json" in sample.members:
        try:
            meta = json.loads(sample.members["json"])
            if isinstance(meta, dict) and (meta.get("image_id") is not None or meta.get("url")):
                return str(meta.get("image_id") if meta.get("image_id") is not None else meta["url"])
        except ValueError:
            pass
    return sample.key


def eval_samples(url_pattern: str, cfg: JobCfg) -> list[EvalSample]:
    from pipeline.io.shards import list_shards

    urls = [s.url for s in list_shards(dataclasses.replace(cfg, input=url_pattern))]
    task = ray.remote(num_cpus=cfg.read.num_cpus)(shard_metadata)
    return [sample for shard in ray.get([task.remote(url, cfg) for url in urls]) for sample in shard]


def read_images(batch: pa.Table, cfg: JobCfg, tokenizer: tuple[str, str | None]):
    """The embed job's CPU stage (read_shards + preprocess) for images alone: the caption column is a
    placeholder, so that an image without a .txt (zero-shot sets) is embedded rather than an error."""
    for raw in read_shards(batch, cfg):
        placeholder = pa.array([b"-"] * raw.num_rows, pa.binary())
        yield preprocess(raw.set_column(raw.schema.get_field_index("caption"), "caption", placeholder),
                         cfg, tokenizer)


def image_embeddings(cfg: JobCfg, urls: list[str], random_weights: bool, tokenizer: tuple[str, str | None]
                     ) -> tuple[dict[tuple[str, int], np.ndarray], dict[tuple[str, int], str]]:
    """({(shard, position): float32 image embedding}, {(shard, position): error}) of every sample: decoded by CPU
    tasks and encoded by the encoder pool, the embed job's own stages (run.embedding_dataset). An image that
    fails is an error row, as in the embed job: counted and named in the metrics, never silently dropped."""
    from pipeline.embed.run import embedding_dataset

    ds = embedding_dataset(cfg, urls, random_weights, tokenizer, read_stage=read_images, texts=False)
    embeddings, errors = {}, {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        batch = batch.filter(pc.greater_equal(batch.column("position"), 0))
        vectors = batch.column("image_embedding").combine_chunks()
        for i, (shard, position, status, error) in enumerate(zip(
                *(batch.column(name).to_pylist() for name in ("shard", "position", "status", "error")))):
            if status != STATUS_OK:
                errors[shard, position] = error
            else:
                embeddings[shard, position] = np.asarray(vectors[i].values.to_numpy(), np.float32)
    return embeddings, errors


def check_before_ray(cfg: EvalCfg) -> bool:
    """What can be wrong before any work (no shards, no access, weights out of reach) raises here, before Ray
    starts: ValueError or storage.StorageError. Returns whether the weights are random."""
    from pipeline.embed.model import decide_random_weights
    from pipeline.io.shards import list_shards

    job = cfg.job_cfg()
    for pattern in (cfg.retrieval, cfg.zeroshot):
        if pattern:
            list_shards(dataclasses.replace(job, input=pattern))
    for path in filter(None, (cfg.classes, cfg.templates)):
        storage.check_readable(path, cfg.storage)
    return decide_random_weights(job)


def sample_error(sample: EvalSample, error: str) -> dict:
    return {"key": sample.key, "shard": sample.shard, "position": sample.position, "error": error}


def evaluate(cfg: EvalCfg, random_weights: bool | None = None) -> dict:
    from pipeline.embed.model import decide_random_weights
    from pipeline.embed.preprocess import resolve_tokenizer

    job = resolve_actors(cfg.job_cfg(), ray.cluster_resources())
    random_weights = decide_random_weights(job) if random_weights is None else random_weights
    tokenizer = resolve_tokenizer(job, random_weights)
    result = {"model": {"text": cfg.model.text, "image": cfg.model.image, "random_weights": random_weights}}
    errors = []  # samples that cannot be evaluated: counted and named, as the embed job's error rows
    retrieval = eval_samples(cfg.retrieval, job) if cfg.retrieval else []
    errors += [sample_error(s, "missing_caption: no caption in KEY.txt") for s in retrieval if not s.captions]
    retrieval = [s for s in retrieval if s.captions]
    zeroshot = eval_samples(cfg.zeroshot, job) if cfg.zeroshot else []
    if cfg.zeroshot:
        classes = _lines(cfg.classes, cfg.storage)
        templates = _lines(cfg.templates, cfg.storage) if cfg.templates else DEFAULT_TEMPLATES
        unlabelled = [s for s in zeroshot if s.label is None or not 0 <= s.label < len(classes)]
        errors += [sample_error(s, "missing_label: no KEY.cls with a class index into `classes`") for s in unlabelled]
        zeroshot = [s for s in zeroshot if s not in unlabelled]

    # the texts first, in one actor that is gone before the encoder pool asks for the GPUs
    captions = [caption for sample in retrieval for caption in sample.captions]
    prompts = [t.format(c) for c in classes for t in templates] if cfg.zeroshot else []
    actor = ray.remote(num_cpus=job.encoder.num_cpus, num_gpus=job.encoder.num_gpus)(TextEncoder).remote(
        job, random_weights, tokenizer)
    all_text_emb, prompt_emb = ray.get([actor.texts.remote(captions), actor.texts.remote(prompts)])
    ray.kill(actor)

    started = time.perf_counter()
    urls = list(dict.fromkeys(s.shard for s in retrieval + zeroshot))
    images, image_errors = image_embeddings(job, urls, random_weights, tokenizer) if urls else ({}, {})
    errors += [sample_error(s, image_errors[s.shard, s.position]) for s in retrieval + zeroshot
               if (s.shard, s.position) in image_errors]
    # the captions of samples whose image failed leave with them
    caption_rows = np.cumsum([0] + [len(s.captions) for s in retrieval])
    kept_rows = [r for i, s in enumerate(retrieval) if (s.shard, s.position) in images
                 for r in range(caption_rows[i], caption_rows[i + 1])]
    text_emb = all_text_emb[kept_rows] if retrieval else all_text_emb
    retrieval = [s for s in retrieval if (s.shard, s.position) in images]
    zeroshot = [s for s in zeroshot if (s.shard, s.position) in images]
    captions = [caption for sample in retrieval for caption in sample.captions]
    result["images"] = {"embedded": len(images), "encoder_actors": job.encoder.actors,
                        "images_per_s": round(len(images) / (time.perf_counter() - started), 2)}
    result["errors"] = {"samples": len(errors),
                        "by_reason": dict(collections.Counter(e["error"].split(":", 1)[0] for e in errors)),
                        "first": errors[:20]}
    if (cfg.retrieval and not retrieval) or (cfg.zeroshot and not zeroshot):
        raise ValueError(f"no sample left to evaluate: {len(errors)} errors, e.g. {errors[:3]}")
    if cfg.retrieval:
        groups: dict[str, int] = {}
        firsts, text_image = [], []
        for sample in retrieval:
            if sample.group not in groups:
                groups[sample.group] = len(firsts)
                firsts.append(images[sample.shard, sample.position])
            text_image += [groups[sample.group]] * len(sample.captions)
        result["retrieval"] = {"images": len(firsts), "captions": len(captions),
                               **retrieval_recall(np.stack(firsts), text_emb, np.array(text_image))}
    if cfg.zeroshot:
        class_emb = prompt_emb.reshape(len(classes), len(templates), -1).mean(1)
        class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
        image_emb = np.stack([images[s.shard, s.position] for s in zeroshot])
        labels = np.array([s.label for s in zeroshot])
        result["zeroshot"] = {"images": len(zeroshot), "classes": len(classes), "templates": len(templates),
                              **zeroshot_accuracy(image_emb, class_emb, labels)}
    return result


def _lines(url: str, storage_cfg: StorageCfg) -> list[str]:
    fs, path = storage.filesystem(url, storage_cfg)
    with fs.open(path, "rb") as f:
        return [line.strip() for line in f.read().decode("utf-8-sig").splitlines() if line.strip()]

