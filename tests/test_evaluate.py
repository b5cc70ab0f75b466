"""Retrieval and zero-shot metrics on data whose right answer is known."""

import json

import numpy as np
import pytest

from conftest import CAPTIONS, rgb_image
from pipeline.embed.demo import encode_image, write_tar_shard
from pipeline.eval.evaluate import evaluate, load_eval_config, retrieval_recall, zeroshot_accuracy

U, PER_IMAGE, D = 20, 2, 512


def ranked_texts(ranks: list[int], text_image: list[int], seed=0) -> np.ndarray:
    """Caption embeddings whose own image ranks exactly ranks[t] among U one-hot images."""
    rng = np.random.default_rng(seed)
    weights = np.linspace(1.0, 0.1, U)  # strictly decreasing: position in the order = rank
    texts = np.zeros((len(ranks), D))
    for t, (rank, image) in enumerate(zip(ranks, text_image)):
        others = [i for i in rng.permutation(U) if i != image]
        order = others[:rank] + [image] + others[rank:]
        texts[t, order] = weights
    return texts / np.linalg.norm(texts, axis=1, keepdims=True)


def test_recall_on_constructed_ranks():
    images = np.eye(U, D)
    text_image = [i for i in range(U) for _ in range(PER_IMAGE)]
    ranks = [0, 3, 0, 7, 12, 1, 4, 0, 9, 5, 2, 0, 15, 6, 0, 19, 8, 0, 11, 4,
             0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    texts = ranked_texts(ranks, text_image)
    metrics = retrieval_recall(images, texts, np.array(text_image))
    for k in (1, 5, 10):
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(np.mean([r < k for r in ranks]))
        # image-to-text, counted the slow obvious way
        hits = 0
        for image in range(U):
            top = np.argsort(-texts[:, image], kind="stable")[:k]
            hits += any(text_image[t] == image for t in top)
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(hits / U)
    assert metrics["text_to_image_R@1"] == pytest.approx(7 / 40)  # seven captions with their image first


def test_perfect_and_zeroshot_known_answers():
    images = np.eye(U, D)
    assert all(v == 1.0 for v in retrieval_recall(images, images, np.arange(U)).values())
    classes = np.eye(10, D)
    labels = np.arange(30) % 10
    # image n: its class ranks (n % 7): top-1 right for ranks 0, top-5 for ranks < 5
    ranks = np.arange(30) % 7
    image_emb = ranked_texts(list(ranks), list(labels), seed=1)[:, :D]
    image_emb[:, 10:] = 0  # only the 10 class directions carry weight ...
    order_weights = np.linspace(1.0, 0.1, U)
    for n, (rank, label) in enumerate(zip(ranks, labels)):  # ... rebuilt over 10 classes
        others = [c for c in range(10) if c != label]
        order = others[:rank] + [label] + others[rank:]
        image_emb[n] = 0
        image_emb[n, order] = order_weights[:10]
    metrics = zeroshot_accuracy(image_emb, classes, labels)
    assert metrics["top1"] == pytest.approx(np.mean(ranks == 0))
    assert metrics["top5"] == pytest.approx(np.mean(ranks < 5))


def test_eval_job_matches_the_reference_path(local_ray, tiny_models, tmp_path):
    """The job's metrics equal those computed from the Hugging Face classes called directly."""
    from test_fidelity import reference_embeddings

    images = [encode_image(rgb_image(200 + 30 * i, 240, seed=40 + i), "JPEG") for i in range(6)]
    members, captions, text_image = [], [], []
    for i, image in enumerate(images):
        for j in range(2):  # two captions per image, in separate samples sharing image_id
            caption = CAPTIONS[(i + 3 * j) % len(CAPTIONS)] + f"（{i}{j}）"
            members += [(f"s{i}_{j}.jpg", image), (f"s{i}_{j}.txt", caption.encode()),
                        (f"s{i}_{j}.json", json.dumps({"image_id": i}).encode())]
            captions.append(caption)
            text_image.append(i)
    write_tar_shard(tmp_path / "retrieval.tar", members)
    zs = []
    for n in range(8):
        zs += [(f"z{n}.jpg", images[n % 6]), (f"z{n}.cls", str(n % 3).encode())]
    write_tar_shard(tmp_path / "zeroshot.tar", zs)
    (tmp_path / "classes.txt").write_text("猫\n狗\n汽车\n", encoding="utf-8")

    text, image = tiny_models
    cfg = load_eval_config(None, [f"retrieval={tmp_path}/retrieval.tar", f"zeroshot={tmp_path}/zeroshot.tar",
                                  f"classes={tmp_path}/classes.txt", f"model.text={text}", f"model.image={image}",
                                  "encoder.batch_size=4", "encoder.torch_threads=1", "encoder.num_cpus=0.5"])
    metrics = evaluate(cfg)

    ref_images, ref_texts, _ = reference_embeddings(text, image, images * 2, captions)
    expected = retrieval_recall(ref_images[:6], ref_texts, np.array(text_image))
    assert metrics["retrieval"]["images"] == 6 and metrics["retrieval"]["captions"] == 12
    for name, value in expected.items():
        assert metrics["retrieval"][name] == pytest.approx(value), name
    from pipeline.eval.evaluate import DEFAULT_TEMPLATES

    prompts = [t.format(c) for c in ("猫", "狗", "汽车") for t in DEFAULT_TEMPLATES]
    _, prompt_emb, _ = reference_embeddings(text, image, images[:1] * len(prompts), prompts)
    class_emb = prompt_emb.reshape(3, len(DEFAULT_TEMPLATES), -1).mean(1)
    class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
    zs_images = np.stack([ref_images[n % 6] for n in range(8)])
    expected_zs = zeroshot_accuracy(zs_images, class_emb, np.arange(8) % 3)
    assert metrics["zeroshot"]["top1"] == pytest.approx(expected_zs["top1"])
    assert metrics["zeroshot"]["top5"] == pytest.approx(expected_zs["top5"])
    assert metrics["zeroshot"]["images"] == 8 and metrics["zeroshot"]["classes"] == 3


def test_eval_images_take_the_embed_jobs_stages_and_a_broken_one_is_named(local_ray, tiny_models, tmp_path, recwarn):
    """Zero-shot shards have no .txt: their images are still embedded (by the read tasks and the encoder pool);
    an image that cannot be decoded, a sample without a label or without a caption is a counted error,
    named with its key and the pipeline's reason, and left out of the metrics."""
    images = [encode_image(rgb_image(120 + 20 * i, 150, seed=i), "JPEG") for i in range(4)]
    members = [m for n in range(4) for m in ((f"z{n}.jpg", images[n]), (f"z{n}.cls", str(n % 2).encode()))]
    write_tar_shard(tmp_path / "ok.tar", members)
    (tmp_path / "classes.txt").write_text("猫\n狗\n", encoding="utf-8")
    text, image = tiny_models
    base = [f"classes={tmp_path}/classes.txt", f"model.text={text}", f"model.image={image}",
            "encoder.batch_size=2", "encoder.torch_threads=1", "encoder.num_cpus=0.5", "encoder.actors=2"]
    metrics = evaluate(load_eval_config(None, [f"zeroshot={tmp_path}/ok.tar", *base]))
    assert metrics["zeroshot"]["images"] == 4 and metrics["images"]["embedded"] == 4
    assert metrics["images"]["encoder_actors"] == 2 and metrics["images"]["images_per_s"] > 0
    # one shard, two actors configured: the pool waits for one, so Ray has nothing to warn about
    assert not [w for w in recwarn if "minimum number of concurrent actors" in str(w.message)]

    write_tar_shard(tmp_path / "broken.tar", members[:4] + [("z9.jpg", b"\xff\xd8 not a jpeg"), ("z9.cls", b"1"),
                                                          ("z8.jpg", images[3])])  # z8: no label
    caption_less = [("r0.jpg", images[0]), ("r0.txt", "一只猫".encode()), ("r1.jpg", images[1]),
                    ("r2.jpg", images[2]), ("r2.txt", "一条狗".encode())]  # r1: no caption
    write_tar_shard(tmp_path / "retrieval.tar", caption_less)
    metrics = evaluate(load_eval_config(None, [f"zeroshot={tmp_path}/broken.tar",
                                               f"retrieval={tmp_path}/retrieval.tar", *base]))
    assert metrics["zeroshot"]["images"] == 2 and metrics["retrieval"]["images"] == 2
    assert metrics["retrieval"]["captions"] == 2
    assert metrics["errors"]["samples"] == 3
    assert metrics["errors"]["by_reason"] == {"image_decode_failed": 1, "missing_label": 1, "missing_caption": 1}
    assert {(e["key"], e["error"].split(":")[0]) for e in metrics["errors"]["first"]} == {
        ("z9", "image_decode_failed"), ("z8", "missing_label"), ("r1", "missing_caption")}
