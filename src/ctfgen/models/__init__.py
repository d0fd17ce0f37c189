"""The transformers: the class-conditional GPT (baseline and CTF stage 1) and the stage-2 refiner."""

from ctfgen.models.config import GPT_PRESETS, GPTConfig, gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.models.llamagen import gpt_from_llamagen, load_llamagen_state_dict
from ctfgen.models.refiner import REFINER_PRESETS, Refiner, RefinerConfig, refiner_config

__all__ = ["GPT", "GPTConfig", "GPT_PRESETS", "gpt_config", "gpt_from_llamagen", "load_llamagen_state_dict",
           "Refiner", "RefinerConfig", "REFINER_PRESETS", "refiner_config"]
