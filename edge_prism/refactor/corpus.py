"""Real text every machine has and no one here wrote: the Python standard library's docstrings.

Two disjoint splits by module, so evaluation never sees calibration text:
``calib`` (modules at even positions of a fixed sorted list) and ``eval`` (odd positions).
The text depends only on the Python version's standard library (3.11 here).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings

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
