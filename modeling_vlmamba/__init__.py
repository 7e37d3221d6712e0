"""VL-Mamba (Qiao et al., 2024) as a Hub-native transformers model.

Importing this package registers the classes with the transformers Auto* factories, and marks them for
`save_pretrained` to write `auto_map` and copy the code files, so saved folders load with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_vlmamba import VLMambaConfig, VLMambaVisionConfig
from .modeling_vlmamba import (
    LORA_TARGET_MODULES,
    VisionSelectiveScan,
    VLMambaForConditionalGeneration,
    VLMambaModel,
    VLMambaMultiModalProjector,
    VLMambaPreTrainedModel,
    VLMambaVisionTower,
    cross_scan,
    merge_scans,
)
from .processing_vlmamba import DEFAULT_CHAT_TEMPLATE, IMAGES_FIRST_CHAT_TEMPLATE, VLMambaProcessor

AutoConfig.register(VLMambaConfig.model_type, VLMambaConfig, exist_ok=True)
AutoModel.register(VLMambaConfig, VLMambaModel, exist_ok=True)
AutoModelForImageTextToText.register(VLMambaConfig, VLMambaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VLMambaConfig, VLMambaProcessor, exist_ok=True)

VLMambaConfig.register_for_auto_class()
VLMambaModel.register_for_auto_class("AutoModel")
VLMambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
VLMambaProcessor.register_for_auto_class()

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IMAGES_FIRST_CHAT_TEMPLATE",
    "LORA_TARGET_MODULES",
    "VLMambaConfig",
    "VLMambaForConditionalGeneration",
    "VLMambaModel",
    "VLMambaMultiModalProjector",
    "VLMambaPreTrainedModel",
    "VLMambaProcessor",
    "VLMambaVisionConfig",
    "VLMambaVisionTower",
    "VisionSelectiveScan",
    "cross_scan",
    "merge_scans",
]
