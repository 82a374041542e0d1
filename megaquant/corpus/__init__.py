"""The built-in sample corpus: paragraphs written for megaquant plus Python's own stdlib docstrings.

Everything is produced offline; `documents()` is deterministic for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator

__all__ = ["PARAGRAPHS", "STDLIB_MODULES", "documents", "stdlib_docstrings"]

PARAGRAPHS: tuple[str, ...] = (
    "A river begins as rain on high ground. The water gathers in small channels, the channels join, and "
    "by the time the stream reaches the valley floor it has a name, a bridge or two, and a town that "
    "grew up where the crossing was easiest.",
    "Number formats trade range for precision. A format with many exponent bits can hold very large and "
    "very small values, but each value is rounded more coarsely; a format with many mantissa bits rounds "
    "finely but overflows sooner. Choosing a format is choosing which errors a computation can afford.",
    "The baker starts before dawn. Flour, water, salt and a spoonful of yesterday's dough go into the "
    "bowl; the dough rests while the oven heats, and by seven the first loaves are cooling on the rack "
    "by the window where the morning light comes in.",
    "Block scaling stores one shared exponent for a small group of numbers and a few bits for each "
    "element. When the values in a block have similar magnitudes the scheme loses little; a single large "
    "outlier, however, forces the whole block onto a coarse grid.",
    "An old lighthouse stands at the end of the breakwater. Its lamp was replaced by an automatic beacon "
    "long ago, but the keepers' house is still there, and on clear evenings people walk out along the "
    "stones to watch the ferries come in.",
    "Training a language model is a long sequence of small corrections. Each step reads a batch of text, "
    "measures how badly the model predicted the next word, and nudges millions of weights in the "
    "direction that would have made the prediction a little better.",
    "In spring the orchard is white with blossom for about a week. Bees work the rows from morning until "
    "the air cools, and the farmer watches the forecast, because a single night of frost can cost the "
    "whole year's crop.",
    "A careful experiment changes one thing at a time. If two settings are changed together and the "
    "result improves, nobody can say which change helped; if the record of what was run is wrong, "
    "nobody can say anything at all.",
    "The library closes at eight. By half past seven the reading room is quiet except for the sound of "
    "pages and the occasional cart of returned books rolling between the shelves on wheels that need oil.",
    "Rounding half away from zero and rounding half to even agree on most inputs. They differ only on "
    "values exactly halfway between two representable numbers, which is rare for measured data and "
    "common for data that has already been rounded once.",
    "The mountain path switches back and forth across the slope. Walkers who take the steep shortcut "
    "arrive no sooner and far more tired, and the rain that follows their footprints slowly cuts the "
    "hillside into gullies.",
    "A matrix multiplication is a great many dot products. Each output element sums the products of a "
    "row and a column; on modern accelerators these sums run in parallel over thousands of lanes, and "
    "the format of the inputs decides how many lanes fit in the hardware.",
)
"""Written for megaquant (no third-party text); the project releases them with its own licence."""

STDLIB_MODULES: tuple[str, ...] = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip",
    "heapq", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "mailbox", "math", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "shlex", "shutil", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip
"""Pure-Python stdlib modules whose docstrings make the bulk of the sample corpus."""


def stdlib_docstrings(modules: tuple[str, ...] = STDLIB_MODULES, min_chars: int = 80) -> Iterator[str]:
    """Docstrings of the modules, their public classes, functions and methods, in a fixed order."""
    seen: set[str] = set()
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects: list[object] = [module]
        for attr, member in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(member, "__module__", None) != module.__name__:
                continue
            objects.append(member)
            if inspect.isclass(member):
                objects += [m for a, m in sorted(vars(member).items()) if not a.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                yield doc


def documents(max_docstrings: int | None = None) -> Iterator[str]:
    """The sample corpus: the shipped paragraphs, then stdlib docstrings (optionally capped)."""
    yield from PARAGRAPHS
    for i, doc in enumerate(stdlib_docstrings()):
        if max_docstrings is not None and i >= max_docstrings:
            return
        yield doc
