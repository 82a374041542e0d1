"""Dataset registry: where each corpus's raw inputs and Megatron indexed dataset live, one table."""

from __future__ import annotations

from dataclasses import dataclass

from megaquant.errors import LaunchError
from megaquant.launch.presets import DATA_SPLIT

__all__ = ["BUILTIN_TOKENIZER_DIR", "DATASETS", "REALTEXT_CACHE", "REALTEXT_SPLIT", "Dataset", "get_dataset"]

BUILTIN_TOKENIZER_DIR = "tokenizers/megaquant-bpe"
"""Where `megaquant data prepare --dataset sample` writes the offline tokenizer (under the data root)."""
REALTEXT_SPLIT = "98,2,0"
"""realtext's split: 2 % of its 6070 documents (122, 0.37 M tokens, every source: the order interleaves
them) for validation, ~45 sequences of 8192 tokens; Megatron repeats it where eval needs more."""
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
    split: str = DATA_SPLIT
    """Megatron `--split` (train, validation, test shares of the documents, in their order)."""
    eval_iters: int = 0
    """Validation batches per evaluation (`--eval-iters`); 0: evaluation off, which `split` must allow."""
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
            title="real English text, 22.1 M tokens: GCIDE dictionary + Python, Linux and Perl docs "
            "(Debian packages), offline 32k BPE",
            prefix="dataset/realtext_processed/realtext_processed_text_document",
            inputs="",
            tokenizer="tokenizers/realtext-bpe-32k",
            packages=REALTEXT_CACHE,
            split=REALTEXT_SPLIT,
            eval_iters=10,
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
