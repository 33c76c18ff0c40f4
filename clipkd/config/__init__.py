"""yacs configuration: Dassl-style keys, one defaults module, strict merging."""

from clipkd.config.defaults import get_cfg_defaults
from clipkd.config.checks import check_config
from clipkd.config.merge import build_config, check_value, flatten, merge_file, merge_overrides, validate

__all__ = ["get_cfg_defaults", "build_config", "check_config", "check_value", "flatten", "merge_file",
           "merge_overrides", "validate"]
