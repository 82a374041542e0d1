"""Corpus -> Megatron indexed dataset (`<prefix>.bin/.idx`) through megatron-core's IndexedDatasetBuilder.

Inputs are JSON lines (`.jsonl`, `.json`, `.json.gz`; a JSON array file also works) with a `text` key;
tokenizers are Hugging Face tokenizer directories (`tokenizer.json`). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megaquant.errors import MegaquantError
from megaquant.megatron_src import quiet_megatron_import

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "EOD_TOKEN",
    "DataError",
    "PrepareResult",
    "build_tokenizer",
    "load_tokenizer",
    "prepare_dataset",
    "read_texts",
    "write_indexed",
]

EOD_TOKEN = "<|endoftext|>"


class DataError(MegaquantError):
    """An input file or tokenizer cannot be used (message names the file and line)."""


@dataclass(frozen=True, kw_only=True)
class PrepareResult:
    prefix: Path
    documents: int
    tokens: int
    tokenizer: Path


def _open_text(path: Path) -> Any:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_texts(paths: Sequence[Path], key: str = "text") -> Iterator[str]:
    """The `key` field of every record, file by file, streamed; empty texts are skipped."""
    for path in paths:
        try:
            with _open_text(path) as handle:
                skipped = 0
                first = handle.readline()
                while first and not first.strip():
                    skipped += 1
                    first = handle.readline()
                if first.lstrip().startswith("["):  # one JSON array, not JSON lines
                    try:
                        items = json.loads(first + handle.read())
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{exc.lineno + skipped}: not JSON ({exc.msg})") from exc
                    records: Iterable[tuple[int, object]] = enumerate(items, 1)
                else:
                    records = _json_lines(path, itertools.chain([first], handle), skipped + 1)
                for number, record in records:
                    if not isinstance(record, dict) or not isinstance(record.get(key), str):
                        raise DataError(
                            f"{path}:{number}: expected a JSON object with a string {key!r} field"
                        )
                    if record[key].strip():
                        yield record[key]
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read ({exc})") from exc


def _json_lines(path: Path, lines: Iterable[str], start: int) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(lines, start):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc


def build_tokenizer(out_dir: Path, texts: Iterable[str], *, vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE on `texts` and save it as a Hugging Face tokenizer directory (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOD_TOKEN,
        "eos_token": EOD_TOKEN,
        "unk_token": EOD_TOKEN,
        "model_max_length": 1_000_000,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out_dir


def load_tokenizer(directory: Path) -> tuple[Tokenizer, int | None]:
    """The tokenizer of a Hugging Face tokenizer directory and its end-of-document id (None if unknown)."""
    from tokenizers import Tokenizer

    file = directory / "tokenizer.json"
    if not file.is_file():
        raise DataError(
            f"{directory}: no tokenizer.json; pass a Hugging Face tokenizer directory (a fast tokenizer), "
            "or use --dataset sample to build the offline one"
        )
    tokenizer = Tokenizer.from_file(str(file))
    eod_name = None
    config = directory / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("eos_token")
        eod_name = value.get("content") if isinstance(value, dict) else value
    eod = tokenizer.token_to_id(eod_name) if isinstance(eod_name, str) else tokenizer.token_to_id(EOD_TOKEN)
    return tokenizer, eod


def write_indexed(
    prefix: Path,
    documents: Iterable[Sequence[int]],
    *,
    vocab_size: int,
) -> tuple[int, int]:
    """Write token documents to `<prefix>.bin/.idx` with megatron-core's builder; (documents, tokens)."""
    import numpy

    with quiet_megatron_import():
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=DType.optimal_dtype(vocab_size))
    n_docs = n_tokens = 0
    for ids in documents:
        if not ids:
            continue
        builder.add_document(numpy.asarray(ids), [len(ids)])
        n_docs += 1
        n_tokens += len(ids)
    builder.finalize(str(prefix) + ".idx")
    return n_docs, n_tokens


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False)


def prepare_dataset(
    *,
    dataset: str | None = None,
    inputs: Sequence[Path] = (),
    output: str | Path | None = None,
    tokenizer: Path | None = None,
    data_root: Path = Path("."),
    append_eod: bool = True,
    progress: bool = False,
    max_docstrings: int | None = None,
) -> PrepareResult:
    """Tokenize a registry dataset (`dataset`) or explicit `inputs` into `output` (a prefix)."""
    from megaquant.launch.datasets import get_dataset

    texts: Iterable[str]
    entry = get_dataset(dataset) if dataset is not None else None
    if entry is not None and entry.builtin:
        from megaquant import corpus

        texts = list(corpus.documents(max_docstrings))
        if tokenizer is None and entry.tokenizer is not None:
            tokenizer = data_root / entry.tokenizer
            if not (tokenizer / "tokenizer.json").is_file():
                build_tokenizer(tokenizer, texts)
    else:
        files = list(inputs)
        if entry is not None and not files:
            files = sorted(data_root.glob(entry.inputs))
            if not files:
                raise DataError(f"{data_root / entry.inputs}: no input files; put the raw corpus there")
        if not files:
            raise DataError("no inputs: pass --dataset NAME or --input FILE ...")
        texts = read_texts(files)
    if tokenizer is None:
        raise DataError("no tokenizer: pass --tokenizer DIR (a Hugging Face tokenizer directory)")
    if output is None:
        if entry is None:
            raise DataError("no output: pass --output PREFIX (writes PREFIX.bin / PREFIX.idx)")
        output = data_root / entry.prefix
    tok, eod = load_tokenizer(tokenizer)
    if append_eod and eod is None:
        raise DataError(f"{tokenizer}: no end-of-document token; pass --no-append-eod or fix its config")
    bar = _progress(progress)

    def token_documents() -> Iterator[list[int]]:
        task = bar.add_task("tokenizing", total=None) if bar is not None else None
        for count, text in enumerate(texts, 1):
            ids = tok.encode(text).ids
            yield ids + [eod] if append_eod and eod is not None else ids
            if bar is not None:
                bar.update(task, description=f"tokenizing: {count} documents", advance=1)

    if bar is not None:
        bar.start()
    try:
        docs, tokens = write_indexed(Path(output), token_documents(), vocab_size=tok.get_vocab_size())
    finally:
        if bar is not None:
            bar.stop()
    return PrepareResult(prefix=Path(output), documents=docs, tokens=tokens, tokenizer=tokenizer)
