"""Where the input's files are, and in which format: `input.path` (with `input.format`,
`input.split`, `input.config`) -> the list of files that become shards.

`input.path` is a file, a directory (searched recursively), a glob, an fsspec URL, a
`datasets` `save_to_disk` directory, or `hf://datasets/NAME`: a Hugging Face dataset whose
split's files `datasets` resolves (the hub's data files, read as a stream, or the copy it
prepared in its local cache, which is what works offline). Formats are told by extension
unless `input.format` names one; reading them is `pipeline.io.formats`'s business.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass

import fsspec

from pipeline.assets import demo_input_path
from pipeline.engine.config import ConfigError

DEMO = "demo"  # `input.path=demo`: the sample input bundled with the demo model
FORMATS = ("auto", "parquet", "jsonl", "csv", "arrow", "openai_batch")  # input.format
HF_DATASETS = "hf://datasets/"
_GLOB_CHARS = "*?["
# What a directory is searched for: `.json` is left out, as directories often hold JSON
# metadata next to the data (a file or glob naming `.json` files reads them as JSON Lines).
_DIR_EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv", ".arrow": "arrow"}
_FILE_EXTENSIONS = {**_DIR_EXTENSIONS, ".json": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class InputSource:
    """The `input.*` keys that say what to read (built by `InputConfig.source()`)."""

    path: str
    format: str = "auto"  # one of FORMATS
    split: str | None = None  # hf://datasets/NAME only (None: train)
    config: str | None = None  # hf://datasets/NAME only: the dataset's config (subset)
    id_column: str = "id"  # openai_batch: where custom_id goes
    text_column: str = "text"  # openai_batch: where the prompt goes

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(
                f"input.format must be one of {', '.join(FORMATS)}, got {self.format!r}"
            )
        for key in ("split", "config"):
            if getattr(self, key) is not None and hf_dataset_name(self.path) is None:
                raise ConfigError(
                    f"input.{key} applies to input.path=hf://datasets/NAME only, got input.path="
                    f"{self.path!r}; remove input.{key}"
                )
        clash = {self.id_column, self.text_column} & {"url", "body"}
        if self.format == "openai_batch" and clash:
            raise ConfigError(
                f"input.format=openai_batch writes the request's url and body as columns of those "
                f"names: rename input.id_column / input.text_column (now {sorted(clash)})"
            )


@dataclass(frozen=True)
class InputFile:
    fs: fsspec.AbstractFileSystem
    path: str  # in `fs`
    url: str  # what a worker opens: a plain local path, or a URL with its protocol
    format: str  # one of FORMATS but auto


def locate(source: InputSource) -> list[InputFile]:
    """The input's files in a stable order (sorted, or the dataset's own shard order)."""
    name = hf_dataset_name(source.path)
    if name is not None:
        urls = dataset_files(name, source.config, source.split or "train")
        return [_input_file(url, source.format) for url in urls]
    url = str(demo_input_path()) if source.path == DEMO else source.path
    fs, root = fsspec.core.url_to_fs(url)
    if any(c in root for c in _GLOB_CHARS):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
    elif fs.isdir(root):
        paths = _directory_files(fs, root, source)
    elif fs.isfile(root):
        paths = [root]
    else:
        raise ConfigError(f"input.path={source.path!r}: no such file or directory")
    if not paths:
        kind = "Parquet" if source.format in ("auto", "parquet") else source.format
        raise ConfigError(f"input.path={source.path!r} matches no {kind} file")
    local = url == root  # keep plain local paths plain
    return [
        InputFile(fs, p, p if local else fs.unstrip_protocol(p), format_of(p, source.format))
        for p in paths
    ]


def format_of(path: str, requested: str = "auto") -> str:
    """`requested` unless auto; else by extension, and Parquet when it says nothing (its footer
    is read, and a file that is not Parquet is named unreadable)."""
    if requested != "auto":
        return requested
    return _FILE_EXTENSIONS.get(posixpath.splitext(path)[1].lower(), "parquet")


def output_name(path: str, fmt: str) -> str:
    """The shard's name, which is its output file's: a Parquet file keeps its own, any other
    file's extension becomes .parquet (a.jsonl -> a.parquet; a.jsonl and a.parquet together
    are refused by the unique-name check)."""
    base = posixpath.basename(path)
    return base if fmt == "parquet" else posixpath.splitext(base)[0] + ".parquet"


def _input_file(url: str, requested: str) -> InputFile:
    fs, path = fsspec.core.url_to_fs(url)
    return InputFile(fs, path, url, format_of(path, requested))


def _directory_files(fs: fsspec.AbstractFileSystem, root: str, source: InputSource) -> list[str]:
    """A save_to_disk directory's Arrow files in its order; else the files of one format:
    input.format's, or Parquet when there is any, or the only format present."""
    if fs.isfile(posixpath.join(root, "dataset_dict.json")):
        raise ConfigError(
            f"input.path={source.path!r} is a DatasetDict saved with save_to_disk: point "
            f"input.path at one of its splits ({root}/<split>)"
        )
    state = posixpath.join(root, "state.json")
    if source.format in ("auto", "arrow") and fs.isfile(state):
        with fs.open(state, "r") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
        return [posixpath.join(root, name) for name in names]
    found: dict[str, list[str]] = {}
    for path in sorted(fs.find(root)):
        fmt = _DIR_EXTENSIONS.get(posixpath.splitext(path)[1].lower())
        if fmt == "jsonl" and source.format == "openai_batch":
            fmt = "openai_batch"  # request files are JSON Lines
        if fmt is not None and source.format in ("auto", fmt):
            found.setdefault(fmt, []).append(path)
    if "parquet" in found:  # as before other formats existed: Parquet files next to others
        return found["parquet"]
    if len(found) > 1:
        raise ConfigError(
            f"input.path={source.path!r} holds files of several formats ({sorted(found)}): "
            f"set input.format to the one to read"
        )
    return next(iter(found.values()), [])


def hf_dataset_name(path: str) -> str | None:
    """NAME (NAMESPACE/NAME, with an optional @REVISION) of `hf://datasets/NAME`; None for any
    other path, files inside a dataset repo included (those are plain fsspec URLs)."""
    if not path.startswith(HF_DATASETS):
        return None
    name = path[len(HF_DATASETS) :].rstrip("/")
    return name if name and name.split("@")[0].count("/") <= 1 else None


def dataset_files(name: str, config: str | None, split: str) -> list[str]:
    """The split's files, as `datasets` resolves NAME (a hub id, or a local dataset directory):
    the Arrow files it prepared in its local cache when they are there (offline, the only
    place it looks), else the repository's data files (hf:// URLs, streamed)."""
    import datasets  # heavy: only jobs that read a dataset by name pay for it

    repo, _, revision = name.partition("@")
    try:
        builder = datasets.load_dataset_builder(repo, config, revision=revision or None)
    except Exception as exc:  # datasets raises many kinds (ConnectionError, ValueError, its own)
        raise ConfigError(_load_error(name, exc)) from exc
    splits = builder.info.splits or {}
    if split in splits and os.path.isdir(builder.cache_dir):
        from datasets.naming import filenames_for_dataset_split

        prepared = filenames_for_dataset_split(
            builder.cache_dir, builder.dataset_name, split, "arrow", splits[split].shard_lengths
        )
        if all(os.path.isfile(p) for p in prepared):
            return list(prepared)
    data_files = builder.config.data_files or {}
    if split not in data_files:
        raise ConfigError(
            f"input.split={split!r}: dataset {name!r} has the splits "
            f"{sorted(data_files) or sorted(splits)}; set input.split to one of them"
        )
    return list(data_files[split])


def _load_error(name: str, exc: Exception) -> str:
    import datasets.config

    message = f"input.path={HF_DATASETS}{name}: `datasets` cannot load it"
    message += f" ({type(exc).__name__}: {exc})"
    if datasets.config.HF_HUB_OFFLINE:
        message += (
            f". Offline (HF_HUB_OFFLINE is set) it must be in the local datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}): load it once with network access, e.g. "
            f"datasets.load_dataset({name!r}), or unset HF_HUB_OFFLINE"
        )
    elif "config" in str(exc).lower():
        message += "; set input.config to one of the dataset's configs"
    return message
