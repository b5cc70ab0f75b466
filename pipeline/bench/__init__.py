"""The benchmarks (jobs/benchmark.py, jobs/benchmark_dedup.py, jobs/chaos.py): measurements, never part of a run.

    benchmark.py    the embed benchmark: ceiling before and after the end-to-end runs, per precision/placement
    ceiling.py      the encoders' ceiling: the towers alone on ready tensors, one probe per encoder actor
    towers.py       one encoder's towers timed on ready tensors, as configured or varied (before / CUDA graphs)
    end_to_end.py   the whole embed job on generated shards, and its memory as the input grows
    inprocess.py    the embed job's stages without Ray (the lent GPU machine has none): one process per encoder
    decode_rate.py  decode + resize + tokenize per core, and the GPU's decode rate
    fidelity.py     how far read.decode_on=encoder is from the exact path (pixels, embeddings), and fp16 from fp32
    samplers.py     memory of every process, the GPU's busy fraction, the machine's facts
    photos.py       generated photo-like JPEGs and Wukong-like captions as cached shards; corrupted JPEGs
    table.py        the printed table, and each benchmark's JSON file (written whole, its folder made)
    dedup.py        the filter job's dedup at scale: planted near-duplicates, recall, time, memory
    chaos.py        the embed job under kills of its workers, actors, nodes and driver: lost, duplicated, errored
    gpu_checks.py   the CUDA paths checked on the GPU without pytest: the GPU benchmark runs them first
"""
