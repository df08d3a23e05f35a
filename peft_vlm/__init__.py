"""peft_vlm: parameter-efficient fine-tuning that turns a frozen LLaMA-class LM and a frozen vision encoder into a
vision-language model.

    import peft_vlm as pv
    model = pv.VisionLanguageModel.from_pretrained("path/to/lm", vision="ViT-L-14", connector="mlp2x_gelu")
    pv.apply(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    print(pv.trainable_summary(model))
"""
from peft_vlm.version import __version__  # noqa: E402,F401

from peft_vlm.errors import (  # noqa: E402
    AdapterFileError,
    AdapterMismatchError,
    ConfigError,
    DataError,
    IncompatibleMethodsError,
    ModelLoadError,
    NotMergeableError,
    PeftVlmError,
    UnknownMethodError,
)
from peft_vlm.methods.apply import apply, merge, unmerge  # noqa: E402
from peft_vlm.methods.registry import Method, available_methods, register  # noqa: E402
from peft_vlm.methods.presets import available_presets  # noqa: E402
from peft_vlm.runtime.token_context import VisualInputs, token_types  # noqa: E402
from peft_vlm.methods.summary import trainable_summary  # noqa: E402
from peft_vlm.methods.adapter_file import describe_adapter, load_adapter, save_adapter  # noqa: E402
from peft_vlm.model.connectors import available_connectors, register_connector  # noqa: E402
from peft_vlm.model.vision_language_model import VisionLanguageModel  # noqa: E402
from peft_vlm.embedded import models as _embedded_names  # noqa: E402,F401 (registers "embedded" as a model name)

# Method configs live with their methods, and training pulls in accelerate: importing them on first use keeps
# `import peft_vlm` light and the core free of imports of methods.
_LAZY = {
    "export_peft": "peft_vlm.methods.lora",
    "export_transformers": "peft_vlm.methods.export_transformers",
    "JointTrainer": "peft_vlm.training",
    "TrainConfig": "peft_vlm.training",
    "AdaptionPromptConfig": "peft_vlm.methods.adaption_prompt",
    "BiasScaleConfig": "peft_vlm.methods.bias_scale",
    "EarlyFusionConfig": "peft_vlm.methods.early_fusion",
    "VisualQueryPromptConfig": "peft_vlm.methods.visual_query_prompt",
    "VisualExpertConfig": "peft_vlm.methods.visual_expert",
    "GatedCrossAttentionConfig": "peft_vlm.methods.gated_cross_attention",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peft_vlm' has no attribute '{name}'")


__all__ = [*_LAZY,
    "AdapterFileError", "AdapterMismatchError", "ConfigError", "DataError", "IncompatibleMethodsError", "Method",
    "ModelLoadError", "NotMergeableError", "PeftVlmError", "UnknownMethodError", "VisionLanguageModel", "VisualInputs",
    "apply",
    "available_connectors", "available_methods", "available_presets", "describe_adapter",
    "load_adapter", "merge", "register", "register_connector", "save_adapter", "token_types", "trainable_summary",
    "unmerge",
]
