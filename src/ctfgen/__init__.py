"""ctfgen: class-conditional image generation by coarse-to-fine token prediction, beside a plain autoregressive
baseline built from the same parts.

    from ctfgen import CTFPipeline, SamplingParams

    pipe = CTFPipeline.from_pretrained("pretrained/fmnist")
    images = pipe(["Sneaker", "Bag"], per_class=4, sampling=SamplingParams(cfg_scale=2.0)).images

The names below load on first use (`ctfgen.lazy`): importing the package, or `ctfgen.cli` for `ctfgen --help`,
does not import torch.
"""

from ctfgen.lazy import lazy_names

_HOMES = {
    "CTFPipeline": "ctfgen.pipeline",
    "SamplingParams": "ctfgen.sampling.params",
    "SamplingRequest": "ctfgen.sampling.request",
    "PipelineOutput": "ctfgen.sampling.request",
    "CtfgenError": "ctfgen.errors",
    "CoarseMap": "ctfgen.clustering",
    "VQModel": "ctfgen.tokenizer.model",
    "VQConfig": "ctfgen.tokenizer.model",
    "GPT": "ctfgen.models.gpt",
    "GPTConfig": "ctfgen.models.config",
    "gpt_config": "ctfgen.models.config",
    "Refiner": "ctfgen.models.refiner",
    "RefinerConfig": "ctfgen.models.refiner",
    "refiner_config": "ctfgen.models.refiner",
}
__all__ = list(_HOMES)
__getattr__, __dir__ = lazy_names(globals(), _HOMES)
