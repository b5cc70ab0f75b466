"""The embed job (jobs/embed_wukong.py), one module per stage in the order the data moves.

    read.py           stream WebDataset tar shards as raw samples, one marker row per shard
    image.py          the exact image protocol on CPU: bytes -> 224x224 uint8 RGB (PIL bicubic, center crop)
    preprocess.py     decode images (or ship their bytes) and tokenize captions; bad samples become error rows
    resize.py         PIL's bicubic resize + center crop for a whole batch at once, in torch: PIL's bytes
    resize_kernel.py  the same resize's two passes as fused Triton kernels (read.device_resize=triton)
    device_decode.py  read.decode_on=encoder: which JPEGs the device may take (header, compressed data), and
                      their decode + resize on the encoder's own device in chunks (nvJPEG on a GPU)
    transfer.py       host values onto the device without making the host wait (pinned, non-blocking copies)
    model.py          the towers' weights: Hub id or local folder, or random weights of the real architectures
    encode.py         the two Taiyi-CLIP towers in a Ray actor: pixels + token ids -> L2-normalised embeddings,
                      always at encoder.batch_size (optionally as CUDA graphs)
    write.py          staged part files, committed per shard as one atomic Parquet file
    plan.py           what a run will do, decided before Ray starts: shards, model, the output's settings
    run.py            the driver: the Ray Data flow, commits, progress and the summary
    demo.py           the demo's sample shards (real photographs + generated images, Chinese captions)
    data/             the bundled Chinese BERT vocab (random-weight runs, checkpoints without a tokenizer)
"""
