"""Run a saved VL-Mamba on CUDA and record what it computes, for tests/test_gpu.py.

Usage: python tests/gpu_forward.py FOLDER INPUTS.pt OUT.pt [--torch-path]
With --torch-path, mamba_ssm and causal_conv1d are made unimportable, so transformers takes its PyTorch reference
implementations: the other run (kernels) is compared with this one.
"""

import sys

# A `None` entry makes `import` raise ImportError and `importlib.util.find_spec` return None, which is how
# transformers' availability checks (and ours) then see the kernels: not installed.
KERNEL_MODULES = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda")


def main(folder: str, inputs_path: str, out_path: str, torch_path: bool = False) -> None:
    if torch_path:
        sys.modules.update(dict.fromkeys(KERNEL_MODULES))
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm  # noqa: F401

        kernels = True
    except ImportError:
        kernels = False

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).cuda()
    inputs = {name: tensor.cuda() for name, tensor in torch.load(inputs_path).items()}
    batch = {name: inputs[name] for name in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    generated = model.generate(**batch, max_new_tokens=12, do_sample=False)

    model.train()
    single = {name: inputs[f"train_{name}"] for name in ("input_ids", "pixel_values")}
    loss = model(**single, labels=single["input_ids"]).loss
    loss.backward()
    watched = ("model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.vss.mixer.in_proj.weight")
    watched += (
        "model.language_model.layers.0.mixer.in_proj.weight",
        "model.language_model.layers.1.mixer.x_proj.weight",  # Mamba and FalconMamba
        "model.language_model.layers.1.mixer.out_proj.weight",
    )
    grads = {name: param.grad.cpu() for name, param in model.named_parameters() if name in watched}
    torch.save(
        {
            "logits": logits.cpu(),
            "generated": generated.cpu(),
            "loss": loss.detach().cpu(),
            "grads": grads,
            "kernels": kernels,
        },
        out_path,
    )


if __name__ == "__main__":
    main(*sys.argv[1:4], torch_path="--torch-path" in sys.argv)
