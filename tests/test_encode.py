"""The encoder's towers: one shape for every batch (a partial one padded), weights cast once for autocast."""

import numpy as np
import torch

from conftest import job_config
from pipeline.embed import encode
from pipeline.embed.encode import Encoder
from pipeline.embed.preprocess import load_tokenizer, resolve_tokenizer, tokenize

BATCH = 8


def encoder_and_inputs(tiny_models, tmp_path, rows: int, *overrides: str):
    cfg = job_config(tiny_models, "unused", str(tmp_path / "out"), f"encoder.batch_size={BATCH}", *overrides)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (rows, 224, 224, 3), dtype=np.uint8)
    ids = tokenize(load_tokenizer(*resolve_tokenizer(cfg, random_weights=False)),
                   [f"第{i}张图片，一只猫" for i in range(rows)])
    return Encoder(cfg), pixels, ids, cfg


def record_batch_sizes(encoder: Encoder) -> list[int]:
    seen = []
    for tower, name in ((encoder.image_model, "pixel_values"), (encoder.text_model, "input_ids")):
        tower.register_forward_pre_hook(lambda module, args, kwargs, name=name: seen.append(len(kwargs[name])),
                                        with_kwargs=True)
    return seen


def test_the_towers_see_the_configured_batch_size_whatever_the_batch(tiny_models, tmp_path):
    """A partial batch runs padded to encoder.batch_size, a larger input batch by batch, and only the input's
    own rows come back, each as it would alone."""
    encoder, pixels, ids, _ = encoder_and_inputs(tiny_models, tmp_path, 19)
    seen = record_batch_sizes(encoder)
    image_emb, text_emb, similarity = encoder.embed(pixels[:5], ids[:5])
    assert image_emb.shape == text_emb.shape == (5, 512) and similarity.shape == (5,)
    assert seen == [BATCH, BATCH]  # image tower, text tower
    seen.clear()
    images = encoder.embed_images(pixels).numpy()
    assert images.shape == (19, 512) and seen == [BATCH] * 3
    # a row's embedding does not depend on what else was in its batch, or on the padding
    np.testing.assert_allclose(images[:5], image_emb, atol=1e-6)
    for i in (0, 9, 18):
        np.testing.assert_allclose(encoder.embed_images(pixels[i : i + 1]).numpy()[0], images[i], atol=1e-6)
    np.testing.assert_allclose(similarity, (image_emb * text_emb).sum(-1), atol=1e-6)


def test_weights_cast_once_give_what_autocast_gives(tiny_models, tmp_path, monkeypatch):
    """Linear and convolution weights are cast to the autocast dtype when the actor loads them (bf16 on CPU
    here, fp16 on a GPU): the embeddings are bit for bit those of autocast casting them on every batch."""
    cast_once, pixels, ids, cfg = encoder_and_inputs(tiny_models, tmp_path, 6, "model.precision=bf16")
    assert cast_once.image_model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert cast_once.text_model.classifier.weight.dtype == torch.bfloat16
    assert cast_once.text_model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    assert cast_once.image_model.vision_model.post_layernorm.weight.dtype == torch.float32
    monkeypatch.setattr(encode, "cast_for_autocast", lambda model, dtype: None)
    per_batch = Encoder(cfg)
    assert per_batch.text_model.classifier.weight.dtype == torch.float32
    for ours, theirs in zip(cast_once.embed(pixels, ids), per_batch.embed(pixels, ids)):
        assert np.array_equal(ours, theirs)



def test_a_tower_whose_cuda_graph_capture_fails_runs_eagerly_with_a_warning(tiny_models, tmp_path, monkeypatch,
                                                                            caplog):
    """encoder.cuda_graphs with a forward pass that cannot be captured (one that syncs with the host): the
    tower runs eagerly from then on, with one warning per tower, and the embeddings are the eager ones."""
    encoder, pixels, ids, _ = encoder_and_inputs(tiny_models, tmp_path, 6)
    eager = encoder.embed(pixels, ids)

    def capture(self, rows):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(encode.GraphedTower, "capture", capture)
    encoder.cuda_graphs = True  # on CPU only for this test: the config refuses it without a GPU
    for _ in range(2):
        for ours, theirs in zip(encoder.embed(pixels, ids), eager):
            assert np.array_equal(ours, theirs)
    assert {name: graph.failed for name, graph in encoder._thread.graphs.items()} == {"image": True, "text": True}
    assert [r.message for r in caplog.records if "capture" in r.message] == [
        "CUDA graph capture of the image tower failed, running it eagerly: operation not permitted when stream "
        "is capturing",
        "CUDA graph capture of the text tower failed, running it eagerly: operation not permitted when stream "
        "is capturing"]


def test_batches_in_flight_capture_their_cuda_graphs_one_at_a_time(tiny_models, tmp_path, monkeypatch):
    """Each batch in flight captures its own graphs on its first batch, so two threads start together; PyTorch
    allows one capture underway per process (torch.cuda.graph: one shared capture stream, and a device-wide
    synchronize at its start, which breaks another capture). The captures queue behind each other; each
    thread's batch still gets its embeddings. (On CPU the capture is a stand-in that takes its time.)"""
    import threading
    import time

    encoder, pixels, ids, _ = encoder_and_inputs(tiny_models, tmp_path, 6)
    eager = encoder.embed(pixels, ids)
    inside, most, captures = [0], [0], []

    def capture(self, rows):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        captures.append((threading.get_ident(), self.name))
        time.sleep(0.3)
        inside[0] -= 1
        raise RuntimeError("a stand-in capture (no GPU here)")

    monkeypatch.setattr(encode.GraphedTower, "capture", capture)
    encoder.cuda_graphs = True  # on CPU only for this test: the config refuses it without a GPU
    results = [None, None]

    def in_flight(i):
        results[i] = encoder.embed(pixels, ids)

    threads = [threading.Thread(target=in_flight, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(captures) == 4 and len({thread for thread, _ in captures}) == 2  # image and text, in each thread
    assert most[0] == 1
    for result in results:
        for ours, theirs in zip(result, eager):
            assert np.array_equal(ours, theirs)
