"""Ray-distributed Taiyi-CLIP embedding of WebDataset image-caption shards into Parquet tables.

One folder per job, over the plumbing they share, over the base; imports only go down this list:

    bench/     the benchmarks (encoder ceiling vs the job, dedup at scale, fidelity of the GPU path)
    eval/      retrieval and zero-shot evaluation with the pipeline's own encoders
    curate/    the filter job: threshold, near-duplicates, keep-lists, filtered shards, report
    embed/     the embed job: read -> preprocess -> encode -> write, and its driver
    io/        shared plumbing: filesystems, shard lists, committed tables, the output schema
    config.py, logs.py, progress.py    the base: typed config, console, progress lines
"""

__version__ = "0.1.0"
