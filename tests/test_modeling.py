import copy
import json

import pytest
import torch
from transformers.cache_utils import DynamicCache

from modeling_vlmamba import LORA_TARGET_MODULES, VLMambaForConditionalGeneration
from modeling_vlmamba.decode_step import ssm_matrices
from tests.conftest import make_image, user_turn
from vlmamba.training.tiny import TINY_CLIP, TINY_SIGLIP, tiny_config, tiny_model, tiny_processor

# fp32 on CPU: cached and uncached paths differ only by summation order.
ATOL = 1e-5


def chat_inputs(processor, questions: list[str], images_per_prompt: int = 1, **kwargs):
    prompts = [
        processor.apply_chat_template(user_turn(question, images_per_prompt), add_generation_prompt=True)
        for question in questions
    ]
    images = [make_image(color=(40 * i, 200 - 30 * i, 90)) for i in range(len(questions) * images_per_prompt)]
    return processor(images=images or None, text=prompts, padding=True, return_tensors="pt", **kwargs)


def greedy(model, inputs, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs
    )


def test_forward_shapes_and_finite_loss(model, processor, config):
    inputs = chat_inputs(processor, ["What colour is the square?", "How many circles?"])
    out = model(**inputs, labels=inputs["input_ids"])
    batch, seq = inputs["input_ids"].shape
    assert out.logits.shape == (batch, seq, config.text_config.vocab_size)
    assert out.logits.dtype == torch.float32
    assert out.image_hidden_states.shape == (2, config.image_seq_length, config.text_config.hidden_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    loss, logits, *_ = model(**inputs, labels=inputs["input_ids"], return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)


def test_labels_on_image_positions_never_count(model, processor, config):
    inputs = chat_inputs(processor, ["What colour is the square?"])
    is_image = inputs["input_ids"] == config.image_token_id
    assert is_image.sum() == config.image_seq_length
    reference = model(**inputs, labels=inputs["input_ids"].masked_fill(is_image, -100)).loss
    scrambled = inputs["input_ids"].masked_fill(is_image, 7)  # would add loss terms if image positions counted
    assert torch.equal(model(**inputs, labels=scrambled).loss, reference)
    assert torch.equal(model(**inputs, labels=inputs["input_ids"]).loss, reference)


def test_image_token_and_image_count_mismatch_names_both(model, processor):
    inputs = chat_inputs(processor, ["What colour is the square?"])
    two_images = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(
        ValueError, match=r"inputs hold 16 image tokens, but 2 images need 32 \(the config's image_seq_length=16"
    ):
        model(input_ids=inputs["input_ids"], pixel_values=two_images)
    with pytest.raises(ValueError, match="input_ids contain image tokens but no pixel_values"):
        model(input_ids=inputs["input_ids"])


def test_pixel_values_of_the_wrong_size_are_named(model, processor):
    inputs = chat_inputs(processor, ["What colour is the square?"])
    with pytest.raises(ValueError, match=r"pixel_values have shape \(1, 3, 20, 20\) but the vision tower expects"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(1, 3, 20, 20))
    with pytest.raises(ValueError, match=r"pixel_values have shape \(3, 16, 16\)"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(3, 16, 16))


def test_logits_to_keep_returns_the_last_positions(model, processor):
    inputs = chat_inputs(processor, ["What colour is the square?"])
    full = model(**inputs).logits
    last = model(**inputs, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        model(**inputs, labels=inputs["input_ids"], logits_to_keep=1)


def test_vision_feature_layers_any_index_or_several(tokenizer, processor):
    inputs = chat_inputs(processor, ["What colour is the square?"])
    outputs = {}
    for layer in (0, -1, [0, -1]):
        model = tiny_model(tiny_config(tokenizer, vision_feature_layer=layer))
        with torch.no_grad():
            outputs[str(layer)] = model(**inputs).logits
        assert torch.isfinite(outputs[str(layer)]).all()
    assert not torch.allclose(outputs["0"], outputs["-1"])


def test_generation_never_samples_the_image_token(model, processor, tmp_path):
    assert model.generation_config.suppress_tokens == [model.config.image_token_id]
    model.generation_config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["suppress_tokens"] == [
        model.config.image_token_id
    ]

    inputs = chat_inputs(processor, ["What colour is the square?"])
    for use_cache in (True, False):
        out = greedy(model, inputs, use_cache=use_cache)
        assert all(torch.isneginf(step[:, model.config.image_token_id]).all() for step in out.scores)


def test_attention_mask_is_dropped_after_prefill(model, processor):
    inputs = chat_inputs(processor, ["What colour is the square?", "Count."])
    prefill = model.prepare_inputs_for_generation(**inputs, use_cache=True, is_first_iteration=True)
    assert torch.equal(prefill["attention_mask"], inputs["attention_mask"])
    decode = model.prepare_inputs_for_generation(**inputs, use_cache=True, is_first_iteration=False)
    assert decode["attention_mask"] is None and "pixel_values" not in decode


def test_cached_forward_takes_a_full_length_mask(model, processor):
    """Called by hand with a cache, forward may get the mask of past + new tokens and uses the new tokens' part."""
    batch = chat_inputs(processor, ["What colour is the square at the top left?", "How many?"])
    next_tokens = torch.tensor([[11], [12]])
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(next_tokens)], dim=1)
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        state = copy.deepcopy(prefill.cache_params)
        with_mask = model(input_ids=next_tokens, attention_mask=full_mask, cache_params=prefill.cache_params)
        without = model(input_ids=next_tokens, cache_params=state)
    torch.testing.assert_close(with_mask.logits, without.logits, rtol=0, atol=0)


def test_cached_greedy_generation_equals_uncached(model, processor):
    inputs = chat_inputs(processor, ["What colour is the square?"])
    cached = greedy(model, inputs, use_cache=True)
    uncached = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for cached_step, uncached_step in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(cached_step, uncached_step, rtol=0, atol=ATOL)


def test_left_padded_batch_matches_each_prompt_alone(model, processor):
    questions = ["What colour is the square at the top left?", "How many?"]
    batch = chat_inputs(processor, questions)
    assert (batch["attention_mask"][1] == 0).any(), "the short prompt must be left-padded"
    assert processor.tokenizer.padding_side == "left"
    batched = greedy(model, batch)
    prompt_length = batch["input_ids"].shape[1]
    for row, question in enumerate(questions):
        alone_inputs = chat_inputs(processor, [question])
        # The image colour depends on the position in the batch: feed the same image as in the batch.
        alone_inputs["pixel_values"] = batch["pixel_values"][row : row + 1]
        alone = greedy(model, alone_inputs)
        alone_tokens = alone.sequences[0, alone_inputs["input_ids"].shape[1] :]
        assert torch.equal(batched.sequences[row, prompt_length:], alone_tokens)
        for batched_step, alone_step in zip(batched.scores, alone.scores, strict=True):
            torch.testing.assert_close(batched_step[row], alone_step[0], rtol=0, atol=ATOL)


def test_decode_without_mask_equals_the_full_forward(model, processor):
    """One cached decode step (no mask, as generate passes it) gives the logits of a full forward over the prompt."""
    batch = chat_inputs(processor, ["What colour is the square at the top left?", "How many?"])
    next_tokens = torch.tensor([[11], [12]])
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        step = model(input_ids=next_tokens, cache_params=prefill.cache_params, use_cache=True)
        full = model(
            input_ids=torch.cat([batch["input_ids"], next_tokens], dim=1),
            attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(next_tokens)], dim=1),
            pixel_values=batch["pixel_values"],
        )
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("backbone", ["mamba", "falcon_mamba", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_graph_decode_step_equals_the_cached_forward(tokenizer, processor, residual_in_fp32, dtype, backbone):
    """`decode_step` (the step DecodeGraph captures) gives the cached forward's logits and states for each backbone:
    the same roundings in bf16 too (the residual kept in fp32 or not, the norm input in the weight dtype)."""
    config = tiny_config(tokenizer, text={"model_type": backbone, "residual_in_fp32": residual_in_fp32})
    model = tiny_model(config).to(dtype)
    batch = chat_inputs(processor, ["What colour is the square at the top left?", "How many?"])
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    next_tokens = torch.tensor([[11], [12]])
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        states = copy.deepcopy(prefill.cache_params)
        step = model(input_ids=next_tokens, cache_params=prefill.cache_params, use_cache=True)
        graph_step = model.decode_logits(next_tokens, states, ssm_matrices(model.model.language_model))
    assert graph_step.shape == step.logits.shape and graph_step.dtype == torch.float32
    torch.testing.assert_close(graph_step, step.logits, rtol=0, atol=ATOL)
    for layer_idx in range(config.text_config.num_hidden_layers):
        for read in ("get_conv_state", "get_recurrent_state"):
            expected = getattr(prefill.cache_params, read)(layer_idx, state_idx=0)
            torch.testing.assert_close(getattr(states, read)(layer_idx, state_idx=0), expected, rtol=0, atol=ATOL)


def test_graph_decode_steps_pass_only_the_new_token_once_the_cache_holds_a_state(model, processor):
    """With a DecodeGraph's cache, steps after prefill skip generate's input preparation; before it, nothing is cut."""
    inputs = chat_inputs(processor, ["What colour is the square?"])
    cache = DynamicCache(config=model.config.text_config)
    cache.decode_graph = object()  # what marks the cache of a DecodeGraph
    settings = {"cache_params": cache, "use_cache": True, "is_first_iteration": False}
    before = model.prepare_inputs_for_generation(**inputs, **settings)
    assert torch.equal(before["input_ids"], inputs["input_ids"])  # e.g. an assistant model's first call
    with torch.no_grad():
        model(**inputs, cache_params=cache, use_cache=True)
    after = model.prepare_inputs_for_generation(**inputs, **settings)
    assert after.keys() == {"input_ids", "cache_params", "use_cache"}
    assert torch.equal(after["input_ids"], inputs["input_ids"][:, -1:])
    hidden = model.prepare_inputs_for_generation(**inputs, output_hidden_states=True, **settings)
    assert hidden["output_hidden_states"]  # the graph step cannot return hidden states: the generic path runs


def test_decode_graph_key_follows_the_peft_adapter_state(tokenizer):
    """A captured decode step bakes in the adapters' Python branches and LoRA scaling, so enabling, disabling,
    merging, switching or rescaling adapters changes the key on which `generate` decides to capture again."""
    from peft import LoraConfig, get_peft_model

    targets = LORA_TARGET_MODULES
    config = LoraConfig(r=4, target_modules=targets, modules_to_save=["multi_modal_projector"])  # as training.sft
    peft_model = get_peft_model(tiny_model(tiny_config(tokenizer)), config)
    model = peft_model.base_model.model
    key = model.decode_graph_key()
    assert model.decode_graph_key() == key  # no change, no new capture
    with peft_model.disable_adapter():
        assert model.decode_graph_key() != key
    assert model.decode_graph_key() == key
    peft_model.merge_adapter()
    assert model.decode_graph_key() != key
    peft_model.unmerge_adapter()
    assert model.decode_graph_key() == key
    for layer in (module for module in model.modules() if hasattr(module, "scale_layer")):
        layer.scale_layer(0.5)
    assert model.decode_graph_key() != key
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=targets))
    with_second = model.decode_graph_key()
    peft_model.set_adapter("second")
    assert model.decode_graph_key() != with_second


def test_generate_strategies_text_only_and_several_images(model, processor, tokenizer):
    inputs = chat_inputs(processor, ["What colour is the square?"])
    prompt_length = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (2, prompt_length + 5)
    torch.manual_seed(3)
    sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20, temperature=1.5)
    torch.manual_seed(3)
    assert torch.equal(sampled, model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20, temperature=1.5))

    text_only = processor(
        text=processor.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True),
        return_tensors="pt",
    )
    assert "pixel_values" not in text_only
    assert (
        model.generate(**text_only, max_new_tokens=4, do_sample=False).shape[1] == text_only["input_ids"].shape[1] + 4
    )

    two_images = chat_inputs(processor, ["Compare the two pictures."], images_per_prompt=2)
    assert two_images["pixel_values"].shape[0] == 2
    # every beam sees the prompt's own two images, in order: its first step equals the single-sequence forward
    with torch.no_grad():
        first_step = torch.log_softmax(model(**two_images).logits[:, -1], -1)
    beam_out = model.generate(
        **two_images, max_new_tokens=2, num_beams=2, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    for beam in range(2):
        torch.testing.assert_close(torch.log_softmax(beam_out.logits[0][beam], -1), first_step[0], rtol=0, atol=ATOL)
    assert (two_images["input_ids"] == processor.image_token_id).sum() == 2 * processor.image_seq_length
    out = model(**two_images)
    assert out.image_hidden_states.shape[0] == 2
    # Each image lands in its own placeholder: swapping the images changes the logits.
    swapped = model(**{**two_images, "pixel_values": two_images["pixel_values"].flip(0)})
    assert not torch.allclose(out.logits[:, -1], swapped.logits[:, -1])


@pytest.mark.parametrize(
    ("vision", "image_size", "expected_tokens"),
    [(TINY_CLIP, 336, 576), (TINY_SIGLIP, 384, 729)],
    ids=["clip-336-14", "siglip-384-14"],
)
def test_real_patch_grids_through_processor_and_model(tokenizer, vision, image_size, expected_tokens):
    config = tiny_config(tokenizer, vision={**vision, "image_size": image_size, "patch_size": 14}, vss_expand=1)
    assert config.image_seq_length == expected_tokens
    model = tiny_model(config)
    processor = tiny_processor(tokenizer, config)
    inputs = processor(images=[make_image((500, 300))], text="<image>What is this?", return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, image_size, image_size)
    assert (inputs["input_ids"] == config.image_token_id).sum() == expected_tokens
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_hidden_states.shape == (1, expected_tokens, config.text_config.hidden_size)


def trainable_grads(model: VLMambaForConditionalGeneration, processor, checkpointing: bool) -> dict[str, bool]:
    """Backward one loss; per parameter group, whether every trainable parameter got a nonzero gradient."""
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    inputs = chat_inputs(processor, ["What colour is the square?", "How many circles?"])
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    groups = {
        "vision": "model.vision_tower.",
        "connector": "model.multi_modal_projector.",
        "llm": "model.language_model.",
    }
    result = {}
    for group, prefix in groups.items():
        params = [p for name, p in model.named_parameters() if name.startswith(prefix)]
        if all(not p.requires_grad for p in params):
            assert all(p.grad is None for p in params), f"frozen {group} received gradients"
            result[group] = False
        else:
            result[group] = all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    return result


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "gradient-checkpointing"])
@pytest.mark.parametrize("projector_type", ["mlp", "vss_l2"])
def test_gradients_reach_the_trained_parts_of_each_stage(tokenizer, processor, checkpointing, projector_type):
    config = tiny_config(tokenizer, projector_type=projector_type)
    stage_1 = tiny_model(config)
    for name, param in stage_1.named_parameters():
        param.requires_grad = name.startswith("model.multi_modal_projector.")
    assert trainable_grads(stage_1, processor, checkpointing) == {"vision": False, "connector": True, "llm": False}

    stage_2 = tiny_model(config)
    stage_2.model.vision_tower.requires_grad_(False)
    assert trainable_grads(stage_2, processor, checkpointing) == {"vision": False, "connector": True, "llm": True}


@pytest.mark.parametrize(
    ("vision", "encoder_layer"), [(TINY_SIGLIP, "SiglipEncoderLayer"), (TINY_CLIP, "CLIPEncoderLayer")]
)
def test_every_no_split_module_is_in_the_model(tokenizer, vision, encoder_layer):
    """FSDP's auto-wrap (training/configs/fsdp2.yaml) wraps the `_no_split_modules` classes and refuses a name it
    cannot find, such as SigLIP's pooling head, which a VL-Mamba tower does not build."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    model = tiny_model(tiny_config(tokenizer, vision=vision))
    assert {"FusedMambaBlock", encoder_layer} <= set(model._no_split_modules)  # the fused subclass of MambaBlock
    for name in model._no_split_modules:
        assert get_module_class_from_name(model, name) is not None, name


def test_get_image_features_takes_the_vision_towers_arguments_and_return_dict(model, processor, tokenizer):
    """As Llava's: keyword arguments reach the vision tower, and `return_dict` (or `config.return_dict`) False
    returns a tuple."""
    pixel_values = chat_inputs(processor, ["What colour?"])["pixel_values"]
    num_states = model.config.vision_config.num_hidden_layers + 1
    with torch.no_grad():
        plain = model.get_image_features(pixel_values)
        every = model.get_image_features(pixel_values, output_hidden_states=True)
        first = model.model.get_image_features(pixel_values, output_hidden_states=[0])
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
    assert plain.hidden_states is None
    assert len(every.hidden_states) == num_states and all(state is not None for state in every.hidden_states)
    assert first.hidden_states[0] is not None and all(state is None for state in first.hidden_states[1:])
    torch.testing.assert_close(first.hidden_states[0], every.hidden_states[0], rtol=0, atol=0)
    for output in (every, first):
        torch.testing.assert_close(output.pooler_output, plain.pooler_output, rtol=0, atol=0)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], plain.pooler_output)

    config = tiny_config(tokenizer, attn_implementation="eager")  # attention weights come from eager attention
    with torch.no_grad():
        attentions = tiny_model(config).get_image_features(pixel_values, output_attentions=True).attentions
    assert len(attentions) == config.vision_config.num_hidden_layers
    config.return_dict = False
    with torch.no_grad():
        from_config = tiny_model(config).get_image_features(pixel_values)
    assert isinstance(from_config, tuple)
    torch.testing.assert_close(from_config[1], plain.pooler_output, rtol=0, atol=ATOL)  # eager vs sdpa attention


def test_inputs_embeds_with_images_give_the_outputs_of_input_ids(model, processor):
    """Without input_ids, the image positions are found by the image token's embedding (as Llava does)."""
    inputs = chat_inputs(processor, ["What colour is the square at the top left?", "How many?"])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        by_ids = model(**inputs, labels=labels)
        by_embeds = model(
            inputs_embeds=embeds,
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
        )
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, rtol=0, atol=0)
    torch.testing.assert_close(by_embeds.loss, by_ids.loss, rtol=0, atol=0)  # image positions ignored in both
    with pytest.raises(ValueError, match="inputs hold 16 image tokens, but 2 images need 32"):
        model(inputs_embeds=embeds[:1], pixel_values=inputs["pixel_values"])


def test_output_hidden_states_as_layer_indices_keeps_only_those(model, processor):
    inputs = chat_inputs(processor, ["What colour?"])
    with torch.no_grad():
        every = model(**inputs, output_hidden_states=True).hidden_states
        chosen = model(**inputs, output_hidden_states=[0, -1]).hidden_states
        none = model(**inputs, output_hidden_states=False).hidden_states
    assert none is None
    assert len(chosen) == len(every) == model.config.text_config.num_hidden_layers + 1
    assert [state is not None for state in chosen] == [True] + [False] * (len(every) - 2) + [True]
    for index in (0, -1):
        torch.testing.assert_close(chosen[index], every[index], rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attn_implementation_applies_to_the_vision_tower(model, processor, tmp_path, implementation):
    """Like Llava's, and the Mamba language model (no attention) is left as it is instead of rejecting it."""
    model.save_pretrained(tmp_path)
    loaded = VLMambaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation)

    def implementations(m: VLMambaForConditionalGeneration) -> tuple[str, str, str]:
        attention = m.vision_tower.encoder.layers[0].self_attn
        return (
            m.config._attn_implementation,
            attention.config._attn_implementation,
            m.language_model.config._attn_implementation,
        )

    assert implementations(loaded) == (implementation, implementation, "eager")
    other = "eager" if implementation == "sdpa" else "sdpa"
    loaded.set_attn_implementation(other)
    assert implementations(loaded) == (other, other, "eager")
    inputs = chat_inputs(processor, ["What colour?"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=ATOL)
    assert all(getattr(VLMambaForConditionalGeneration, f"_supports_{name}") for name in ("sdpa", "flash_attn"))


def test_flash_attention_2_is_accepted_where_its_package_is(model, tmp_path):
    """Without the flash-attn package the only complaint is its absence, never that the model does not support it."""
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed: the GPU tests load with it")
    model.save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="the package for FlashAttention2 doesn't seem to be installed"):
        VLMambaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_weights_missing_from_a_checkpoint_initialise_as_from_the_config(model, tmp_path):
    """SigLIP initialises its attention and MLP at the block level (xavier-uniform weights, zero / 1e-6 biases);
    transformers' custom-code branch skipped those blocks, leaving nn.Linear's own defaults when they were missing."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".vision_tower." not in k}, tmp_path / "model.safetensors")
    torch.manual_seed(0)
    loaded = VLMambaForConditionalGeneration.from_pretrained(tmp_path)

    def block_init_holds(vision_tower) -> bool:
        holds = []
        for layer in vision_tower.encoder.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2):
                fan_out, fan_in = linear.weight.shape
                holds.append(linear.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5)
            holds.append((layer.self_attn.q_proj.bias == 0).all())
            holds.append(1e-7 < layer.mlp.fc1.bias.std() < 1e-5)  # normal(std=1e-6)
        return all(holds)

    assert block_init_holds(model.vision_tower)  # built from the config
    assert block_init_holds(loaded.vision_tower)


def test_generation_model_exposes_its_parts_as_llava_does(model):
    assert model.language_model is model.model.language_model
    assert model.vision_tower is model.model.vision_tower
    assert model.multi_modal_projector is model.model.multi_modal_projector


def test_bad_model_inputs_name_the_value_and_the_fix(model, processor, tokenizer):
    inputs = chat_inputs(processor, ["What colour?"])
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    vocab = model.config.text_config.vocab_size
    with pytest.raises(ValueError, match=rf"token ids from 0 to {vocab + 5}, outside the vocabulary of {vocab}"):
        model(input_ids=torch.tensor([[0, 1, vocab + 5]]))
    with pytest.raises(ValueError, match="token ids from -3 to"):
        model(input_ids=torch.tensor([[2, -3]]))
    for wrong in (pixels.numpy(), pixels.tolist()):
        with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor .* return_tensors='pt'"):
            model(input_ids=ids, pixel_values=wrong)
    poisoned = pixels.clone()
    poisoned[0, 0, 0, :3] = float("nan")
    with pytest.raises(ValueError, match=r"pixel_values hold 3 NaN or infinite values"):
        model(input_ids=ids, pixel_values=poisoned)
    with pytest.raises(ValueError, match="input_ids contain image tokens but no pixel_values"):
        model(input_ids=torch.tensor([[model.config.image_token_id]]))  # one token, no cache: a prompt

    changed = tiny_model(tiny_config(tokenizer, image_token_id=5))  # config.json edited; the processor says 327
    with pytest.raises(ValueError, match=r"hold no image token \(id 5, the config's image_token_id\).*compare config"):
        changed(**inputs)
