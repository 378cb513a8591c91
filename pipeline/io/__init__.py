"""Parquet in (shards), Parquet out (writer), and the record of committed shards (manifest)."""
