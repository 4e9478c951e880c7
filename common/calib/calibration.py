"""Calibration text: named hub datasets or local files, and the two ways to sample token windows.

`sample_reference` follows the reference scripts draw for draw (SPEC §4), so the same seed
picks the same passages. `sample_concat` is the GPTQ/AWQ way for datasets of short passages.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from common.errors import InputError

NAMED_DATASETS = {
    "wikitext2": {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train", "field": "text"},
    "ptb": {"path": "ptb_text_only", "name": "penn_treebank", "split": "train", "field": "sentence"},
    "c4": {"path": "allenai/c4", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
           "split": "train", "field": "text"},
    "pileval": {"path": "mit-han-lab/pile-val-backup", "split": "validation", "field": "text"},
}
AWQ_MAX_PASSAGE = 512  # llm-awq skips longer passages, whatever the block length
LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet", ".csv", ".arrow")


def load_texts(dataset: str, text_column: str | None = None, split: str | None = None,
               flag: str = "--dataset", keep_empty: bool = False) -> list[str]:
    """The passages of a named dataset or a local file/folder, as a list of strings.

    `keep_empty` keeps empty passages (as "") where they are: AWQ's sampler shuffles by row
    index, so dropping rows would change which passages it picks."""
    path = Path(dataset).expanduser()
    if path.exists():
        texts = _load_local(path, text_column or "text")
    elif dataset in NAMED_DATASETS:
        texts = _load_named(dataset, text_column, split, flag)
    else:
        names = ", ".join(NAMED_DATASETS)
        raise InputError(f"{flag} {dataset}: neither a file nor a known dataset ({names})")
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise InputError(f"{flag} {dataset}: holds no text")
    if keep_empty:
        return [t if isinstance(t, str) else "" for t in texts]
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _load_named(dataset: str, text_column: str | None, split: str | None, flag: str = "--dataset") -> list[str]:
    spec = dict(NAMED_DATASETS[dataset])
    field = text_column or spec.pop("field")
    spec.pop("field", None)
    split = split or spec.pop("split")
    spec.pop("split", None)
    try:
        import datasets
    except ImportError:
        raise InputError(f"{flag} {dataset}: needs the 'datasets' package (pip install datasets), "
                         "or pass a local file (.txt, .jsonl, .parquet, ...)") from None
    reachable = not datasets.config.HF_HUB_OFFLINE and _hub_reachable()
    try:
        with _cache_only(datasets, not reachable):
            data = datasets.load_dataset(**spec, split=split)
    except Exception as error:  # network, cache and script errors all mean: not available here
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        hint = ("script-based datasets no longer load with recent 'datasets' versions; "
                if dataset == "ptb" else "")
        where = "" if reachable else "the Hugging Face hub cannot be reached and it is not in the datasets cache; "
        raise InputError(f"{flag} {dataset}: cannot load {spec['path']} ({reason}); {where}{hint}"
                         "without network, download it once elsewhere and pass a local file, "
                         f"e.g. {flag} ./{dataset}-sample.jsonl") from None
    if field not in data.column_names:
        raise InputError(f"{flag} {dataset}: no column '{field}' (columns: {', '.join(data.column_names)})")
    texts = list(data[field])
    if dataset == "ptb":
        texts = [t.replace("<unk>", "< u n k >") for t in texts]
    return texts


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a connection within `timeout` s. Without network the
    datasets client retries for ~30 s before failing; checked first, a cached dataset still loads and
    a missing one fails at once."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


@contextmanager
def _cache_only(datasets, offline: bool) -> Iterator[None]:
    """The datasets and hub clients in offline mode (their cache only) while the block runs, if `offline`."""
    from huggingface_hub import constants
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_local(path: Path, column: str) -> list[str]:
    name = path.name.lower()
    try:
        if path.is_dir():
            return _column(_arrow_folder_rows(path), column, path)
        if name.endswith(".txt"):
            return _paragraphs(path.read_text(encoding="utf-8"))
        if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
            return _column(_jsonl_rows(path), column, path)
        if name.endswith(".json"):
            return _column(_json_rows(path, column), column, path)
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq
            return _column(pq.read_table(path).to_pylist(), column, path)
        if name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as handle:
                return _column(csv.DictReader(handle), column, path)
        if name.endswith(".arrow"):
            return _column(_arrow_rows(path), column, path)
    except InputError:
        raise
    except ImportError as error:
        raise InputError(f"{path}: reading it needs the '{error.name}' package (pip install {error.name})") from None
    except Exception as error:  # malformed file of any kind
        raise InputError(f"{path}: cannot read ({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    raise InputError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)} "
                     "or a datasets.save_to_disk folder")


def _paragraphs(text: str) -> list[str]:
    """A .txt file's passages: blocks separated by blank lines."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def _jsonl_rows(path: Path) -> Iterable:
    if path.name.lower().endswith(".gz"):
        handle = io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    elif path.name.lower().endswith(".zst"):
        import zstandard
        handle = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    else:
        handle = open(path, encoding="utf-8")
    with handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _json_rows(path: Path, column: str) -> list:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        if isinstance(data.get(column), list):
            return data[column]
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise InputError(f"{path}: expected a list of records or an object with a '{column}' list")
    return data


def _arrow_rows(path: Path) -> list:
    import pyarrow as pa
    with pa.memory_map(str(path)) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


def _arrow_folder_rows(folder: Path) -> list:
    """Rows of a `datasets.save_to_disk` folder (a Dataset, or the 'train' split of a DatasetDict)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        folder = folder / ("train" if "train" in splits else splits[0])
    state = folder / "state.json"
    if not state.is_file():
        raise InputError(f"{folder}: not a datasets.save_to_disk folder (no state.json)")
    files = [folder / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    return [row for file in files for row in _arrow_rows(file)]


def _column(rows: Iterable, column: str, path: Path) -> list[str]:
    texts = []
    for row in rows:
        if isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict):
            if column not in row:
                raise InputError(f"{path}: no '{column}' field (fields: {', '.join(map(str, row))}); "
                                 "choose one with --text_column")
            texts.append(row[column])
        else:
            raise InputError(f"{path}: expected records with a '{column}' field")
    return texts


Tokenize = Callable[[str], torch.Tensor]


def tokenize_with(tokenizer) -> Tokenize:
    """What the reference does: tokenizer(text, return_tensors='pt') with default special tokens."""
    return lambda text: tokenizer(text, return_tensors="pt").input_ids[0]


@contextmanager
def naming(flag: str, dataset: str) -> Iterator[None]:
    """The samplers' errors, prefixed with the data they came from."""
    try:
        yield
    except InputError as error:
        raise InputError(f"{flag} {dataset}: {error}") from None


def draw_samples(texts: list[str], tokenizer, sampling: str, seq_len: int, num_examples: int,
                 seed: int) -> torch.Tensor:
    """thresholds.py's calibration samples: `sampling` is "reference" or "concat"."""
    sampler = sample_reference if sampling == "reference" else sample_concat
    return sampler(texts, tokenize_with(tokenizer), seq_len, num_examples, seed)


def sample_reference(texts: list[str], tokenize: Tokenize, seq_len: int, num_examples: int,
                     seed: int) -> torch.Tensor:
    """[num_examples, seq_len] token ids drawn exactly as the reference scripts draw them.

    Draw idx = randint(0, len-1) from a Mersenne Twister seeded with `seed` (the sequence the
    reference's seeded `random` module gives); skip an idx already tried; skip passages shorter than
    seq_len; keep the first seq_len tokens. Stops with an input error (saying how many passages
    qualify) once every passage has been tried. The generator is private: the samples never depend
    on what another thread draws from the process-wide one meanwhile.
    """
    draws = random.Random(seed)
    tried: set[int] = set()
    samples: list[torch.Tensor] = []
    while len(samples) < num_examples:
        if len(tried) == len(texts):
            raise InputError(f"the dataset has only {len(samples)} passages of at least {seq_len} tokens "
                             f"(of {len(texts)}), {num_examples} requested; lower --num_examples or "
                             "--seq_len, or use --sampling concat")
        index = draws.randint(0, len(texts) - 1)
        if index in tried:
            continue
        tried.add(index)
        ids = tokenize(texts[index])
        if ids.shape[0] < seq_len:
            continue
        samples.append(ids[:seq_len])
    return torch.stack(samples)


def sample_concat(texts: list[str], tokenize: Tokenize, seq_len: int, num_examples: int,
                  seed: int) -> torch.Tensor:
    """[num_examples, seq_len] random windows of the passages joined by blank lines.

    Only as many passages are joined as give ~64 characters per requested token, which
    keeps tokenization quick on large datasets.
    """
    budget = 64 * seq_len * num_examples
    joined, size = [], 0
    for text in texts:
        joined.append(text)
        size += len(text) + 2
        if size >= budget:
            break
    ids = tokenize("\n\n".join(joined))
    if ids.shape[0] <= seq_len:
        raise InputError(f"the dataset holds {ids.shape[0]} tokens in all, fewer than --seq_len {seq_len} + 1")
    generator = random.Random(seed)
    starts = [generator.randint(0, ids.shape[0] - seq_len - 1) for _ in range(num_examples)]
    return torch.stack([ids[s: s + seq_len] for s in starts])


def sample_awq_blocks(texts: list[str], encode: Callable[[str], list[int]], n_samples: int,
                      seqlen: int) -> torch.Tensor:
    """[blocks, seqlen] token ids as llm-awq's calibration draws them (SPEC §7.1).

    Passages in the order `default_rng(42).permutation(n)` (what `datasets`' shuffle(seed=42)
    gives); each stripped and encoded with the default special tokens, skipped when empty or
    longer than 512 tokens; the first `n_samples` kept are joined and cut into whole blocks.
    """
    kept: list[int] = []
    count = 0
    for index in np.random.default_rng(42).permutation(len(texts)):
        ids = encode(texts[index].strip())
        if len(ids) == 0 or len(ids) > AWQ_MAX_PASSAGE:
            continue
        kept.extend(ids)
        count += 1
        if count == n_samples:
            break
    blocks = len(kept) // seqlen
    if blocks == 0:
        raise InputError(f"the calibration data gave {len(kept)} tokens from {count} passages of at most "
                         f"{AWQ_MAX_PASSAGE} tokens, fewer than one block of --seqlen {seqlen}; raise --n_samples "
                         "or give more text")
    return torch.tensor(kept[: blocks * seqlen], dtype=torch.long).reshape(blocks, seqlen)
