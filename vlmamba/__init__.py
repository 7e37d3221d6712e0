"""VL-Mamba's tools: the `vlmamba` command and the packages behind it.

- `vlmamba.conversion`: converters from raw checkpoints, composing from pretrained parts, publishing to the Hub;
- `vlmamba.training`: TRL training of both stages, data, evaluation, tiny models and the demo;
- `vlmamba.model_cards`: the model cards of saved folders.

In a checkout these are the repository's `conversion/`, `training/` and `model_cards/` folders (`python -m
training.sft` runs there); installed, they are subpackages of this one. The model itself is the `modeling_vlmamba`
package, which is what a Hub repo carries as remote code.
"""
