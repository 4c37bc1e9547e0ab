"""deltatune: fine-tune pretrained transformers by every common method, and measure each."""
from .adapters_io import inspect_adapter, load_adapter, save_adapter
from .combine import combine_adapters
from .deltas import (active_config, adapter_names, apply, delete_adapter, disable_adapters, merge,
                     merge_and_unload, set_adapter, unmerge)
from .errors import DeltatuneError
from .export import save_merged
from .methods import REGISTRY as METHODS
from .methods import config_from_dict, get_method
from .methods.adapter import AdapterConfig
from .methods.base import count_parameters
from .methods.full import FullConfig
from .methods.lora import LoraConfig
from .methods.prefix import PrefixConfig
from .methods.prompt import PromptTuningConfig
from .methods.ptuning import PTuningConfig
from .mixed import mixed_adapters
from .models import PRESETS, architecture_of, load_model

__all__ = [
    "AdapterConfig", "DeltatuneError", "METHODS", "PRESETS", "FullConfig", "LoraConfig", "active_config",
    "adapter_names", "apply", "architecture_of", "config_from_dict", "count_parameters",
    "delete_adapter", "disable_adapters", "get_method", "inspect_adapter", "load_adapter",
    "load_model", "merge", "merge_and_unload", "save_adapter", "set_adapter", "unmerge",
    "combine_adapters", "mixed_adapters", "save_merged",
    "PrefixConfig", "PromptTuningConfig", "PTuningConfig",
]
__version__ = "0.1.0"
