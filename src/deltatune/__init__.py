"""deltatune: fine-tune pretrained transformers by every common method, and measure each."""
from deltatune.adapters_io import inspect_adapter, load_adapter, save_adapter
from deltatune.combine import combine_adapters
from deltatune.deltas import (active_config, adapter_names, apply, delete_adapter, disable_adapters, merge,
                     merge_and_unload, set_adapter, unmerge)
from deltatune.errors import DeltatuneError
from deltatune.export import save_merged
from deltatune.methods import REGISTRY as METHODS
from deltatune.methods import config_from_dict, get_method
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.adapter import AdapterConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.base import count_parameters
from deltatune.methods.boft import BOFTConfig
from deltatune.methods.full import FullConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.loha import LoHaConfig
from deltatune.methods.lokr import LoKrConfig
from deltatune.methods.ln_tuning import LNTuningConfig
from deltatune.methods.lora import LoraConfig
from deltatune.methods.oft import OFTConfig
from deltatune.methods.prefix import PrefixConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.ptuning import PTuningConfig
from deltatune.methods.vera import VeraConfig
from deltatune.mixed import mixed_adapters
from deltatune.models import PRESETS, architecture_of, load_model
from deltatune.quantization import QuantizationConfig

__all__ = [
    "AdapterConfig", "DeltatuneError", "METHODS", "PRESETS", "FullConfig", "LoraConfig", "active_config",
    "adapter_names", "apply", "architecture_of", "config_from_dict", "count_parameters",
    "delete_adapter", "disable_adapters", "get_method", "inspect_adapter", "load_adapter",
    "load_model", "merge", "merge_and_unload", "save_adapter", "set_adapter", "unmerge",
    "combine_adapters", "mixed_adapters", "save_merged",
    "PrefixConfig", "PromptTuningConfig", "PTuningConfig", "IA3Config", "QuantizationConfig",
    "OFTConfig", "BOFTConfig", "LoHaConfig", "LoKrConfig",
    "VeraConfig", "AdaLoraConfig", "LNTuningConfig", "BitFitConfig",
]
__version__ = "0.1.0"
