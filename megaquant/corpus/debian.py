"""The `realtext` corpus: English prose and technical text from four Debian packages, read offline.

| package | what | licence |
|---|---|---|
| dict-gcide | GNU Collaborative International Dictionary of English (Webster's 1913 + WordNet) | GPL-2+ |
| python3.11-doc | the Python 3.11 documentation, reStructuredText sources | PSF License |
| linux-doc-6.1 | the Linux kernel documentation, reST sources (translations excluded) | GPL-2 |
| perl-doc | the Perl 5.36 manual pages (POD) | GPL-1+ or Artistic |

The packages are read from a root directory: `/` when they are installed (`apt-get install ...`) or a cache
directory they were unpacked into without root (`apt-get download ...` then `dpkg -x PKG.deb DIR`; `fetch`
does both). Nothing is downloaded while reading. Paths are globbed so other Debian versions work.

Documents are one page of 50 dictionary entries or one documentation file each, in a fixed order that
interleaves the four sources (sorted by a hash of the document's name), so any contiguous share of the
documents (what Megatron's `--split` takes) draws from every source. Deterministic for given package
versions.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megaquant.errors import MegaquantError

__all__ = ["PACKAGES", "CorpusMissing", "Document", "documents", "fetch", "find_root", "install_hint"]

PACKAGES: tuple[str, ...] = ("dict-gcide", "python3.11-doc", "linux-doc-6.1", "perl-doc")

_GCIDE = "usr/share/dictd/gcide"
_GLOBS: dict[str, tuple[str, str]] = {
    # package: (directory glob under the root, file glob under it)
    "python3.11-doc": ("usr/share/doc/python3*/html/_sources", "**/*.rst.txt"),
    "linux-doc-6.1": ("usr/share/doc/linux-doc-*/html/_sources", "**/*.rst.txt"),
    "perl-doc": ("usr/share/perl/5*/pod", "*.pod"),
}
GCIDE_ENTRIES = 50
"""Dictionary entries per document (126 k entries: ~2.5 k pages of ~4.5 k tokens)."""
_MARKERS: dict[str, str] = {
    # a file only the package ships (perl-modules also ships pod/perldiag.pod)
    "python3.11-doc": "usr/share/doc/python3*/html/_sources/library/functions.rst.txt",
    "linux-doc-6.1": "usr/share/doc/linux-doc-*/html/_sources/process/howto.rst.txt",
    "perl-doc": "usr/share/perl/5*/pod/perlfunc.pod",
}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class CorpusMissing(MegaquantError):
    """A package of the corpus is neither installed nor unpacked in the cache directory."""


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str


def install_hint(cache: Path) -> str:
    pkgs = " ".join(PACKAGES)
    return (
        f"install the packages (`apt-get install {pkgs}`), or unpack them without root into {cache}: "
        f"`cd {cache} && apt-get download {pkgs} && for d in *.deb; do dpkg -x $d .; done`, or in Python "
        "`megaquant.corpus.debian.fetch(Path(DIR))` (run `apt-get update` first on a fresh machine)"
    )


def _present(root: Path) -> list[str]:
    found = [p for p in ("dict-gcide",) if Path(f"{root / _GCIDE}.dict.dz").is_file()]
    found += [p for p, marker in _MARKERS.items() if any(root.glob(marker))]
    return found


def find_root(cache: Path, system: Path = Path("/")) -> Path:
    """`cache` if it holds every package, else `system` if they are installed there; else CorpusMissing."""
    for root in (cache, system):
        if len(_present(root)) == len(PACKAGES):
            return root
    missing = [p for p in PACKAGES if p not in _present(cache) and p not in _present(system)]
    names = ", ".join(missing) or "a package"
    raise CorpusMissing(f"realtext corpus: {names} not found; {install_hint(cache)}")


_MEMBERS: dict[str, tuple[str, ...]] = {
    # the files the corpus reads (tar wildcards; the rest is HTML), and each package's copyright file
    "dict-gcide": ("./usr/share/dictd/gcide.*",),
    "python3.11-doc": ("./usr/share/doc/python3*/html/_sources/*",),
    "linux-doc-6.1": ("./usr/share/doc/linux-doc-*/html/_sources/*",),
    "perl-doc": ("./usr/share/perl/*.pod",),
}


def fetch(cache: Path) -> Path:
    """Download the packages' .deb files with `apt-get download` into `cache` (no root needed) and unpack
    the files the corpus reads there (what `dpkg -x` would unpack, less the HTML); needs apt and GNU tar."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=cache, check=True, capture_output=True)
        for package in PACKAGES:
            (deb,) = cache.glob(f"{package}_*.deb")
            members = [*_MEMBERS[package], f"./usr/share/doc/{package}/copyright"]
            with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as dpkg:
                subprocess.run(
                    ["tar", "-x", "-C", str(cache), "--wildcards", *members],
                    stdin=dpkg.stdout, check=True, capture_output=True,
                )  # fmt: skip
            if dpkg.returncode:
                raise subprocess.CalledProcessError(dpkg.returncode, dpkg.args)
            deb.unlink()
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise CorpusMissing(
            f"cannot fetch {' '.join(PACKAGES)} ({exc}; {detail.decode(errors='replace').strip()[-300:]}); "
            f"{install_hint(cache)}"
        ) from None
    return cache


def _b64(value: str) -> int:
    number = 0
    for char in value:
        number = number * 64 + _B64.index(char)
    return number


def _gcide(root: Path) -> Iterator[Document]:
    """Dictionary pages: runs of `GCIDE_ENTRIES` consecutive entries (dictd format: the index gives each
    entry's offset and length in the text), so a page weighs about as much as a documentation file."""
    index = Path(f"{root / _GCIDE}.index").read_text(encoding="utf-8").splitlines()
    with gzip.open(f"{root / _GCIDE}.dict.dz") as handle:  # dictzip is gzip-compatible
        data = handle.read()
    spans: dict[tuple[int, int], str] = {}
    for line in index:
        head, offset, length = line.split("\t")[:3]
        if not head.startswith("00-database"):  # the file's own metadata entries
            spans.setdefault((_b64(offset), _b64(length)), head)
    entries = sorted(spans.items())
    for start in range(0, len(entries), GCIDE_ENTRIES):
        page = entries[start : start + GCIDE_ENTRIES]
        text = "\n".join(_decode(data[offset : offset + length]).strip("\n") for (offset, length), _ in page)
        yield Document("dict-gcide", f"{start:06d} {page[0][1]} .. {page[-1][1]}", text + "\n")


def _decode(raw: bytes) -> str:
    """UTF-8; a few GCIDE entries hold Windows-1252 bytes (curly quotes)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _files(root: Path, package: str) -> Iterator[Document]:
    directory, pattern = _GLOBS[package]
    for base in sorted({p.resolve() for p in root.glob(directory)}):  # python3.11-doc/html is a link
        for path in sorted(base.glob(pattern)):
            rel = path.relative_to(base).as_posix()
            if package == "linux-doc-6.1" and rel.startswith("translations/"):
                continue  # English only
            yield Document(package, rel, path.read_text(encoding="utf-8", errors="replace"))


def _key(doc: Document) -> str:
    return hashlib.sha1(f"{doc.source}/{doc.name}".encode()).hexdigest()


def documents(root: Path, limit: int | None = None) -> list[Document]:
    """Every non-empty document of the corpus under `root`, interleaved in hash order (first `limit`)."""
    docs = list(_gcide(root))
    for package in _GLOBS:
        docs += _files(root, package)
    docs = sorted((d for d in docs if d.text.strip()), key=_key)
    return docs if limit is None else docs[:limit]
