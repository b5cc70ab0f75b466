"""Typed job configuration: YAML file + `--set dotted.key=value` overrides, validated before Ray starts."""

from __future__ import annotations

import dataclasses
import json
import logging
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DECODE_PLACEMENTS = ("tasks", "encoder")
AUTO_ACTORS = "auto"  # encoder.actors sized from the Ray cluster (resolve_actors)
EMBEDDING_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class ModelCfg:
    # Hugging Face id or local directory of the Taiyi text tower (BertForSequenceClassification, 512 logits)
    text: str = "IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese"
    # git revision (commit, tag, branch) of `text` on the Hub; null = main
    text_revision: str | None = None
    # Hugging Face id or local directory of the CLIP image tower (vision model + visual projection are loaded)
    image: str = "openai/clip-vit-base-patch32"
    # git revision of `image` on the Hub; null = main
    image_revision: str | None = None
    # tokenizer id/dir; null = the text model's own tokenizer, or the bundled Chinese BERT vocab if it ships none
    tokenizer: str | None = None
    # auto | fp32 | fp16 | bf16 (auto: fp16 on CUDA, fp32 on CPU)
    precision: str = "auto"
    # demo only: if the weights cannot be fetched, use random weights of the same architecture (loudly)
    random_init_fallback: bool = False
    # benchmark only: random weights of the real architectures, without trying to fetch (labelled in output)
    random_weights: bool = False


@dataclass(frozen=True)
class ReadCfg:
    # samples per block that leaves a read task (bounds memory: ~150 KB of pixels per sample)
    batch_size: int = 128
    # CPU cores reserved per read+decode task
    num_cpus: float = 1.0
    # attempts per shard before it is reported as failed (transient storage errors)
    attempts: int = 3
    # first retry delay in seconds, doubled on each attempt
    retry_backoff_s: float = 1.0
    # images whose header claims more pixels than this are rejected before decoding (decompression bombs)
    max_image_pixels: int = 89_478_485
    # side of the square image fed to the image tower (OpenAI CLIP protocol: 224)
    image_size: int = 224
    # where images are decoded and resized: tasks = the CPU read tasks, exactly as the reference protocol;
    # encoder = the read tasks ship JPEG bytes and the encoder actor decodes them on its own device
    # (nvJPEG + PIL's own bicubic resize, batched, on a GPU: only the JPEG decode differs from the exact path,
    # see README "Decode placement")
    decode_on: str = "tasks"
    # decode_on=encoder: the most source pixels (width x height, summed over images) decoded on the device at
    # once; a batch of larger images is decoded and resized in chunks under it (256M: ~0.8 GB of RGB)
    device_decode_pixels: int = 256_000_000
    # decode_on=encoder on a GPU: the batched resize as torch operations (torch) or as two fused Triton kernels
    # (triton: the same bytes, tests/test_resize_kernel.py; triton comes with CUDA builds of torch); torch until
    # a GPU measurement shows which is faster
    device_resize: str = "torch"
    # node labels the read tasks are scheduled on (Ray label_selector), e.g. {node-kind: cpu} keeps the
    # decode work on CPU-only nodes; {} = any node with free CPUs
    node_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderCfg:
    # encoder actors: a number (a fixed pool, one per GPU on a GPU cluster), a range "min..max" (an
    # autoscaling pool that grows while batches queue up, and the cluster autoscaler adds GPU nodes for it),
    # or auto: one per GPU (num_gpus > 0) or one per CPU (num_gpus = 0) of the Ray cluster the job runs on,
    # counted when the job starts (a local run: the local Ray's, so every core of this machine)
    actors: int | str = 1
    # GPUs reserved per actor; 0 runs the towers on CPU. A fraction puts several actors on one GPU (0.5: two,
    # 0.25: four), each a process with its own host thread and CUDA context, so that one's host work
    # (unpacking, decode, copies) overlaps another's GPU work; above 1, a whole number
    num_gpus: float = 0.0
    # auto: CUDA when num_gpus > 0, else CPU; cpu with num_gpus > 0 only for scheduling tests on logical GPUs
    device: str = "auto"
    # CPU cores reserved per actor; keep below the node's cores so read tasks are not starved
    num_cpus: float = 1.0
    # pairs per forward pass: the towers always run at this size (a partial batch is padded, the padding dropped)
    batch_size: int = 64
    # host memory Ray reserves per actor (its `memory` resource), so that a node takes no more actors than
    # its memory holds, and encoder.actors=auto counts it; null reserves none. On CPU an actor holds the
    # fp32 towers and one batch's activations: 1.8 GiB at batch 64 (BENCHMARKS.md)
    memory_gib: float | None = None
    # torch intra-op threads inside each actor (Ray sets OMP_NUM_THREADS to num_cpus otherwise)
    torch_threads: int = 1
    # > 0: feed no batch until every actor has loaded its weights, and fail if the pool is not up within
    # this many seconds; 0: feed the first actor ready (a short job may then never use the others)
    wait_for_actors_s: float = 0.0
    # batches one actor works on at once (threads in the actor): 2 on a GPU lets the next batch be unpacked,
    # copied and decoded while the current one runs on the device; 1 on CPU, where threads would compete
    batches_in_flight: int = 1
    # CUDA: capture each tower once per batch in flight as a CUDA graph at encoder.batch_size and replay it for
    # every batch (one launch instead of ~1,000 kernel launches from the actor's host thread); off until a GPU
    # measurement shows the gain (the GPU benchmark measures the ceiling with and without)
    cuda_graphs: bool = False
    # node labels the encoder actors are scheduled on (Ray label_selector), e.g. {node-kind: gpu}; {} = any
    node_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteCfg:
    # CPU cores reserved per part-writing / commit task: 0, as writes are I/O; a reservation lets busy
    # read tasks hold back every write, and outputs (and commits) then arrive in bursts
    num_cpus: float = 0.0
    # float16 halves storage; float32 for readers without Parquet FLOAT16 (Spark)
    embedding_dtype: str = "float16"
    # Parquet compression codec
    compression: str = "zstd"


@dataclass(frozen=True)
class StorageCfg:
    # S3-compatible endpoint (MinIO, Ceph, OSS, COS ...); null = AWS or AWS_ENDPOINT_URL
    endpoint_url: str | None = None
    # S3 region; null = AWS_REGION / profile default
    region: str | None = None
    # unsigned requests (public buckets); credentials always come from the AWS env/profile chain
    anonymous: bool = False
    # attempts per S3 request on throttling (SlowDown/503), dropped or reset connections and timeouts, with
    # backoff (botocore's retries); also how often a read broken off mid-body is re-requested (s3fs's)
    max_attempts: int = 10
    # seconds without a byte from S3 (or to connect) before the attempt counts as failed and is retried
    timeout_s: float = 60.0


@dataclass(frozen=True)
class RayCfg:
    # cluster address; null = RAY_ADDRESS if set (ray job submit), else a local Ray
    address: str | None = None
    # CPUs of a local Ray started by the job; null = all cores
    num_cpus: int | None = None
    # seconds between progress lines
    progress_interval_s: float = 10.0


@dataclass(frozen=True)
class JobCfg:
    # fsspec URL of the shards: a path, glob or brace range, e.g. s3://bucket/wukong/{00000..09999}.tar
    input: str = ""
    # folder URL; embeddings land in {output}/embeddings/{shard}.parquet
    output: str = ""
    # recompute shards already committed in output (default: skip them, so reruns resume)
    overwrite: bool = False
    # demo only: create the small sample shards at `input`'s folder before running
    make_demo_shards: bool = False
    model: ModelCfg = field(default_factory=ModelCfg)
    read: ReadCfg = field(default_factory=ReadCfg)
    encoder: EncoderCfg = field(default_factory=EncoderCfg)
    write: WriteCfg = field(default_factory=WriteCfg)
    storage: StorageCfg = field(default_factory=StorageCfg)
    ray: RayCfg = field(default_factory=RayCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobCfg:
    """Read a YAML file, apply `dotted.key=value` overrides, build and validate the config."""
    cfg = build_config(JobCfg, read_raw(path, overrides), "")
    validate(cfg)
    return cfg


def read_raw(path: str | Path | None, overrides: list[str] = (),
             exclusive: tuple[tuple[str, ...], ...] = ()) -> dict[str, Any]:
    """The YAML mapping with `dotted.key=value` overrides applied (not yet typed or validated).

    `exclusive` lists groups of top-level keys of which at most one may be set: one set on the command line
    replaces the file's (logged), so `--set min_similarity=0.2` works on a file that keeps a top fraction.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    given = {override.partition("=")[0].strip() for override in overrides}
    for group in exclusive:
        if given & set(group):
            for key in set(group) - given:
                if raw.pop(key, None) is not None:
                    log.info("--set %s replaces %s from %s", ", ".join(sorted(given & set(group))), key, path)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects dotted.key=value, got {override!r}")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} is not a section")
        node[leaf] = _parse_override(value)
    return raw


def _parse_override(value: str):
    """YAML scalars (true, 8, 0.5, null); anything else stays text, so a brace range is not read as a mapping."""
    if not value.strip():
        return None
    parsed = yaml.safe_load(value)
    return value if isinstance(parsed, (dict, list)) else parsed


def build_config(cls, raw: dict[str, Any], prefix: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)} "
                         f"(known in this section: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value if value is not None else {}, where + ".")
    if get_origin(hint) is dict:
        if isinstance(value, str):  # from --set: read.node_labels='{node-kind: cpu}'
            value = yaml.safe_load(value) if value.strip() else {}
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float))
                                           and not isinstance(v, bool) for k, v in value.items()):
            return {k: str(v) for k, v in value.items()}
        raise ValueError(f"{where}: expected a mapping of label names to values, got {value!r}")
    if get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]):  # e.g. the filter's concepts
        if isinstance(value, str):  # from --set: 'concepts=[{name: ad, queries: [广告], ...}]'
            value = yaml.safe_load(value)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list of mappings, got {value!r}")
        return [build_config(get_args(hint)[0], item, f"{where}[{i}].") for i, item in enumerate(value)]
    if get_origin(hint) is list:  # one or more strings: a YAML list, one string, or null for none
        if isinstance(value, str) and value.strip().startswith("["):  # from --set: 'dedup_against=[a, b]'
            value = yaml.safe_load(value)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"{where}: expected a string or a list of strings, got {value!r}")
    union = get_origin(hint) in (Union, types.UnionType)
    if union and set(get_args(hint)) == {int, str}:  # a count, a "min..max" range or auto: validated later
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected a number, a range min..max or auto, got {value!r}")
    optional = union and type(None) in get_args(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: must not be null")
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{where}: expected {base.__name__}, got {value!r}")


def validate(cfg: JobCfg) -> None:
    """Raise ValueError naming the field for every value that cannot work."""
    if not cfg.input:
        raise ValueError("input: required (fsspec URL of the shards, e.g. s3://bucket/wukong/{00000..09999}.tar)")
    if not cfg.output:
        raise ValueError("output: required (folder URL for the embedding tables)")
    if not cfg.model.text or not cfg.model.image:
        raise ValueError("model.text and model.image: required (Hugging Face id or local directory)")
    if cfg.model.precision not in PRECISIONS:
        raise ValueError(f"model.precision: expected one of {', '.join(PRECISIONS)}, got {cfg.model.precision!r}")
    if cfg.write.embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"write.embedding_dtype: expected one of {', '.join(EMBEDDING_DTYPES)}, "
                         f"got {cfg.write.embedding_dtype!r}")
    positive = {
        "read.batch_size": cfg.read.batch_size, "read.attempts": cfg.read.attempts,
        "read.max_image_pixels": cfg.read.max_image_pixels, "read.image_size": cfg.read.image_size,
        "read.device_decode_pixels": cfg.read.device_decode_pixels, "encoder.batch_size": cfg.encoder.batch_size, "encoder.batches_in_flight": cfg.encoder.batches_in_flight,
        "encoder.torch_threads": cfg.encoder.torch_threads, "storage.max_attempts": cfg.storage.max_attempts,
        "storage.timeout_s": cfg.storage.timeout_s, "ray.progress_interval_s": cfg.ray.progress_interval_s,
    }
    if cfg.encoder.memory_gib is not None:
        positive["encoder.memory_gib"] = cfg.encoder.memory_gib
    validate_positive(positive)
    max_actors = None if cfg.encoder.actors == AUTO_ACTORS else actor_range(cfg.encoder.actors)[1]
    if cfg.read.decode_on not in DECODE_PLACEMENTS:
        raise ValueError(f"read.decode_on: expected one of {', '.join(DECODE_PLACEMENTS)}, got {cfg.read.decode_on!r}")
    non_negative = {
        "read.num_cpus": cfg.read.num_cpus, "read.retry_backoff_s": cfg.read.retry_backoff_s,
        "encoder.num_gpus": cfg.encoder.num_gpus, "encoder.num_cpus": cfg.encoder.num_cpus,
        "write.num_cpus": cfg.write.num_cpus, "encoder.wait_for_actors_s": cfg.encoder.wait_for_actors_s,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")
    if cfg.encoder.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"encoder.device: expected auto, cuda or cpu, got {cfg.encoder.device!r}")
    if cfg.encoder.num_gpus > 1 and cfg.encoder.num_gpus != int(cfg.encoder.num_gpus):
        raise ValueError(f"encoder.num_gpus: a fraction of one GPU (0.5: two actors per GPU) or a whole number "
                         f"of GPUs per actor, got {cfg.encoder.num_gpus:g}")
    if cfg.read.device_resize not in ("torch", "triton"):
        raise ValueError(f"read.device_resize: expected torch or triton, got {cfg.read.device_resize!r}")
    if cfg.read.device_resize == "triton" and (cfg.read.decode_on != "encoder" or cfg.encoder.num_gpus == 0
                                                or cfg.encoder.device == "cpu"):
        raise ValueError("read.device_resize: triton resizes on the encoder's GPU: it needs read.decode_on=encoder "
                         "and encoder.num_gpus > 0 (device auto or cuda)")
    if cfg.encoder.cuda_graphs and (cfg.encoder.num_gpus == 0 or cfg.encoder.device == "cpu"):
        raise ValueError("encoder.cuda_graphs: needs the towers on a GPU (encoder.num_gpus > 0, device auto or cuda)")
    if cfg.encoder.device == "cuda" and cfg.encoder.num_gpus == 0:
        raise ValueError("encoder.device: cuda needs encoder.num_gpus > 0 (Ray hides GPUs from actors without one)")
    if cfg.encoder.num_gpus == 0 and cfg.model.precision == "fp16":
        raise ValueError("model.precision: fp16 needs a GPU (encoder.num_gpus > 0); use fp32 or bf16 on CPU")
    if cfg.ray.num_cpus is not None and cfg.ray.num_cpus < 1:
        raise ValueError(f"ray.num_cpus: must be >= 1, got {cfg.ray.num_cpus}")
    if cfg.ray.num_cpus is not None and cfg.ray.address is None and max_actors is not None:
        check_room_for_reads(max_actors, cfg.encoder.num_cpus, cfg.ray.num_cpus, "of the local Ray (ray.num_cpus)")


def check_room_for_reads(actors: int, cpus_per_actor: float, cpus: float, where: str) -> None:
    # an actor pool that reserves every CPU starves the read tasks: Ray then waits forever, silently
    needed = actors * cpus_per_actor
    if needed >= cpus:
        raise ValueError(f"encoder.actors x encoder.num_cpus = {needed:g} reserves all {cpus:g} CPUs {where}; "
                         "leave room for the read tasks")


def actors_per_gpu(num_gpus: float) -> int:
    """Encoder actors that share one GPU at encoder.num_gpus each (1 for one or more GPUs per actor)."""
    return max(1, int(1 / num_gpus + 1e-9)) if num_gpus > 0 else 0


def resolve_actors(cfg: JobCfg, resources: dict[str, float]) -> JobCfg:
    """cfg with encoder.actors=auto replaced by a number: one actor per GPU (encoder.num_gpus > 0) or per
    CPU of `resources`, the Ray cluster's (ray.cluster_resources()): never the driver's own hardware on a
    cluster. With encoder.memory_gib, no more actors than the cluster's memory holds (a 16-core laptop with
    16 GB would otherwise start 16 actors of ~2 GiB). Other values pass through."""
    if cfg.encoder.actors != AUTO_ACTORS:
        return cfg
    if cfg.encoder.num_gpus > 0:
        gpus = resources.get("GPU", 0)
        actors = int(gpus // cfg.encoder.num_gpus)
        if actors < 1:
            raise ValueError(f"encoder.actors=auto: the Ray cluster has {gpus:g} GPUs, fewer than one actor's "
                             f"encoder.num_gpus={cfg.encoder.num_gpus:g}; set encoder.actors to a number or a range")
        unit = f"one per {cfg.encoder.num_gpus:g} GPU of the Ray cluster's {gpus:g}"
    else:
        cpus = resources.get("CPU", 0)
        actors = max(1, int(cpus))
        check_room_for_reads(actors, cfg.encoder.num_cpus, cpus, "of the Ray cluster (encoder.actors=auto)")
        unit = f"one per CPU of the Ray cluster's {cpus:g}"
    if cfg.encoder.memory_gib is not None:
        memory_gib = resources.get("memory", 0) / 2**30
        fit = int(memory_gib // cfg.encoder.memory_gib)
        if fit < 1:
            raise ValueError(f"encoder.actors=auto: the Ray cluster has {memory_gib:.1f} GiB of memory, less than "
                             f"one actor's encoder.memory_gib={cfg.encoder.memory_gib:g}")
        if fit < actors:
            actors = fit
            unit += f", capped by memory: {memory_gib:.1f} GiB / encoder.memory_gib={cfg.encoder.memory_gib:g}"
    log.info("encoder.actors=auto: %d actors (%s)", actors, unit)
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, actors=actors))


def actor_range(actors: int | str) -> tuple[int, int]:
    """(min, max) encoder actors: 8 -> (8, 8); "1..8" -> (1, 8). Raises ValueError naming the field.
    encoder.actors=auto must be resolved first (resolve_actors)."""
    if actors == AUTO_ACTORS:
        raise ValueError("encoder.actors=auto is sized from the Ray cluster: resolve_actors() first")
    if isinstance(actors, int):
        low = high = actors
    else:
        low_text, sep, high_text = actors.partition("..")
        try:
            low, high = (int(low_text), int(high_text)) if sep else (int(actors),) * 2
        except ValueError:
            raise ValueError(f"encoder.actors: expected a number, a range min..max (e.g. 1..8) or auto, "
                             f"got {actors!r}") from None
    if low < 1 or high < low:
        raise ValueError(f"encoder.actors: need 1 <= min <= max, got {actors!r}")
    return low, high


def validate_positive(values: dict[str, float]) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name}: must be > 0, got {value}")


def dump(cfg: JobCfg) -> str:
    """The resolved config as one JSON document (it never holds credentials: those come from the environment)."""
    return json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False)
