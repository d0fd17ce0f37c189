"""The transformers: the class-conditional GPT (baseline and CTF stage 1) and the stage-2 refiner. The names load
on first use (`ctfgen.lazy`): the configs (`models/config.py`) need no torch."""

from ctfgen.lazy import lazy_names

_HOMES = {
    "GPT": "ctfgen.models.gpt",
    "GPTConfig": "ctfgen.models.config",
    "GPT_PRESETS": "ctfgen.models.config",
    "gpt_config": "ctfgen.models.config",
    "gpt_from_llamagen": "ctfgen.models.llamagen",
    "load_llamagen_state_dict": "ctfgen.models.llamagen",
    "Refiner": "ctfgen.models.refiner",
    "RefinerConfig": "ctfgen.models.refiner",
    "REFINER_PRESETS": "ctfgen.models.refiner",
    "refiner_config": "ctfgen.models.refiner",
}
__all__ = list(_HOMES)
__getattr__, __dir__ = lazy_names(globals(), _HOMES)
