"""yacs configuration: Dassl-style keys, one defaults module, strict merging."""

from clipkd.config.defaults import get_cfg_defaults
from clipkd.config.merge import build_config, flatten, merge_file, merge_overrides, validate

__all__ = ["get_cfg_defaults", "build_config", "flatten", "merge_file", "merge_overrides", "validate"]
