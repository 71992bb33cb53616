"""Real text every machine has and no one here wrote.

Calibration: the Python standard library's docstrings, in two disjoint splits by module,
so evaluation never sees calibration text: ``calib`` (modules at even positions of a fixed
sorted list) and ``eval`` (odd positions). The text depends only on the Python version's
standard library (3.11 here).

Held-out domains (``heldout_text``), text that calibration (these docstrings' calib split
and the model's own replies, refactor.selfgen) never saw, each from a source found without a
hub download:

- ``docstrings``: the docstrings' eval split (calibration's register, other modules).
- ``licenses``: English legal prose, the license texts under /usr/share/common-licenses
  (Debian's base-files, on every Debian or Ubuntu machine).
- ``reference``: technical prose with code, the Python Language Reference's topics that
  ``help()`` shows (``pydoc_data.topics``, in every CPython).
- ``dialogue``: short English conversations of the chatterbot-corpus package (PyPI, BSD
  licensed, pure data; in the ``test`` extra).
- ``code``: Python source of standard-library modules outside ``MODULES`` (so none of
  their docstrings is in either split).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import warnings
from pathlib import Path

from edge_prism.errors import ConfigError

log = logging.getLogger(__name__)

# Pure-Python, import-safe modules with plenty of prose in their docstrings.
MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.queues", "base64", "bisect", "calendar",
    "cmd", "codecs", "collections", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "doctest", "email.message", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "html.parser", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "json",
    "json.decoder", "logging", "logging.handlers", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "turtle", "typing", "unittest.case", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
)
SPLITS = ("calib", "eval")


def _module_text(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(name)
        except Exception:  # a platform without this module: skip it, the text stays real
            log.debug("skipping %s: not importable here", name)
            return ""
    docs = [inspect.getdoc(mod) or ""]
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for _, meth in sorted(vars(obj).items()):
                    if inspect.isfunction(meth):
                        docs.append(inspect.getdoc(meth) or "")
    return "\n\n".join(d for d in docs if len(d) > 40)


def stdlib_text(split: str = "calib") -> str:
    """The docstring text of one split (``calib`` or ``eval``) of the standard library."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    mods = MODULES[0::2] if split == "calib" else MODULES[1::2]
    return "\n\n".join(t for t in (_module_text(m) for m in mods) if t)


DOMAINS = ("docstrings", "licenses", "reference", "dialogue", "code")
LICENSES_DIR = Path("/usr/share/common-licenses")
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "Artistic", "CC0-1.0")
CODE_MODULES = ("colorsys", "graphlib", "netrc", "pyclbr", "rlcompleter", "tabnanny", "zipapp", "symtable",
                "linecache", "keyword", "posixpath", "genericpath", "nturl2path", "stringprep")
# Characters taken from each source of a domain in turn, so the first few thousand tokens
# of a domain already span many of its sources rather than one license or one module.
_SLICE = 3000


def heldout_text(domain: str) -> str:
    """The text of one held-out evaluation domain (see the module docstring for sources)."""
    if domain == "docstrings":
        return stdlib_text("eval")
    if domain == "licenses":
        missing = [n for n in LICENSES if not (LICENSES_DIR / n).is_file()]
        if missing:
            raise ConfigError(f"{LICENSES_DIR / missing[0]}: not found; the 'licenses' domain needs Debian's "
                              "base-files (any Debian or Ubuntu machine); evaluate the other domains")
        return _interleave([(LICENSES_DIR / n).read_text(encoding="utf-8") for n in LICENSES])
    if domain == "reference":
        from pydoc_data.topics import topics

        return _interleave([topics[k] for k in sorted(topics)])
    if domain == "dialogue":
        return _interleave(["\n".join(f"{'AB'[i % 2]}: {line}" for i, line in enumerate(conv))
                            for conv in _dialogues()], slice_chars=None)
    if domain == "code":
        sources = []
        for name in CODE_MODULES:
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                sources.append(Path(spec.origin).read_text(encoding="utf-8"))
        return _interleave(sources)
    raise ConfigError(f"unknown evaluation domain '{domain}': use one of {', '.join(DOMAINS)}")


def _dialogues() -> list[list[str]]:
    """chatterbot-corpus's English conversations, round-robin over its topic files."""
    try:
        import chatterbot_corpus
        import yaml
    except ImportError:
        raise ConfigError("the 'dialogue' domain needs the chatterbot-corpus and pyyaml packages: "
                          "pip install chatterbot-corpus==1.3.3 pyyaml (or pip install -e '.[test]')") from None
    data = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    per_file = []
    for f in sorted(data.glob("*.yml")):
        convs = yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []
        per_file.append([[str(line).strip() for line in c] for c in convs if isinstance(c, list) and len(c) > 1])
    out = []
    for i in range(max(map(len, per_file), default=0)):
        out.extend(convs[i] for convs in per_file if i < len(convs))
    return out


def _interleave(texts: list[str], *, slice_chars: int | None = _SLICE) -> str:
    """Slices of ``texts`` taken round-robin (whole texts when ``slice_chars`` is None),
    cut at line ends, joined by blank lines."""
    if slice_chars is None:
        return "\n\n".join(texts)
    pieces, pos, live = [], [0] * len(texts), True
    while live:
        live = False
        for i, t in enumerate(texts):
            if pos[i] >= len(t):
                continue
            end = t.find("\n", pos[i] + slice_chars)
            end = len(t) if end < 0 else end
            pieces.append(t[pos[i]:end].strip("\n"))
            pos[i], live = end, True
    return "\n\n".join(p for p in pieces if p)
