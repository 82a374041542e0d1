"""Data preparation: JSON-lines inputs, the offline tokenizer, and Megatron indexed datasets read back with
megatron-core's own IndexedDataset."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


# ---------------------------------------------------------------- data safety (atomic output, clear errors)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_failed_prepare_leaves_the_existing_dataset_untouched(tmp_path: Path) -> None:
    """A corrupt input over an existing dataset used to truncate its .bin (6 bytes left) and keep its .idx."""
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = build_tokenizer(tmp_path / "tok", list(corpus.PARAGRAPHS), vocab_size=600)
    prefix = tmp_path / "out" / "x_text_document"
    prepare_dataset(inputs=[_jsonl(tmp_path / "good.jsonl", list(corpus.PARAGRAPHS))], output=prefix,
                    tokenizer=tok)  # fmt: skip
    before = _files(prefix.parent)
    assert set(before) == {"x_text_document.bin", "x_text_document.idx"}
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"text": "one good document first"}\n{"text": \n')
    with pytest.raises(DataError, match=r"corrupt\.jsonl:2: not a JSON line"):
        prepare_dataset(inputs=[corrupt], output=prefix, tokenizer=tok)
    assert _files(prefix.parent) == before  # same bytes, and no partial files left behind
    empty = _jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match="no documents to write"):
        prepare_dataset(inputs=[empty], output=prefix, tokenizer=tok)
    with pytest.raises(DataError, match="no documents to write"):
        prepare_dataset(inputs=[empty], output=tmp_path / "new" / "y", tokenizer=tok)
    assert _files(prefix.parent) == before and not list((tmp_path / "new").iterdir())
    assert len(IndexedDataset(str(prefix))) == len(corpus.PARAGRAPHS)


def test_prepare_refuses_conflicting_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from megaquant.cli import build_app

    source = _jsonl(tmp_path / "a.jsonl", ["mine"])
    result = CliRunner().invoke(
        build_app(("megaquant.launch.commands",)),
        ["data", "prepare", "--dataset", "sample", "--input", str(source), "--data-root", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert "error: --dataset sample is the built-in corpus" in result.output and "--input" in result.output
    assert not (tmp_path / "dataset").exists()


@pytest.mark.parametrize("missing", ["tokenizers", "megatron.core.datasets.indexed_dataset"])
def test_missing_optional_dependency_is_an_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    from typer.testing import CliRunner

    from megaquant.cli import build_app

    monkeypatch.setitem(sys.modules, missing, None)  # `import` of it raises ModuleNotFoundError
    result = CliRunner().invoke(
        build_app(("megaquant.launch.commands",)), ["data", "prepare", "--dataset", "sample",
                                                    "--data-root", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert "install megaquant[megatron]" in result.output


# A hand-written stand-in for a Megatron-LM checkout's megatron package (only what data prepare uses); its
# index file is marked, so a test can tell which megatron wrote it.
FAKE_INDEXED_DATASET = """
import numpy

class DType:
    @staticmethod
    def optimal_dtype(vocab_size):
        return numpy.uint16 if vocab_size < 65500 else numpy.int32

class IndexedDatasetBuilder:
    def __init__(self, bin_path, dtype=numpy.int32):
        self.data_file = open(bin_path, "wb")
        self.dtype, self.lengths = dtype, []

    def add_document(self, tensor, lengths):
        self.data_file.write(numpy.asarray(tensor, dtype=self.dtype).tobytes())
        self.lengths += lengths

    def finalize(self, idx_path):
        self.data_file.close()
        with open(idx_path, "w") as handle:
            handle.write("checkout-index " + " ".join(map(str, self.lengths)))
"""


def _checkout(root: Path) -> Path:
    package = root / "megatron" / "core" / "datasets"
    package.mkdir(parents=True)
    for folder in (root / "megatron", root / "megatron" / "core", package):
        (folder / "__init__.py").write_text("")
    (package / "indexed_dataset.py").write_text(FAKE_INDEXED_DATASET)
    return root


def _prepare(*args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEGAQUANT_FAULT"}
    if fault is not None:
        env["MEGAQUANT_FAULT"] = fault
    argv = [sys.executable, "-m", "megaquant", "data", "prepare", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_prepare_with_a_checkout_and_killed_at_every_step(tmp_path: Path) -> None:
    """`--megatron PATH` writes with the checkout's own megatron package (no pip megatron-core needed); a
    process killed at any step of writing leaves the old dataset readable or a marker the launcher refuses,
    and the next prepare repairs it."""
    from megaquant.data import DATA_STEPS, dataset_problem

    checkout = _checkout(tmp_path / "Megatron-LM")
    tok = build_tokenizer(tmp_path / "tok", list(corpus.PARAGRAPHS), vocab_size=600)
    prefix = tmp_path / "out" / "x_text_document"
    old = _jsonl(tmp_path / "old.jsonl", ["old one", "old two"])
    new = _jsonl(tmp_path / "new.jsonl", ["new one", "new two", "new three"])
    args = ("--megatron", str(checkout), "--output", str(prefix), "--tokenizer", str(tok))
    first = _prepare("--input", str(old), *args)
    assert first.returncode == 0, first.stderr
    assert "2 documents" in first.stdout
    assert Path(f"{prefix}.idx").read_text().startswith("checkout-index ")
    before = _files(prefix.parent)
    assert dataset_problem(prefix) is None
    for step in DATA_STEPS:
        killed = _prepare("--input", str(new), *args, fault=step)
        assert killed.returncode == 137, killed.stderr
        if step == "data-written":  # nothing replaced yet: the old dataset is intact
            assert {k: v for k, v in _files(prefix.parent).items() if not k.startswith(".")} == before
            assert dataset_problem(prefix) is None
        else:  # the new .bin is in, the old .idx still there: marked, and the launcher refuses it
            problem = dataset_problem(prefix)
            assert problem is not None and "interrupted" in problem and "run it again" in problem
        again = _prepare("--input", str(new), *args)
        assert again.returncode == 0, again.stderr
        assert dataset_problem(prefix) is None
        assert set(_files(prefix.parent)) == {"x_text_document.bin", "x_text_document.idx"}  # partials gone
        assert "3 documents" in again.stdout and len(Path(f"{prefix}.idx").read_text().split()) == 1 + 3


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole built-in sample corpus, prepared as `megaquant data prepare --dataset sample` does."""
    pytest.importorskip("megatron.core")
    root = tmp_path_factory.mktemp("sample-root")
    prepare_dataset(dataset="sample", data_root=root)
    return root


def _arg(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("preset", ["smoke", "single-gpu", "fast", "standard"])
def test_sample_corpus_builds_every_split_of_every_preset(sample_data: Path, preset: str) -> None:
    """Megatron's GPTDataset over the sample corpus with each preset's argv: every split it builds must hold
    a sample (its sampler asserts 'no sample to consume: 0' otherwise; the validation split of 99,1,0 at
    1024 tokens used to be empty)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megaquant.launch.run import TrainRequest, plan_run

    request = TrainRequest(model="tiny", dataset="sample", preset=preset, megatron=sample_data,
                           run_dir=sample_data / "run")  # fmt: skip
    argv = plan_run(request, require_tree=False).megatron_args
    assert _arg(argv, "--eval-iters") == "0"  # so Megatron asks for no validation / test samples
    tokenizer, eod = load_tokenizer(Path(_arg(argv, "--tokenizer-model")))
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=int(_arg(argv, "--seq-length")),
        blend=([_arg(argv, "--data-path")], None),
        split=_arg(argv, "--split"),
        path_to_cache=str(sample_data / f"cache-{preset}"),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=SimpleNamespace(
            eod=eod, pad=-1, vocab_size=tokenizer.get_vocab_size(), unique_identifiers={"sample": preset}
        ),  # fmt: skip
        mid_level_dataset_surplus=0.005,
    )
    train_samples = min(int(_arg(argv, "--train-samples")), 2000)  # the length is not what is checked
    splits = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, 0, 0], lambda: True, config).build()
    assert splits[0] is not None and len(splits[0]) >= train_samples
    assert {i: len(ds) for i, ds in enumerate(splits) if ds is not None and len(ds) == 0} == {}


def test_a_fixed_validation_seed_gives_every_run_the_same_validation_samples(sample_data: Path) -> None:
    """megaquant.launch.pretrain.gpt_datasets with megatron-core's GPTDataset over the sample corpus: with
    --mq-validation-seed the validation split is the same for runs of different seeds, and only it is."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megaquant.launch.datasets import get_dataset
    from megaquant.launch.pretrain import gpt_datasets

    ds = get_dataset("sample")
    tokenizer, eod = load_tokenizer(sample_data / str(ds.tokenizer))
    stub = SimpleNamespace(eod=eod, pad=-1, vocab_size=tokenizer.get_vocab_size(), unique_identifiers={})

    def make_config(seed: int) -> GPTDatasetConfig:
        return GPTDatasetConfig(
            random_seed=seed, sequence_length=128, blend=([str(sample_data / ds.prefix)], None),
            split="80,20,0", path_to_cache=str(sample_data / "cache-valseed"), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, tokenizer=stub, mid_level_dataset_surplus=0.005,
        )  # fmt: skip

    built: list[list[bool]] = []

    def build(config: GPTDatasetConfig, n: list[int]) -> list[GPTDataset]:
        splits = BlendedMegatronDatasetBuilder(GPTDataset, n, lambda: True, config).build()
        built.append([d is not None for d in splits])
        return splits

    def samples(split: GPTDataset) -> list[list[int]]:
        return [split[i]["tokens"].tolist() for i in range(8)]

    def run(seed: int, validation_seed: int | None) -> tuple[list[list[int]], list[list[int]]]:
        train, valid, _ = gpt_datasets(
            [64, 16, 0], seed=seed, validation_seed=validation_seed, make_config=make_config, build=build
        )
        return samples(train), samples(valid)

    (train_a, valid_a), (train_b, valid_b) = run(1235, 7), run(1236, 7)
    assert valid_a == valid_b and train_a != train_b  # the same validation text, the run's own training order
    assert built[1] == [False, True, False]  # the second build makes the validation split only
    assert run(1235, None)[1] != run(1236, None)[1]  # Megatron's default: the run's seed shuffles it too
    assert run(7, 7) == run(7, None)  # the same seed: one build, Megatron's own datasets
    assert run(7, None)[1] == valid_a  # validation-only build = the validation split of a full build
