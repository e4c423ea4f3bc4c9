"""Configs: YAML + dotted overrides, validated by a typed schema per recipe before anything loads.

core.py (sections, problems, YAML, overrides, writing) <- schemas.py (a schema per recipe, RECIPES) and
migrations.py (keys added or removed since run folders held them) <- loader.py (load and validate).
"""

from l2c_llava.config.core import (
    ConfigError,
    Problem,
    RecipeConfig,
    apply_overrides,
    dump_config,
    parse_override,
    read_yaml,
    save_resolved_config,
    write_config,
)
from l2c_llava.config.loader import load_config, validate_config
from l2c_llava.config.schemas import RECIPES, ClipConfig, MllmConfig, Stage1Config, Stage2Config

__all__ = [
    "RECIPES",
    "ClipConfig",
    "ConfigError",
    "MllmConfig",
    "Problem",
    "RecipeConfig",
    "Stage1Config",
    "Stage2Config",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_override",
    "read_yaml",
    "save_resolved_config",
    "validate_config",
    "write_config",
]
