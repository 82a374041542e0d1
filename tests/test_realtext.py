"""The `realtext` corpus (megaquant.corpus.debian): four Debian packages fetched with apt-get (no root),
read offline, and a slice prepared into a Megatron indexed dataset. Skips only where apt cannot fetch."""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from megaquant.corpus import debian
from megaquant.launch.datasets import REALTEXT_CACHE, get_dataset

SLICE = 20
"""Documents prepared in the test (0.28 M characters); the first 100 hold every source."""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("realtext")
    try:
        debian.fetch(root / REALTEXT_CACHE)
    except debian.CorpusMissing as exc:
        if not (shutil.which("apt-get") and os.geteuid() == 0):
            pytest.skip(f"the Debian packages cannot be fetched here: {exc}")
        # a fresh machine (CI runs as root) may have no package lists yet: fetch them once, then retry
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        try:
            debian.fetch(root / REALTEXT_CACHE)
        except debian.CorpusMissing as again:
            pytest.skip(f"the Debian packages cannot be fetched here, even after apt-get update: {again}")
    return root


def test_missing_packages_name_the_install_command(tmp_path: Path) -> None:
    system = tmp_path / "system"
    pod = system / "usr/share/perl/5.36.0/pod"  # what perl-modules ships without perl-doc
    pod.mkdir(parents=True)
    (pod / "perldiag.pod").write_text("=head1 NAME\n\nperldiag - various Perl diagnostics\n")
    with pytest.raises(
        debian.CorpusMissing,
        match=r"dict-gcide, python3\.11-doc, linux-doc-6\.1, perl-doc not found; .*apt-get download",
    ):
        debian.find_root(tmp_path / "cache", system=system)


def test_registry_entry() -> None:
    entry = get_dataset("realtext")
    assert entry.packages == REALTEXT_CACHE and not entry.builtin
    assert entry.tokenizer_vocab == 32000 and entry.tokenizer is not None


def test_first_documents_are_real_english_from_every_source(data_root: Path) -> None:
    root = debian.find_root(data_root / REALTEXT_CACHE, system=data_root / "no-system")
    assert root == data_root / REALTEXT_CACHE
    docs = debian.documents(root, limit=100)
    assert len(docs) == 100
    assert docs == debian.documents(root, limit=100)  # deterministic
    assert len({(d.source, d.name) for d in docs}) == 100
    sources = collections.Counter(d.source for d in docs)
    assert set(sources) == set(debian.PACKAGES), sources  # interleaved: every share holds every source
    text = " ".join(d.text for d in docs)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) > 100_000
    common = collections.Counter(w.lower() for w in words)
    for word in ("the", "of", "and", "to", "is"):
        assert common[word] > 500, word
    gcide = [d.text for d in docs if d.source == "dict-gcide"]
    headwords = re.compile(
        r"^\S[^\n]*? \\[^\\\n]+\\", re.MULTILINE
    )  # a headword line: Steer \Steer\, v. t. ...
    assert all(len(headwords.findall(t)) >= 40 for t in gcide)  # pages of 50 entries
    assert sum(t.count("[1913 Webster]") + t.count("[WordNet") for t in gcide) > 50 * len(gcide)
    assert not any(d.name.startswith("translations/") for d in docs)


def test_prepare_a_slice_and_read_it_back_with_megatron(data_root: Path) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megaquant.data import DataError, load_tokenizer, prepare_dataset

    with pytest.raises(DataError, match="reads no files"):
        prepare_dataset(dataset="realtext", data_root=data_root, inputs=[data_root / "x.jsonl"])
    result = prepare_dataset(dataset="realtext", data_root=data_root, max_documents=SLICE)
    entry = get_dataset("realtext")
    assert result.prefix == data_root / entry.prefix
    assert result.tokenizer == data_root / str(entry.tokenizer)
    tokenizer, eod = load_tokenizer(result.tokenizer)
    assert eod is not None and 4096 < tokenizer.get_vocab_size() <= 32000  # the 32k trainer on a slice
    texts = [d.text for d in debian.documents(data_root / REALTEXT_CACHE, limit=SLICE)]
    dataset = IndexedDataset(str(result.prefix))
    assert len(dataset) == result.documents == SLICE
    assert sum(len(dataset[i]) for i in range(len(dataset))) == result.tokens
    assert result.tokens > 50_000
    for i in (0, 7, SLICE - 1):
        ids = [int(t) for t in dataset[i]]
        assert ids[-1] == eod
        assert tokenizer.decode(ids[:-1]) == texts[i]


@pytest.mark.parametrize("preset", ["smoke", "single-gpu"])
def test_runs_on_realtext_evaluate_on_a_validation_split(preset: str) -> None:
    """The other datasets keep 100,0,0 and no eval; realtext's split and eval reach Megatron's argv (and the
    whole matrix of tests/test_launch_validate.py puts them through Megatron's parser and sample counts)."""
    from megaquant.launch.argv import Parallel, megatron_args
    from megaquant.launch.datasets import DATASETS
    from megaquant.launch.models import MODELS
    from megaquant.launch.presets import EVAL_POINTS, PRESETS

    def flags(dataset: str, steps: int | None = None) -> dict[str, str]:
        base = PRESETS[preset] if steps is None else PRESETS[preset].with_steps(steps)
        args = megatron_args(MODELS["tiny"], DATASETS[dataset], base, Parallel(), data_root=Path("/d"))
        return {k: args[args.index(k) + 1] for k in ("--split", "--eval-iters", "--eval-interval")}

    iters = PRESETS[preset].train_iters
    assert flags("realtext") == {"--split": "98,2,0", "--eval-iters": "10",
                                 "--eval-interval": str(iters // EVAL_POINTS)}  # fmt: skip
    assert flags("realtext", steps=5)["--eval-interval"] == "1"
    assert flags("sample") == {"--split": "100,0,0", "--eval-iters": "0", "--eval-interval": str(iters)}
