"""Real English sentences available offline: the Python standard library's docstrings.

Every machine with Python has them, so the demo and benchmarks can calibrate
and evaluate text models on real prose without downloading a data set.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import re
from typing import Iterator

# Pure-Python modules with plenty of prose in their docstrings.
MODULES = (
    "argparse", "ast", "asyncio.events", "asyncio.tasks", "calendar", "collections", "configparser",
    "contextlib", "csv", "dataclasses", "difflib", "email.message", "email.utils", "enum", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "http.client", "http.cookiejar",
    "http.server", "imaplib", "inspect", "ipaddress", "json", "json.decoder", "logging", "logging.handlers",
    "mailbox", "mimetypes", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "poplib",
    "pprint", "pydoc", "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "wave", "webbrowser", "zipfile",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_HINTS = (">>>", "::", "{", "}", "==", "->", "()", "__", "|", "\\", "[", "]", "=")


def _docstrings(module_name: str) -> Iterator[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing on this platform just contributes nothing
        return
    yield inspect.getdoc(module) or ""
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member):
                    yield inspect.getdoc(member) or ""


def _sentences(doc: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", doc):
        text = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if 6 <= len(words) <= 40 and sentence[0].isupper() and sentence[-1] in ".!?" \
                    and not any(h in sentence for h in _CODE_HINTS):
                yield sentence


@functools.lru_cache(maxsize=1)
def _sorted_sentences() -> tuple[str, ...]:
    unique = {s for name in MODULES for doc in _docstrings(name) for s in _sentences(doc)}
    return tuple(sorted(unique, key=lambda s: hashlib.sha256(s.encode()).hexdigest()))


def stdlib_sentences() -> list[str]:
    """Distinct English sentences from stdlib docstrings, in a fixed pseudo-random order.

    Example:
        >>> sentences = stdlib_sentences()
        >>> len(sentences) > 1000 and all(s[0].isupper() for s in sentences)
        True
    """
    return list(_sorted_sentences())


def calibration_and_evaluation(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Two disjoint sets of sentences: ``n_calib`` for calibration, ``n_eval`` for evaluation."""
    sentences = stdlib_sentences()
    if n_calib + n_eval > len(sentences):
        raise ValueError(f"only {len(sentences)} sentences are available, asked for {n_calib} + {n_eval}")
    return sentences[:n_calib], sentences[n_calib:n_calib + n_eval]
