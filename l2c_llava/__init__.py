"""l2c-llava: LLM2CLIP (caption-contrastive LLM, CLIP vision fine-tuning against it) and LLaVA-1.5 on top.

Public entry points: :func:`load_config` (YAML + overrides, validated), the readers in
:mod:`l2c_llava.data.readers`, the embedded dataset in :mod:`l2c_llava.data.synthetic`, and the
``l2c`` command (:mod:`l2c_llava.cli`). Heavy modules are imported only where they are used.
"""

from importlib.metadata import PackageNotFoundError, version

from l2c_llava.config import ConfigError, load_config, validate_config
from l2c_llava.data.readers import DataError

try:
    __version__ = version("l2c-llava")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = ["ConfigError", "DataError", "__version__", "load_config", "validate_config"]
