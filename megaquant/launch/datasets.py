"""Dataset registry: where each corpus's raw inputs and Megatron indexed dataset live, one table."""

from __future__ import annotations

from dataclasses import dataclass

from megaquant.errors import LaunchError

__all__ = ["BUILTIN_TOKENIZER_DIR", "DATASETS", "REALTEXT_CACHE", "Dataset", "get_dataset"]

BUILTIN_TOKENIZER_DIR = "tokenizers/megaquant-bpe"
"""Where `megaquant data prepare --dataset sample` writes the offline tokenizer (under the data root)."""
REALTEXT_CACHE = "dataset/realtext/debian"
"""Where `realtext`'s Debian packages may be unpacked without root (under the data root); else `/`."""


@dataclass(frozen=True, kw_only=True)
class Dataset:
    name: str
    title: str
    prefix: str
    """Megatron `--data-path` prefix, relative to the data root (`<prefix>.bin` / `<prefix>.idx`)."""
    inputs: str
    """Glob of raw text files (JSON lines with a `text` key; `.json`, `.jsonl`, `.json.gz`)."""
    tokenizer: str | None = None
    """Tokenizer directory relative to the data root; None: the model's own tokenizer."""
    builtin: bool = False
    """True: raw text is shipped with megaquant (`megaquant.corpus`), no inputs needed."""
    packages: str | None = None
    """Raw text read offline from installed or unpacked packages, under this cache directory (relative to
    the data root; `megaquant.corpus.debian`); no inputs needed."""
    tokenizer_vocab: int = 4096
    """Vocabulary of the offline byte-level BPE that `data prepare` trains when `tokenizer` is missing."""


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="wikipedia",
            title="English Wikipedia (JSON lines)",
            prefix="dataset/wikipedia_processed/wikipedia_processed_text_document",
            inputs="dataset/wikipedia/**/*.json",
        ),
        Dataset(
            name="dolma",
            title="Dolma (gzipped JSON lines)",
            prefix="dataset/dolma_processed/dolma_processed_text_document",
            inputs="dataset/dolma/**/*.json.gz",
        ),
        Dataset(
            name="sample",
            title="built-in sample corpus (shipped paragraphs + Python stdlib docstrings), offline BPE",
            prefix="dataset/sample_processed/sample_processed_text_document",
            inputs="",
            tokenizer=BUILTIN_TOKENIZER_DIR,
            builtin=True,
        ),
        Dataset(
            name="realtext",
            title="real English text, ~23 M tokens: GCIDE dictionary + Python, Linux and Perl docs "
            "(Debian packages), offline 32k BPE",
            prefix="dataset/realtext_processed/realtext_processed_text_document",
            inputs="",
            tokenizer="tokenizers/realtext-bpe-32k",
            packages=REALTEXT_CACHE,
            tokenizer_vocab=32000,
        ),
    )
}
"""`megaquant scripts` writes files for the non-built-in datasets only (the seed's matrix)."""


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise LaunchError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None
