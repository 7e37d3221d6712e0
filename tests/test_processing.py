import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from modeling_vlmamba import DEFAULT_CHAT_TEMPLATE, VLMambaProcessor
from tests.conftest import make_image, user_turn
from vlmamba.training.tiny import tiny_config, tiny_processor

RED = (200, 30, 30)


def test_placeholders_expand_to_image_seq_length(processor, config):
    inputs = processor(images=[make_image(), make_image()], text=["<image>a<image>b"], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 16, 16)
    assert (inputs["input_ids"] == config.image_token_id).sum() == 2 * config.image_seq_length
    assert processor.image_token_id == config.image_token_id


def test_chat_template_renders_the_zephyr_format(processor):
    conversation = [
        {"role": "system", "content": "Be brief."},
        *user_turn("What colour?"),
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": "And the other half?"},
    ]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == (
        "<|system|>\nBe brief.<|endoftext|>\n"
        "<|user|>\n<image>What colour?<|endoftext|>\n"
        "<|assistant|>\nRed.<|endoftext|>\n"
        "<|user|>\nAnd the other half?<|endoftext|>\n"
        "<|assistant|>\n"
    )
    with pytest.raises(Exception, match="roles are system, user and assistant, got tool"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}])


def test_assistant_mask_covers_the_answer_and_its_end_token(processor, tokenizer):
    conversation = [*user_turn("What colour?"), {"role": "assistant", "content": "Red."}]
    out = processor.apply_chat_template(
        conversation,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        images=[make_image()],
    )
    ids = out["input_ids"][0]
    masked = [token for token, keep in zip(ids, out["assistant_masks"][0], strict=True) if keep]
    assert tokenizer.decode(masked) == "Red.<|endoftext|>"


def test_tokenized_chat_with_images_in_messages(processor, config):
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "image": make_image()}, {"type": "text", "text": "What colour?"}],
        }
    ]
    out = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert (out["input_ids"] == config.image_token_id).sum() == config.image_seq_length
    assert out["pixel_values"].shape == (1, 3, 16, 16)


def test_pad_keeps_the_aspect_ratio_and_resize_stretches(tokenizer, config):
    wide = Image.new("RGB", (32, 16), RED)  # padded to 32x32: a band of mean colour above and below
    padded = tiny_processor(tokenizer, config, image_aspect_ratio="pad")(images=wide, return_tensors="pt")
    resized = tiny_processor(tokenizer, config, image_aspect_ratio="resize")(images=wide, return_tensors="pt")
    padded, resized = padded["pixel_values"][0], resized["pixel_values"][0]
    red = torch.tensor([(RED[c] / 255 - 0.5) / 0.5 for c in range(3)])
    mean_colour = torch.tensor([(128 / 255 - 0.5) / 0.5] * 3)  # SigLIP mean 0.5 -> 128
    torch.testing.assert_close(padded[:, 0, 8], mean_colour, atol=0.02, rtol=0)
    torch.testing.assert_close(padded[:, 8, 8], red, atol=0.02, rtol=0)
    torch.testing.assert_close(resized[:, 0, 8], red, atol=0.02, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "YCbCr"])
def test_any_common_pil_mode_becomes_rgb(processor, mode):
    pixel_values = processor(images=make_image(mode=mode), text="<image>hi", return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 16, 16)


def test_transparent_pixels_become_white(processor):
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    pixel_values = processor(images=transparent, text="<image>hi", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, torch.ones_like(pixel_values), atol=0.01, rtol=0)


def test_image_paths_and_arrays_are_accepted(processor, tmp_path):
    path = tmp_path / "picture.png"
    make_image().save(path)
    from_path = processor(images=[str(path)], text="<image>hi", return_tensors="pt")["pixel_values"]
    from_pil = processor(images=[make_image()], text="<image>hi", return_tensors="pt")["pixel_values"]
    array = np.asarray(make_image())  # (H, W, C) uint8
    from_array = processor(images=[array], text="<image>hi", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_path, from_pil)
    torch.testing.assert_close(from_array, from_pil)


def test_bad_inputs_name_the_problem(processor, tmp_path):
    with pytest.raises(ValueError, match="3 <image> placeholders but 2 images"):
        processor(images=[make_image(), make_image()], text=["<image><image>", "<image>"])
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        processor(text="<image>hi")
    with pytest.raises(ValueError, match="empty text prompt"):
        processor(images=[make_image()], text=["<image>x", "  "])
    with pytest.raises(ValueError, match="Image mode 'F' is not supported"):
        processor(images=Image.new("F", (8, 8)), text="<image>hi")
    with pytest.raises(ValueError, match="Image mode 'I;16' is not supported"):
        processor(images=Image.new("I;16", (8, 8)), text="<image>hi")
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=f"Image file not found: '{missing}'"):
        processor(images=[str(missing)], text="<image>hi")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match=f"Cannot read image file '{not_an_image}'"):
        processor(images=[not_an_image], text="<image>hi")


def test_construction_errors(processor, tokenizer):
    with pytest.raises(ValueError, match="image_aspect_ratio='crop' is not supported; valid choices: pad, resize"):
        VLMambaProcessor(processor.image_processor, tokenizer, image_aspect_ratio="crop")
    with pytest.raises(ValueError, match=r"splits '<img>' into \d+ tokens; it must be one special token"):
        VLMambaProcessor(processor.image_processor, tokenizer, image_token="<img>")


def test_save_and_reload_round_trip(processor, tmp_path, tokenizer):
    config = tiny_config(tokenizer)
    custom = tiny_processor(tokenizer, config, image_aspect_ratio="resize")
    custom.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is VLMambaProcessor
    assert (loaded.image_seq_length, loaded.image_aspect_ratio) == (config.image_seq_length, "resize")
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    assert (tmp_path / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    text = "<image>What colour?"
    expected, actual = custom(images=make_image(), text=text), loaded(images=make_image(), text=text)
    assert expected["input_ids"] == actual["input_ids"]
    torch.testing.assert_close(torch.as_tensor(expected["pixel_values"]), torch.as_tensor(actual["pixel_values"]))


def test_batch_decode_drops_special_tokens(processor):
    ids = processor(images=make_image(), text="<image>What colour?<|endoftext|>")["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["What colour?"]


def test_a_processor_built_by_hand_expands_each_image_to_what_the_model_needs(tokenizer, config, model):
    """image_seq_length follows from the image processor's output size and the patch size, never a fixed default;
    a processor built for another encoder gives an error naming the config's image_seq_length."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    siglip = VLMambaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 384, "width": 384}), tokenizer=tokenizer
    )
    assert siglip.image_seq_length == 729
    clip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert VLMambaProcessor(image_processor=clip, tokenizer=tokenizer).image_seq_length == 576
    tiny_images = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    by_hand = VLMambaProcessor(image_processor=tiny_images, tokenizer=tokenizer, patch_size=4)
    assert by_hand.image_seq_length == config.image_seq_length == 16
    inputs = by_hand(images=[make_image()], text="<image>What colour?", return_tensors="pt")
    assert (inputs["input_ids"] == config.image_token_id).sum() == 16
    model(**inputs)

    wrong = VLMambaProcessor(image_processor=tiny_images, tokenizer=tokenizer)  # SigLIP/CLIP's 14 px patches
    inputs = wrong(images=[make_image()], text="<image>What colour?", return_tensors="pt")
    with pytest.raises(ValueError, match=r"image_seq_length=16 each.*here 1 per image"):
        model(**inputs)


def test_images_nested_per_sample_are_checked_against_each_samples_placeholders(processor, config):
    first, second, third = make_image(color=(250, 0, 0)), make_image(color=(0, 250, 0)), make_image(color=(0, 0, 250))
    texts = ["<image><image>Compare them.", "<image>What colour?"]
    with pytest.raises(ValueError, match="Sample 0 has 2 <image> placeholders but 1 images"):
        processor(images=[[first], [second, third]], text=texts)
    with pytest.raises(ValueError, match="nested for 1 samples but there are 2 texts"):
        processor(images=[[first, second, third]], text=texts)
    nested = processor(images=[[first, second], [third]], text=texts, padding=True, return_tensors="pt")
    flat = processor(images=[first, second, third], text=texts, padding=True, return_tensors="pt")
    torch.testing.assert_close(nested["pixel_values"], flat["pixel_values"], rtol=0, atol=0)
    assert torch.equal(nested["input_ids"], flat["input_ids"])


def test_padding_to_a_square_is_bounded_like_pil_decoding(processor, tokenizer, config, tmp_path):
    """A 140-byte 20000x1 PNG would pad to a 400-million-pixel canvas; PIL only bounds what it decodes."""
    Image.new("RGB", (20000, 1)).save(tmp_path / "sliver.png")
    assert (tmp_path / "sliver.png").stat().st_size < 1000
    with pytest.raises(ValueError, match=r"sliver.png' is 20000x1: padding it to a square would take 20000x20000"):
        processor(images=[str(tmp_path / "sliver.png")], text="<image>hi")
    with pytest.raises(ValueError, match=r"An image is 20000x1: padding"):
        processor(images=[Image.new("RGB", (20000, 1))], text="<image>hi")
    resized = tiny_processor(tokenizer, config, image_aspect_ratio="resize")
    assert resized(images=[str(tmp_path / "sliver.png")], text="<image>hi")["pixel_values"][0].shape == (3, 16, 16)


def test_unusable_image_files_and_inputs_are_named(processor, tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.png' is a folder: pass the path of an image file"):
        processor(images=[str(tmp_path / "folder.png")], text="<image>hi")
    make_image((64, 64)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"Cannot read image file '.*cut.jpg' \(.*\): it is truncated or corrupt"):
        processor(images=[str(tmp_path / "cut.jpg")], text="<image>hi")
    from_url = processor(images=[f"file://{tmp_path / 'whole.jpg'}"], text="<image>hi", return_tensors="pt")
    from_path = processor(images=[str(tmp_path / "whole.jpg")], text="<image>hi", return_tensors="pt")
    torch.testing.assert_close(from_url["pixel_values"], from_path["pixel_values"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="text is an empty list: give one prompt per sample"):
        processor(text=[])
