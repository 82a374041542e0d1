"""Corpus -> Megatron indexed dataset (`<prefix>.bin/.idx`) through megatron-core's IndexedDatasetBuilder.

Inputs are JSON lines (`.jsonl`, `.json`, `.json.gz`; a JSON array file also works) with a `text` key;
tokenizers are Hugging Face tokenizer directories (`tokenizer.json`). Nothing is downloaded.

Output is atomic: both files are written under hidden temporary names in the target directory, fsynced,
then renamed over `<prefix>.bin` and `<prefix>.idx`; a failure before the renames leaves existing files
untouched and removes the partial ones. `<prefix>.incomplete` exists only between the two renames, so a
process killed there leaves a marker that the launcher refuses to train on (re-running prepare repairs it).
Test hook: `MEGAQUANT_FAULT=<step>` exits with 137 right after a step of `DATA_STEPS`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from megaquant.errors import MegaquantError
from megaquant.megatron_src import quiet_megatron_import

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "DATA_STEPS",
    "EOD_TOKEN",
    "INCOMPLETE_SUFFIX",
    "DataError",
    "PrepareResult",
    "build_tokenizer",
    "dataset_problem",
    "load_tokenizer",
    "prepare_dataset",
    "read_texts",
    "write_indexed",
]

EOD_TOKEN = "<|endoftext|>"
INCOMPLETE_SUFFIX = ".incomplete"
"""`<prefix>.incomplete`: present only while `.bin` and `.idx` are being renamed into place."""
DATA_STEPS = ("data-written", "data-bin-renamed")
"""Steps of writing a dataset: both temporary files complete and fsynced; the new `.bin` renamed in."""
_FAULT_ENV = "MEGAQUANT_FAULT"  # the same test hook as set/restore (megaquant.branch.FAULT_ENV)
_INSTALL_HINT = "install megaquant[megatron] (pip install 'megaquant[megatron]')"


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


def _fault(step: str) -> None:
    """Test hook: simulate a crash (SIGKILL-like exit, no cleanup) right after a named step."""
    if os.environ.get(_FAULT_ENV) == step:
        os._exit(137)


def _tokenizers() -> ModuleType:
    try:
        import tokenizers
    except ModuleNotFoundError as exc:
        raise DataError(f"the tokenizers package is not installed ({exc}): {_INSTALL_HINT}") from None
    return tokenizers


def _indexed_dataset(megatron: Path | None) -> ModuleType:
    """megatron.core.datasets.indexed_dataset: from the Megatron tree `megatron` (a Megatron-LM checkout or
    an instrumented copy; put first on sys.path) or, when None, the installed megatron-core."""
    if megatron is not None:
        tree = megatron.absolute()
        if not (tree / "megatron" / "core" / "datasets" / "indexed_dataset.py").is_file():
            raise DataError(
                f"{tree}: no megatron/core/datasets/indexed_dataset.py; pass --megatron PATH to a "
                "Megatron-LM checkout (or leave it out to use the installed megatron-core)"
            )
        if str(tree) not in sys.path:
            sys.path.insert(0, str(tree))
    try:
        with quiet_megatron_import():
            import megatron.core.datasets.indexed_dataset as module
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        what = (
            "megatron-core is not installed" if missing.startswith("megatron") else f"no module {missing!r}"
        )
        raise DataError(
            f"{what}: writing Megatron indexed datasets needs megatron-core; {_INSTALL_HINT}, "
            "or pass --megatron PATH to a Megatron-LM checkout"
        ) from None
    if megatron is not None and not Path(module.__file__ or "").is_relative_to(megatron.absolute()):
        raise DataError(
            f"megatron is already imported from {module.__file__} in this process, not from {megatron}; "
            "run `megaquant data prepare --megatron PATH` in a fresh process"
        )
    return module


def build_tokenizer(out_dir: Path, texts: Iterable[str], *, vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE on `texts` and save it as a Hugging Face tokenizer directory (offline).

    Each file is written atomically, tokenizer.json (the file whose presence means "built") last."""
    tokenizers = _tokenizers()
    Tokenizer, decoders, models = tokenizers.Tokenizer, tokenizers.decoders, tokenizers.models
    pre_tokenizers, trainers = tokenizers.pre_tokenizers, tokenizers.trainers

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
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOD_TOKEN,
        "eos_token": EOD_TOKEN,
        "unk_token": EOD_TOKEN,
        "model_max_length": 1_000_000,
    }
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        _replace_atomically(out_dir / name, functools.partial(_write_json, content=content))
    _replace_atomically(out_dir / "tokenizer.json", lambda t: tokenizer.save(str(t)))
    return out_dir


def _write_json(path: Path, content: object) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _partial(target: Path) -> Path:
    """A hidden temporary name next to `target`, unique per process (same directory: rename is atomic)."""
    return target.with_name(f".{target.name}.{os.getpid()}.partial")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(target: Path, write: Callable[[Path], object]) -> None:
    tmp = _partial(target)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_partials(prefix: Path) -> None:
    """Temporary files of `prefix` left by a killed process (its pid no longer runs)."""
    for path in prefix.parent.glob(f".{prefix.name}.*.*.partial"):
        pid = path.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


def dataset_problem(prefix: Path) -> str | None:
    """Why Megatron could not read the indexed dataset `prefix` (missing or half-replaced files), or None."""
    missing = [p.name for p in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx")) if not p.is_file()]
    if missing:
        return f"{prefix}: no {' / '.join(missing)} (prepare it with `megaquant data prepare`)"
    if Path(f"{prefix}{INCOMPLETE_SUFFIX}").exists():
        return (
            f"{prefix}: an interrupted `megaquant data prepare` left .bin and .idx out of step "
            f"({prefix.name}{INCOMPLETE_SUFFIX} exists); run it again"
        )
    return None


def load_tokenizer(directory: Path) -> tuple[Tokenizer, int | None]:
    """The tokenizer of a Hugging Face tokenizer directory and its end-of-document id (None if unknown)."""
    Tokenizer = _tokenizers().Tokenizer

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
    megatron: Path | None = None,
) -> tuple[int, int]:
    """Write token documents to `<prefix>.bin/.idx` with megatron-core's builder, atomically (see the
    module docstring); (documents, tokens). Raises DataError for zero documents (nothing is replaced)."""
    import numpy

    module = _indexed_dataset(megatron)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(prefix)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    bin_tmp, idx_tmp = _partial(bin_path), _partial(idx_path)
    marker = Path(f"{prefix}{INCOMPLETE_SUFFIX}")
    n_docs = n_tokens = 0
    try:
        builder = module.IndexedDatasetBuilder(str(bin_tmp), dtype=module.DType.optimal_dtype(vocab_size))
        with contextlib.closing(builder.data_file):
            for ids in documents:
                if not ids:
                    continue
                builder.add_document(numpy.asarray(ids), [len(ids)])
                n_docs += 1
                n_tokens += len(ids)
            if n_docs == 0:
                raise DataError(
                    f"no documents to write to {prefix}.bin/.idx: every input text was empty; "
                    "existing files were left as they were"
                )
            builder.finalize(str(idx_tmp))
        for path in (bin_tmp, idx_tmp):
            _fsync(path)
        _fault("data-written")
        marker.write_text("megaquant data prepare is replacing .bin and .idx\n")
        os.replace(bin_tmp, bin_path)
        _fault("data-bin-renamed")
        os.replace(idx_tmp, idx_path)
        _fsync(prefix.parent)
        marker.unlink()
        _fsync(prefix.parent)
    finally:
        for path in (bin_tmp, idx_tmp):
            path.unlink(missing_ok=True)
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
    max_documents: int | None = None,
    megatron: Path | None = None,
) -> PrepareResult:
    """Tokenize a registry dataset (`dataset`) or explicit `inputs` into `output` (a prefix).

    `megatron`: a Megatron tree whose own megatron package writes the files (default: the installed one).
    `max_docstrings` caps the built-in corpus, `max_documents` a package corpus (`realtext`): a slice.
    """
    from megaquant.launch.datasets import get_dataset

    texts: Iterable[str]
    entry = get_dataset(dataset) if dataset is not None else None
    own_text = entry is not None and (entry.builtin or entry.packages is not None)
    if entry is not None and own_text and inputs:
        what = "the built-in corpus" if entry.builtin else "read from its packages"
        raise DataError(
            f"--dataset {entry.name} is {what} and reads no files; drop --input, or drop "
            "--dataset and pass --output PREFIX to tokenize your own files"
        )
    if entry is not None and entry.packages is not None:
        from megaquant.corpus import debian

        root = debian.find_root(data_root / entry.packages)  # before the imports: the likelier problem
    _tokenizers(), _indexed_dataset(megatron)  # fail before any work when they cannot be imported
    if entry is not None and own_text:
        if entry.builtin:
            from megaquant import corpus

            texts = list(corpus.documents(max_docstrings))
        else:
            texts = [d.text for d in debian.documents(root, limit=max_documents)]
        if tokenizer is None and entry.tokenizer is not None:
            tokenizer = data_root / entry.tokenizer
            if not (tokenizer / "tokenizer.json").is_file():
                build_tokenizer(tokenizer, texts, vocab_size=entry.tokenizer_vocab)
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
        docs, tokens = write_indexed(
            Path(output), token_documents(), vocab_size=tok.get_vocab_size(), megatron=megatron
        )
    finally:
        if bar is not None:
            bar.stop()
    return PrepareResult(prefix=Path(output), documents=docs, tokens=tokens, tokenizer=tokenizer)
