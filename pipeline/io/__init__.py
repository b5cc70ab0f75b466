"""Shared plumbing of every job: where data lives and what the embed job's tables look like.

    storage.py   fsspec filesystems for any URL, retries, writability checks, atomic writes
    shards.py    the input shard list (path, glob, brace range) and the shards already committed
    tables.py    reading the committed embedding tables
    settings.py  what produced an output ({output}/_settings.json): a rerun with other settings is refused
    schema.py    the one declaration of the embedding table's Arrow schema and file metadata
"""
