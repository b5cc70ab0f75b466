"""The pipeline's embeddings are Taiyi-CLIP's: they match the Hugging Face classes called directly."""

import io
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from conftest import CAPTIONS, job_config, rgb_image
from pipeline.embed.demo import encode_image, write_tar_shard
from pipeline.embed.encode import Encoder
from pipeline.embed.preprocess import preprocess, resolve_tokenizer
from pipeline.embed.read import read_shards


def on_white(payload: bytes) -> Image.Image:
    """The image, transparency composited on white with PIL: the pipeline's rule, which transformers' own
    convert_to_rgb follows only from 5.21 (before, it dropped the alpha channel; test_preprocess checks the rule)."""
    image = Image.open(io.BytesIO(payload))
    if "A" not in image.getbands():
        return image
    return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")


def reference_embeddings(text_dir, image_dir, images: list[bytes], captions: list[str]):
    """Fengshenbang's protocol (clip_test_flickr.py) and CLIPImageProcessor's PIL backend, no pipeline code."""
    from transformers import BertForSequenceClassification, BertTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = BertTokenizer.from_pretrained(text_dir)
    text_model = BertForSequenceClassification.from_pretrained(text_dir).eval()
    clip = CLIPModel.from_pretrained(image_dir).eval()
    processor = CLIPImageProcessorPil()
    with torch.no_grad():
        ids = tokenizer(captions, max_length=77, padding="max_length", truncation=True,
                        return_tensors="pt")["input_ids"]
        text = text_model(input_ids=ids).logits
        pixels = processor(images=[on_white(b) for b in images], return_tensors="pt")["pixel_values"]
        features = clip.get_image_features(pixel_values=pixels)
        image = features if isinstance(features, torch.Tensor) else features.pooler_output
    text = torch.nn.functional.normalize(text, dim=-1).numpy()
    image = torch.nn.functional.normalize(image, dim=-1).numpy()
    return image, text, (image * text).sum(-1)


def fidelity_samples():
    rgba = Image.new("RGBA", (260, 230), (10, 120, 200, 0))
    rgba.paste((250, 30, 30, 255), (40, 40, 180, 160))
    images = [
        encode_image(rgb_image(640, 480, 1), "JPEG", quality=90),
        encode_image(rgb_image(333, 1000, 2), "JPEG", quality=80),
        encode_image(rgb_image(224, 224, 3), "PNG"),
        encode_image(rgba, "PNG"),
        encode_image(rgb_image(500, 300, 4).convert("L"), "PNG"),
        encode_image(rgb_image(48, 32, 5), "WEBP"),
    ]
    captions = CAPTIONS[: len(images) - 1] + ["很长的描述" * 40]  # the last one is cut at 77 tokens
    return images, captions


def test_stages_match_reference_without_ray(tiny_models, tmp_path):
    text_dir, image_dir = tiny_models
    images, captions = fidelity_samples()
    exts = ["jpg", "jpg", "png", "png", "png", "webp"]
    members = []
    for i, (image, caption, ext) in enumerate(zip(images, captions, exts)):
        members += [(f"k{i}.{ext}", image), (f"k{i}.txt", caption.encode())]
    write_tar_shard(tmp_path / "s.tar", members)
    cfg = job_config(tiny_models, str(tmp_path / "s.tar"), str(tmp_path / "out"), "write.embedding_dtype=float32")

    shard_block = pa.table({"shard": [str(tmp_path / "s.tar")]})
    raw = pa.concat_tables(list(read_shards(shard_block, cfg)))
    prepared = preprocess(raw, cfg, resolve_tokenizer(cfg, random_weights=False))
    embedded = Encoder(cfg)(prepared).filter(pa.compute.greater_equal(prepared.column("position"), 0))

    assert embedded.column("status").to_pylist() == ["ok"] * len(images)
    ref_image, ref_text, ref_sim = reference_embeddings(text_dir, image_dir, images, captions)
    ours_image = np.array(embedded.column("image_embedding").to_pylist(), np.float32)
    ours_text = np.array(embedded.column("text_embedding").to_pylist(), np.float32)
    assert np.abs(ours_image - ref_image).max() < 1e-3
    assert np.abs(ours_text - ref_text).max() < 1e-3
    assert np.abs(embedded.column("similarity").to_numpy() - ref_sim).max() < 1e-3
    # the tiny towers are not degenerate: different inputs give clearly different embeddings
    assert np.abs(ref_image[0] - ref_image[1]).max() > 1e-2 and np.abs(ref_text[0] - ref_text[1]).max() > 1e-2
    assert "caption_truncated" in embedded.column("warning").to_pylist()[-1]


def test_token_ids_are_the_reference_tokenizers(tiny_models, tmp_path):
    from transformers import BertTokenizer

    from pipeline.embed.preprocess import load_tokenizer, tokenize

    captions = ["一只猫", "Hello 世界 123!", "😀 表情", "a" * 300, "控制\x07字符"]
    ours = tokenize(load_tokenizer(str(tiny_models[0]), None), captions)
    ref = BertTokenizer.from_pretrained(tiny_models[0])(captions, max_length=77, padding="max_length",
                                                        truncation=True)["input_ids"]
    assert ours.shape == (5, 77)
    assert ours.tolist() == ref
    assert ours[0, :5].tolist() == [101, 671, 1372, 4344, 102]  # [CLS] 一 只 猫 [SEP] in the real vocab


LAYER_FAULTS = """
import ctypes, ctypes.util, json, resource, sys
from pipeline.embed.encode import keep_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size = 64 * 2**20

def faults_of_one_layer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults_of_one_layer() for _ in range(2)]
kept = keep_freed_memory()
faults_of_one_layer()  # the heap grows once
print(json.dumps({"default": default, "kept": kept, "after": faults_of_one_layer()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_activations_are_reused_not_faulted_in_again():
    """keep_freed_memory: a freed 64 MiB block (BERT's MLP output at batch 64 is 60 MB) is reused by the
    next allocation; under glibc's defaults it is unmapped on free and all its 16,384 pages fault again.
    In a fresh process: the in-process fidelity test above has already called it in this one."""
    out = subprocess.run([sys.executable, "-c", LAYER_FAULTS], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    faults = json.loads(out.stdout)
    assert min(faults["default"]) > 8_000  # the default: mapped afresh every time
    assert faults["kept"] and faults["after"] < 100


@pytest.mark.parametrize("tower", ["text", "image"])
def test_random_towers_are_drawn_once_from_the_models_own_init(tower):
    """The random-weight fallback builds on the meta device and initialises once: every buffer is what the
    usual constructor makes, and every parameter has the spread transformers' own init gives it."""
    from transformers import BertConfig, BertForSequenceClassification, CLIPVisionConfig, CLIPVisionModelWithProjection

    from pipeline.embed.model import initialised_once

    model_class, config = {
        "text": (BertForSequenceClassification, BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=512, num_labels=512)),
        "image": (CLIPVisionModelWithProjection, CLIPVisionConfig(hidden_size=128, intermediate_size=512,
                                                                  num_hidden_layers=2, num_attention_heads=2,
                                                                  image_size=224, patch_size=32, projection_dim=512)),
    }[tower]
    torch.manual_seed(0)
    usual, once = model_class(config), initialised_once(model_class, config)
    usual_buffers = dict(usual.named_buffers())
    assert usual_buffers and set(usual_buffers) == {name for name, _ in once.named_buffers()}
    for name, buffer in once.named_buffers():
        assert torch.equal(buffer, usual_buffers[name]), name
    usual_params = dict(usual.named_parameters())
    for name, param in once.named_parameters():
        param, expected = param.detach(), usual_params[name].detach()
        assert param.shape == expected.shape and torch.isfinite(param).all(), name
        if expected.std() == 0:  # constants: biases 0, LayerNorm weights 1
            assert torch.equal(param, expected), name
        else:
            assert float(param.std()) == pytest.approx(float(expected.std()), rel=0.15), name
            assert abs(float(param.mean())) < 0.2 * float(expected.std()) + 1e-3, name


def test_random_weights_are_drawn_once_per_machine_and_every_encoder_loads_them(tmp_path, monkeypatch, caplog):
    """Random towers are drawn once (seed 0) into the cache, under a lock, and loaded like real weights: encoders
    that start together draw them once, and every encoder embeds with the same weights."""
    import threading

    from pipeline.embed import model
    from pipeline.config import load_config

    monkeypatch.setenv("TAIYI_EMBED_CACHE", str(tmp_path / "cache"))
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    monkeypatch.setattr(model, "TEXT_ARCH", {**model.TEXT_ARCH, **small, "vocab_size": 1000})
    monkeypatch.setattr(model, "IMAGE_ARCH", {**model.IMAGE_ARCH, **small})
    cfg = load_config(None, ["input=unused", f"output={tmp_path / 'out'}", "model.random_weights=true"])

    loaded = []
    starters = [threading.Thread(target=lambda: loaded.append(model.load_towers(cfg, random_weights=True)))
                for _ in range(3)]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join()
    assert len(loaded) == 3
    assert sum("drawn and saved" in r.getMessage() for r in caplog.records) == 2  # text and image, once each
    (root,) = (tmp_path / "cache" / "random-weights").iterdir()
    assert sorted(p.name for p in root.iterdir()) == [".lock", "image", "text"]  # no half-written folder left
    for text, image in loaded[1:]:
        for mine, first in ((text, loaded[0][0]), (image, loaded[0][1])):
            first_params = dict(first.named_parameters())
            for name, param in mine.named_parameters():
                assert torch.equal(param, first_params[name]), name
    assert float(loaded[0][0].classifier.weight.detach().std()) > 0  # drawn, not zeros

    # drawn again from scratch (a new machine, or another node): the same weights, from the seed
    monkeypatch.setenv("TAIYI_EMBED_CACHE", str(tmp_path / "other-node"))
    text, _ = model.load_towers(cfg, random_weights=True)
    assert torch.equal(text.classifier.weight, loaded[0][0].classifier.weight)


def test_a_non_finite_embedding_is_an_error_row_never_ok(tiny_models, tmp_path, monkeypatch):
    """An embedding with a NaN or inf (fp16 overflow, a broken checkpoint) becomes an error row with the reason
    non_finite_embedding; the other rows of the batch stay ok."""
    images, captions = fidelity_samples()
    members = []
    for i, (image, caption) in enumerate(zip(images[:3], captions)):
        members += [(f"k{i}.{['jpg', 'jpg', 'png'][i]}", image), (f"k{i}.txt", caption.encode())]
    write_tar_shard(tmp_path / "s.tar", members)
    cfg = job_config(tiny_models, str(tmp_path / "s.tar"), str(tmp_path / "out"))
    raw = pa.concat_tables(list(read_shards(pa.table({"shard": [str(tmp_path / "s.tar")]}), cfg)))
    prepared = preprocess(raw, cfg, resolve_tokenizer(cfg, random_weights=False))
    encoder = Encoder(cfg)
    embed = encoder.embed

    def one_nan(images, input_ids):
        image_emb, text_emb, similarity = embed(images, input_ids)
        image_emb[1, 7] = np.nan  # the second sample's image embedding
        return image_emb, text_emb, (image_emb * text_emb).sum(-1)

    monkeypatch.setattr(encoder, "embed", one_nan)
    embedded = encoder(prepared).filter(pa.compute.greater_equal(prepared.column("position"), 0))
    assert embedded.column("status").to_pylist() == ["ok", "error", "ok"]
    assert embedded.column("error").to_pylist()[1] == "non_finite_embedding: NaN or inf from the image tower"
    assert embedded.column("image_embedding").to_pylist()[1] is None and embedded.column("similarity").is_valid()[
        1].as_py() is False
