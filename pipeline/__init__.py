"""Ray-distributed Taiyi-CLIP embedding of WebDataset image-caption shards into Parquet tables."""

__version__ = "0.1.0"
