"""Dataset registry: where each corpus's raw inputs and Megatron indexed dataset live, one table."""

from __future__ import annotations

from dataclasses import dataclass

from megaquant.errors import LaunchError

__all__ = ["BUILTIN_TOKENIZER_DIR", "DATASETS", "Dataset", "get_dataset"]

BUILTIN_TOKENIZER_DIR = "tokenizers/megaquant-bpe"
"""Where `megaquant data prepare --dataset sample` writes the offline tokenizer (under the data root)."""


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
    )
}
"""`megaquant scripts` writes files for the non-built-in datasets only (the seed's matrix)."""


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise LaunchError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None
