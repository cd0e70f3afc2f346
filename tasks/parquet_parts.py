"""The names of the Parquet files a Ray Data write puts into a cache entry. Apart from tasks/streaming.py because
each of Ray Data's write tasks unpickles this class: from a module that imports torch and open_clip, every write
worker paid their imports (5-8 CPU-s and ~700 MB a process) to name a file."""

from ray.data.datasource import FilenameProvider


class CacheParts(FilenameProvider):
    def get_filename_for_block(self, block, write_uuid: str, task_index: int, block_index: int) -> str:
        return f"part-{task_index:05d}-{block_index:04d}.parquet"
