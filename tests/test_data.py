"""Data preparation: JSON-lines inputs, the offline tokenizer, and Megatron indexed datasets read back with
megatron-core's own IndexedDataset."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from megaquant import corpus
from megaquant.data import DataError, build_tokenizer, load_tokenizer, prepare_dataset, read_texts

pytest.importorskip("tokenizers")


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_read_texts_formats(tmp_path: Path) -> None:
    lines = _jsonl(tmp_path / "a.jsonl", ["first doc", "", "second doc"])
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": "third doc"}, {"text": "fourth\ndoc"}]))
    zipped = tmp_path / "c.json.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as handle:
        handle.write("\n" + json.dumps({"text": "fifth doc ü"}) + "\n\n")
    assert list(read_texts([lines, array, zipped])) == ["first doc", "second doc", "third doc", "fourth\ndoc",
                                                         "fifth doc ü"]  # fmt: skip


def test_read_texts_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a JSON line"):
        list(read_texts([bad]))
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"keyless\.jsonl:3: expected a JSON object with a string 'text'"):
        list(read_texts([keyless]))
    with pytest.raises(DataError, match="cannot read"):
        list(read_texts([tmp_path / "missing.jsonl"]))


def test_sample_corpus_is_real_offline_text() -> None:
    docs = list(corpus.documents(max_docstrings=50))
    assert docs[: len(corpus.PARAGRAPHS)] == list(corpus.PARAGRAPHS)
    assert len(docs) == len(corpus.PARAGRAPHS) + 50
    assert docs == list(corpus.documents(max_docstrings=50))  # deterministic
    assert all(len(d) >= 80 for d in docs)


def test_offline_tokenizer_round_trips(tmp_path: Path) -> None:
    texts = list(corpus.documents(max_docstrings=100))
    directory = build_tokenizer(tmp_path / "tok", texts, vocab_size=1024)
    assert {p.name for p in directory.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    tokenizer, eod = load_tokenizer(directory)
    assert eod == tokenizer.token_to_id("<|endoftext|>") and eod is not None
    assert tokenizer.get_vocab_size() == 1024
    for text in texts[:20] + ["naïve 数字 \t tabs"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_prepare_sample_and_read_back_with_megatron(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    result = prepare_dataset(dataset="sample", data_root=tmp_path, max_docstrings=60, progress=True)
    prefix = tmp_path / "dataset/sample_processed/sample_processed_text_document"
    assert result.prefix == prefix
    assert prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()
    assert result.tokenizer == tmp_path / "tokenizers/megaquant-bpe"
    tokenizer, eod = load_tokenizer(result.tokenizer)
    texts = list(corpus.documents(max_docstrings=60))
    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == result.documents == len(texts)
    assert sum(len(dataset[i]) for i in range(len(dataset))) == result.tokens
    for i in (0, 5, len(texts) - 1):
        ids = [int(t) for t in dataset[i]]
        assert ids[-1] == eod
        assert tokenizer.decode(ids[:-1]) == texts[i]


def test_prepare_registry_dataset_from_its_inputs(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = build_tokenizer(tmp_path / "tok", list(corpus.PARAGRAPHS), vocab_size=600)
    _jsonl(tmp_path / "dataset/wikipedia/AA/wiki_00.json", ["Alpha article text.", "Beta article."])
    _jsonl(tmp_path / "dataset/wikipedia/AB/wiki_01.json", ["Gamma article."])
    result = prepare_dataset(dataset="wikipedia", data_root=tmp_path, tokenizer=tok, append_eod=False)
    assert result.prefix == tmp_path / "dataset/wikipedia_processed/wikipedia_processed_text_document"
    tokenizer, _ = load_tokenizer(tok)
    dataset = IndexedDataset(str(result.prefix))
    assert [tokenizer.decode([int(t) for t in dataset[i]]) for i in range(len(dataset))] == [
        "Alpha article text.",
        "Beta article.",
        "Gamma article.",
    ]
    with pytest.raises(DataError, match="no input files"):
        prepare_dataset(dataset="dolma", data_root=tmp_path, tokenizer=tok)
    with pytest.raises(DataError, match="no output"):
        prepare_dataset(inputs=[tmp_path / "dataset/wikipedia/AA/wiki_00.json"], tokenizer=tok)


def test_data_prepare_cli(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    from typer.testing import CliRunner

    from megaquant.cli import build_app

    tok = build_tokenizer(tmp_path / "tok", list(corpus.PARAGRAPHS), vocab_size=600)
    source = _jsonl(tmp_path / "in.jsonl", ["one", "two", "three"])
    result = CliRunner().invoke(
        build_app(("megaquant.launch.commands",)),
        ["data", "prepare", "--input", str(source), "--output", str(tmp_path / "out/x_text_document"),
         "--tokenizer", str(tok)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 documents" in result.output
    assert (tmp_path / "out/x_text_document.idx").is_file()
