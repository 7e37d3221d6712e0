"""VL-Mamba's registration with lmms-eval: the `lmms_eval.models` entry point of this package names `MANIFEST`.

lmms-eval loads every such entry point whenever it imports its model registry, whatever model it is asked for, so
this module imports nothing but lmms-eval's manifest class; the model code (`lmms_eval_model`) is imported only when
`--model vlmamba` is chosen.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="vlmamba",
    chat_class_path="vlmamba.training.lmms_eval_model.VLMambaChat",
    simple_class_path="vlmamba.training.lmms_eval_model.VLMambaSimple",
)
