"""GPU benchmarks of VL-Mamba at the paper's 2.8B shape, with baselines measured in the same run.

    python bench/bench_vlmamba.py decode [--llm mamba|falcon_mamba|mamba2] [--batch-sizes 1 16 64] [--new-tokens 256]
                                         [--skip-transformer] [--profile]
    python bench/bench_vlmamba.py prefill [--batch-sizes 1 16 64] [--profile]
    python bench/bench_vlmamba.py train [--batch-size 8] [--steps 6] [--no-gradient-checkpointing] [--profile]

`decode`: (a) VL-Mamba (SigLIP-SO400M-shape tower, `vss_l2` + bidirectional connector, Mamba-2.8B-shape LLM,
random weights, bf16) answering one 384x384 image and a short question (800 prompt tokens), greedy, through
`generate` with CUDA-graph decode, and again without decoding ahead (an ablation: see `without_decode_ahead`);
(b) mamba_ssm's `MambaLMHeadModel.generate(cg=True)` with the same LLM weights and prompt length; (c) a same-size
transformer (Phi-2 shape) in transformers with a static cache (auto-compiled). Prints decode tokens/s, time to first
token, first-call warm-up and peak memory, with ratios to (b) and (c). `--llm` picks the language model, at the shape
of mamba-2.8b (the default), Falcon3-Mamba-7B or mamba2-2.7b; its baselines in the same run are mamba_ssm's
`generate(cg=True)` for Mamba and Mamba-2, and transformers' own `FalconMambaForCausalLM.generate` (eager, and with a
static cache) for FalconMamba. The decode-ahead ablation, the Phi-2 baseline and the memory-growth check run for
Mamba only.

`prefill`: time to first token at each batch size (one 384x384 image, 800 prompt tokens), with the fused
multi-token path and without it (transformers' Mamba forward), against the vision tower + connector alone plus
mamba_ssm's own time to first token on the same tokens, measured in the same run.

`train`: stage-2 training steps of the same model through `training.sft` (TRL SFTTrainer, bf16 autocast, gradient
checkpointing unless `--no-gradient-checkpointing`, vision frozen) on synthetic 384x384 scenes: tokens/s and model
FLOPs utilisation (6 x trained params x tokens / time / 989 TFLOP/s, plus 2 x frozen params x tokens for the vision
forward); then (`--anchors`, the default) what it is held to, measured alone at the same shapes: mamba_ssm's own
training step of the LLM (checkpointed per block likewise), the vision forward, and the connector's forward and
backward, and the ratio of the step to their sum.
"""

import argparse
import contextlib
import functools
import gc
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationMixin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_vlmamba import VLMambaConfig, VLMambaForConditionalGeneration  # noqa: E402

H100_BF16_FLOPS = 989e12
PROMPT_TOKENS = 800
VOCAB = 50280
IMAGE_TOKEN_ID = 50277
# The language models' shapes (random weights): mamba-2.8b; Falcon3-Mamba-7B, its 65024-token vocabulary grown by the
# <image> row (id 65024); mamba2-2.7b, its vocabulary padded to a multiple of 16 as mamba_ssm pads it.
LLM_SHAPES = {
    "mamba": {"model_type": "mamba", "hidden_size": 2560, "num_hidden_layers": 64, "vocab_size": VOCAB},
    "falcon_mamba": {
        "model_type": "falcon_mamba",
        "hidden_size": 4096,
        "num_hidden_layers": 64,
        "vocab_size": 65025,
        "state_size": 16,
        "time_step_rank": 256,
        "tie_word_embeddings": False,
    },
    "mamba2": {
        "model_type": "mamba2",
        "hidden_size": 2560,
        "num_hidden_layers": 64,
        "vocab_size": 50288,
        "state_size": 128,
        "num_heads": 80,
        "head_dim": 64,
        "n_groups": 1,
        "chunk_size": 256,
        "tie_word_embeddings": True,
    },
}
IMAGE_TOKEN_IDS = {"mamba": IMAGE_TOKEN_ID, "falcon_mamba": 65024, "mamba2": IMAGE_TOKEN_ID}


def paper_config(llm: str = "mamba") -> VLMambaConfig:
    """SigLIP-SO400M/14-384 + vss_l2 (bidirectional) + the `llm` shape (Mamba-2.8B: the defaults of VLMambaConfig)."""
    config = VLMambaConfig(text_config=LLM_SHAPES[llm], image_token_id=IMAGE_TOKEN_IDS[llm])
    assert config.image_seq_length == 729
    return config


def timed(function, repeats: int = 1) -> tuple[float, object]:
    """Median wall time of `function()` over `repeats` calls (CUDA synchronised), and its last result."""
    times, result = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def profile_report(profiler, wall: float, rows: int = 15, sort_by: str = "self_device_time_total") -> str:
    """Wall time, the GPU time of the kernels (the ops above them report the same time again), and the `rows` ops and
    kernels with the most `sort_by` time, from a finished `torch.profiler.profile`."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    kernel_ms = sum(event.self_device_time_total for event in events if event.device_type == DeviceType.CUDA) / 1e3
    table = events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)
    return f"wall {wall * 1e3:.1f} ms (profiled), GPU kernels {kernel_ms:.1f} ms\n{table}"


def profile_table(function, rows: int = 15, sort_by: str = "self_device_time_total") -> str:
    """The `rows` kernels and ops with the most GPU (or `sort_by`) time in one call of `function`, and GPU busy vs
    wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        function()
        torch.cuda.synchronize()
    return profile_report(profiler, time.perf_counter() - start, rows, sort_by)


def prompt(batch: int, generator: torch.Generator, image_token_id: int = IMAGE_TOKEN_ID) -> dict[str, torch.Tensor]:
    """800 tokens: 35 text tokens (ids below `image_token_id`), the 729 image tokens of one image, 36 text tokens; and
    its pixels."""
    text = torch.randint(2, image_token_id, (batch, PROMPT_TOKENS - 729), generator=generator)
    image = torch.full((batch, 729), image_token_id)
    input_ids = torch.cat([text[:, :35], image, text[:, 35:]], dim=1)
    pixel_values = torch.randn(batch, 3, 384, 384, generator=generator)
    return {"input_ids": input_ids.cuda(), "pixel_values": pixel_values.cuda().to(torch.bfloat16)}


def measure_generate(generate, new_tokens: int, batch: int, repeats: int = 5) -> dict:
    """First call (warm-up included), then `repeats` interleaved calls of `new_tokens` and of one token: time to first
    token is the median one-token call, decode tokens/s the difference of the medians (prefill time, bound by the
    host, varies by tens of ms between calls, hence the medians), and peak memory."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    first, _ = timed(lambda: generate(new_tokens))
    steady, ttft = [], []
    for _ in range(repeats):
        steady.append(timed(lambda: generate(new_tokens))[0])
        ttft.append(timed(lambda: generate(1))[0])
    steady, ttft = statistics.median(steady), statistics.median(ttft)
    return {
        "decode_tokens_per_s": batch * (new_tokens - 1) / (steady - ttft),
        "ttft_s": ttft,
        "warmup_s": first - steady,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def compare_with_eager(model, inputs: dict, new_tokens: int = 32) -> dict:
    """Greedy tokens of graph decode vs eager decode; where they part, the eager top-2 score margin at that step
    (after the logits processors, as greedy picks) and the largest raw logit difference up to it (how close a tie the
    split was, against the size of bf16 noise)."""
    settings = {
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "output_logits": True,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    eager = model.generate(**inputs, cuda_graph_decode=False, **settings)
    graphed = model.generate(**inputs, **settings)
    prompt_length = inputs["input_ids"].shape[1]
    equal = (eager.sequences[0, prompt_length:] == graphed.sequences[0, prompt_length:]).tolist()
    first = equal.index(False) if False in equal else None
    checked = new_tokens if first is None else first + 1
    difference = max(
        (a - b).abs().max().item() for a, b in zip(eager.logits[:checked], graphed.logits[:checked], strict=True)
    )
    result = {f"bf16_first_{new_tokens}_tokens_equal_eager": first is None, "bf16_max_logit_difference": difference}
    if first is not None:
        top2 = eager.scores[first][0].topk(2).values
        result |= {"bf16_first_different_token": first, "bf16_eager_top2_margin_there": (top2[0] - top2[1]).item()}
    return result


def generate_step_ms(model, inputs: dict, new_tokens: int) -> float:
    """Median time between two decode steps inside `generate` (no prefill in it), from a stopping criterion that
    notes the time at each step and never stops."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.times, self.never = [], None

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
            self.times.append(time.perf_counter())
            if self.never is None:
                self.never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            return self.never

    clock = StepClock()
    vlmamba_runner(model, inputs, stopping_criteria=StoppingCriteriaList([clock]))(new_tokens)
    return 1e3 * statistics.median(later - earlier for earlier, later in itertools.pairwise(clock.times[1:]))


@contextlib.contextmanager
def without_decode_ahead(model: VLMambaForConditionalGeneration):
    """An ablation: `generate` without `DecodeAhead` among its stopping criteria, so that each decode step is launched
    only after generate's loop has waited for the GPU (this model instance only, for the duration)."""
    model._get_stopping_criteria = functools.partial(GenerationMixin._get_stopping_criteria, model)
    try:
        yield
    finally:
        del model._get_stopping_criteria


def vlmamba_runner(model, inputs: dict, **kwargs):
    def generate(new_tokens: int):
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
        )

    return generate


def mamba_ssm_model(vlmamba: VLMambaForConditionalGeneration):
    """mamba_ssm's `MambaLMHeadModel` (Mamba or Mamba-2) holding the VL-Mamba's language model weights."""
    from mamba_ssm.models.config_mamba import MambaConfig as RawConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    text = vlmamba.config.text_config
    ssm_cfg = {}
    if text.model_type == "mamba2":
        ssm_cfg = {"layer": "Mamba2", "d_state": text.state_size, "headdim": text.head_dim, "ngroups": text.n_groups}
        ssm_cfg |= {"d_conv": text.conv_kernel, "expand": text.expand, "chunk_size": text.chunk_size}
    raw = RawConfig(
        d_model=text.hidden_size, n_layer=text.num_hidden_layers, vocab_size=text.vocab_size, ssm_cfg=ssm_cfg
    )
    model = MambaLMHeadModel(raw, device="cuda", dtype=torch.bfloat16).eval()
    state = {
        key.replace("embeddings.", "embedding."): value
        for key, value in vlmamba.model.language_model.state_dict().items()
    }
    model.backbone.load_state_dict(state)
    return model


def phi_model():
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240, vocab_size=51200
    )
    with torch.device("cuda"):
        return PhiForCausalLM(config).to(torch.bfloat16).eval()


def decode(args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    results, model = vlmamba_measurements(args, generator)
    if args.llm == "falcon_mamba":
        results |= falcon_mamba_measurements(args, model, generator)
    else:
        results["mamba_ssm"] = mamba_ssm_measurements(args, model, generator, results["checks"])
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if args.llm == "mamba" and not args.skip_transformer:
        results["transformer"] = transformer_measurements(args, generator)
    ours = [name for name in ("vlmamba", "vlmamba_no_decode_ahead") if results.get(name)]
    baselines = ("mamba_ssm", "transformer", "falcon_mamba_eager", "falcon_mamba_static")
    results["decode_speed_ratios"] = {
        f"{mine} / {baseline}": {
            batch: results[mine][batch]["decode_tokens_per_s"] / results[baseline][batch]["decode_tokens_per_s"]
            for batch in args.batch_sizes
            if batch in results[baseline]
        }
        for mine in ours
        for baseline in baselines
        if results.get(baseline)
    }
    return results


def vlmamba_measurements(args: argparse.Namespace, generator: torch.Generator) -> tuple[dict, torch.nn.Module]:
    """(a) VL-Mamba through generate (and, for Mamba, without decoding ahead); the results and the model."""
    torch.manual_seed(0)  # the same random weights in every run
    with torch.device("cuda"):
        model = VLMambaForConditionalGeneration(paper_config(args.llm)).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # random weights: run every step
    image_token_id = model.config.image_token_id
    results = {"llm": args.llm, "vlmamba": {}, "vlmamba_no_decode_ahead": {}, "checks": {}}

    single = prompt(1, generator, image_token_id)
    results["checks"].update(compare_with_eager(model, single))
    results["checks"]["fp32_graph_tokens_equal_eager"] = fp32_graph_tokens_equal_eager(model, single)
    eager_time, _ = timed(
        lambda: model.generate(**single, max_new_tokens=32, do_sample=False, cuda_graph_decode=False)
    )
    results["checks"]["eager_decode_tokens_per_s_batch1"] = 31 / eager_time

    # vision tower + connector alone, and the LLM prefill alone (mamba_ssm), for the TTFT target
    with torch.no_grad():
        vision_s, _ = timed(lambda: model.model.get_image_features(single["pixel_values"]), repeats=5)
    results["checks"]["vision_and_connector_s"] = vision_s

    for batch in args.batch_sizes:
        inputs = prompt(batch, generator, image_token_id)
        model._decode_graphs.clear()  # warm-up and peak memory of this batch size alone
        results["vlmamba"][batch] = measure_generate(vlmamba_runner(model, inputs), args.new_tokens, batch)
        print(f"VL-Mamba batch {batch}: {results['vlmamba'][batch]}", flush=True)
    stock_tokens = vlmamba_runner(model, single)(32)
    if 1 in results["vlmamba"]:  # where a token's time goes: the decode step's GPU time vs the generate loop
        graph = model._decode_graphs[1].graph
        replay_s, _ = timed(lambda: [graph.replay() for _ in range(100)])
        results["checks"]["graph_replay_ms_batch1"] = replay_s * 10
        replay_sync_s, _ = timed(lambda: [(graph.replay(), torch.cuda.synchronize()) for _ in range(100)])
        results["checks"]["graph_replay_and_sync_ms_batch1"] = replay_sync_s * 10
        results["checks"]["generate_ms_per_token_batch1"] = 1e3 / results["vlmamba"][1]["decode_tokens_per_s"]
        results["checks"]["generate_step_ms_batch1"] = generate_step_ms(model, single, args.new_tokens)
        if args.profile:
            decode_64 = vlmamba_runner(model, single)
            table = profile_table(lambda: decode_64(64), rows=25, sort_by="self_cpu_time_total")
            print("VL-Mamba generate, batch 1, 64 new tokens, by host time:", table, sep="\n")
    if args.llm != "mamba":
        return results, model
    with without_decode_ahead(model):
        equal = torch.equal(vlmamba_runner(model, single)(32), stock_tokens)
        results["checks"]["no_decode_ahead_gives_the_same_32_tokens"] = equal
        for batch in args.batch_sizes:
            runner = vlmamba_runner(model, prompt(batch, generator))
            model._decode_graphs.clear()
            results["vlmamba_no_decode_ahead"][batch] = measure_generate(runner, args.new_tokens, batch)
            measured = results["vlmamba_no_decode_ahead"][batch]
            print(f"VL-Mamba, no decode-ahead, batch {batch}: {measured}", flush=True)

    with torch.no_grad():
        prefill_s, _ = timed(lambda: model(**single, use_cache=True, logits_to_keep=1), repeats=5)
    results["checks"]["vlmamba_prefill_forward_s"] = prefill_s
    long_generate = vlmamba_runner(model, single)
    long_generate(2)  # the batch-1 graph, dropped by the rows above, is captured again before memory is measured
    if args.profile:
        print("VL-Mamba time to first token, batch 1:", profile_table(lambda: long_generate(1)), sep="\n")
    torch.cuda.reset_peak_memory_stats()
    long_generate(256)
    peak_256 = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    long_generate(4096)
    peak_4096 = torch.cuda.max_memory_allocated()
    results["checks"]["peak_memory_growth_256_to_4096"] = peak_4096 / peak_256 - 1
    return results, model


def fp32_graph_tokens_equal_eager(model, inputs: dict, new_tokens: int = 32) -> bool:
    """Whether the graph decode of an fp32 copy of the language model and head gives eager's greedy tokens (`inputs`'
    image as features, so that the vision tower stays bf16)."""
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], return_dict=True)
    model.model.language_model.float()
    model.lm_head.float()
    try:
        settings = {"input_ids": inputs["input_ids"], "mm_encoder_outputs": {"image": features}}
        settings |= {"max_new_tokens": new_tokens, "do_sample": False}
        eager = model.generate(**settings, cuda_graph_decode=False)
        return torch.equal(model.generate(**settings), eager)
    finally:
        model.model.language_model.to(torch.bfloat16)
        model.lm_head.to(torch.bfloat16)
        model._decode_graphs.clear()


def mamba_ssm_measurements(args: argparse.Namespace, model, generator: torch.Generator, checks: dict) -> dict:
    """(b) mamba_ssm's own `generate(cg=True)` with the same LLM weights and prompt length (Mamba or Mamba-2)."""
    native, results = mamba_ssm_model(model), {}
    limit = model.config.image_token_id
    for batch in args.batch_sizes:
        ids = prompt(batch, generator, limit)["input_ids"].clamp(max=limit - 1)

        def generate(new_tokens: int, ids=ids):
            return native.generate(ids, max_length=PROMPT_TOKENS + new_tokens, cg=True, top_k=1)

        results[batch] = measure_generate(generate, args.new_tokens, batch)
        print(f"mamba_ssm batch {batch}: {results[batch]}", flush=True)
    single = prompt(1, generator, limit)["input_ids"].clamp(max=limit - 1)
    with torch.no_grad():
        checks["mamba_ssm_prefill_s"] = timed(lambda: native(single, num_last_tokens=1), repeats=5)[0]
    if args.profile:
        print("mamba_ssm prefill, batch 1:", profile_table(lambda: native(single, num_last_tokens=1)), sep="\n")
    return results


def falcon_mamba_measurements(args: argparse.Namespace, model, generator: torch.Generator) -> dict:
    """(b) transformers' own `FalconMambaForCausalLM.generate` on the VL-Mamba's language model and head (the same
    modules): eager, and with a static cache, which `generate` compiles on CUDA where the model allows it."""
    from transformers import FalconMambaForCausalLM

    with torch.device("meta"):
        llm = FalconMambaForCausalLM(model.config.text_config)
    llm.backbone, llm.lm_head = model.model.language_model, model.lm_head
    llm.eval().generation_config.eos_token_id = None
    limit = model.config.image_token_id
    results = {"falcon_mamba_eager": {}, "falcon_mamba_static": {}}
    for name, extra in (("falcon_mamba_eager", {}), ("falcon_mamba_static", {"cache_implementation": "static"})):
        for batch in args.batch_sizes:
            ids = prompt(batch, generator, limit)["input_ids"].clamp(max=limit - 1)

            def generate(new_tokens: int, ids=ids, extra=extra):
                return llm.generate(
                    ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra
                )

            try:
                results[name][batch] = measure_generate(generate, args.new_tokens, batch, repeats=3)
            except Exception as error:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                results[name][batch] = {"error": f"{type(error).__name__}: {error}"[:500]}
                print(f"{name} batch {batch} failed: {results[name][batch]['error']}", flush=True)
                break
            results[name][batch]["compiled"] = getattr(llm, "_compiled_call", None) is not None
            print(f"{name} batch {batch}: {results[name][batch]}", flush=True)
    for name in results:  # failed rows out of the ratios
        results[name] = {batch: row for batch, row in results[name].items() if "error" not in row} or results[name]
    return results


def transformer_measurements(args: argparse.Namespace, generator: torch.Generator) -> dict:
    """(c) the Phi-2-shape transformer, static cache (auto-compiled by generate on CUDA)."""
    phi, results = phi_model(), {}
    for batch in args.batch_sizes:
        ids = prompt(batch, generator)["input_ids"].clamp(max=50000)

        def generate(new_tokens: int, ids=ids):
            return phi.generate(
                ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                cache_implementation="static",
                max_cache_len=PROMPT_TOKENS + args.new_tokens,
            )

        results[batch] = measure_generate(generate, args.new_tokens, batch)
        print(f"Phi-2 shape batch {batch}: {results[batch]}", flush=True)
    return results


def train(args: argparse.Namespace) -> dict:
    from modeling_vlmamba import VLMambaProcessor
    from vlmamba.conversion.hub_folder import save_folder
    from vlmamba.training.sft import build_parser, build_trainer
    from vlmamba.training.synthetic import generate as generate_scenes
    from vlmamba.training.synthetic import texts
    from vlmamba.training.tiny import image_processor_for
    from vlmamba.training.tokenizer import train_gpt_neox_tokenizer

    work = Path(tempfile.mkdtemp(prefix="vlmamba-bench-"))
    data = generate_scenes(work / "data", train_scenes=args.batch_size * (args.steps + 2), heldout_scenes=1, size=384)
    tokenizer = train_gpt_neox_tokenizer(texts(data) + ["<|user|>\n<|assistant|>\n"])
    config = paper_config()
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    with torch.device("cuda"):
        model = VLMambaForConditionalGeneration(config).to(torch.bfloat16)
    processor = VLMambaProcessor(image_processor_for(config), tokenizer, image_seq_length=config.image_seq_length)
    folder = save_folder(model.cpu(), work / "model", processor)
    del model
    argv = ["--stage", "2", "--model", str(folder), "--data", str(data / "conversations.json")]
    argv += ["--output-dir", str(work / "run"), "--max-steps", str(args.steps), "--bf16", "--num-workers", "4"]
    argv += ["--per-device-batch-size", str(args.batch_size), "--global-batch-size", str(args.batch_size)]
    argv += ["--logging-steps", "1", "--save-steps", "100000"]
    argv += ["--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
    trainer = build_trainer(build_parser().parse_args(argv))
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in trainer.model.parameters() if not p.requires_grad)
    torch.cuda.reset_peak_memory_stats()
    step_times, tokens = [], []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if args.profile and len(step_times) == args.steps - 1:  # the last step, long after the warm-up
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.profiler.__enter__()
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.start
            if getattr(self, "profiler", None) is None:
                step_times.append(elapsed)
            else:  # the profiled step is slower: report it, keep it out of the timing
                self.profiler.__exit__(None, None, None)
                print("training step:", profile_report(self.profiler, elapsed, rows=20), sep="\n")
                self.profiler = None

    trainer.add_callback(Clock())
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "num_tokens" in entry]
    tokens = [b["num_tokens"] - a["num_tokens"] for a, b in zip(history, history[1:], strict=False)]
    steady = step_times[2:]  # the first steps compile kernels
    tokens_per_step = statistics.median(tokens) if tokens else float("nan")
    tokens_per_s = tokens_per_step / statistics.median(steady)
    flops = (6 * trained + 2 * frozen) * tokens_per_s
    results = {
        "trained_params": trained,
        "frozen_params": frozen,
        "tokens_per_step": tokens_per_step,
        "median_step_s": statistics.median(steady),
        "tokens_per_s": tokens_per_s,
        "mfu": flops / H100_BF16_FLOPS,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }
    print(f"VL-Mamba stage-2 step: {results}", flush=True)
    if args.anchors:
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        anchors = training_anchors(
            args.batch_size, round(tokens_per_step / args.batch_size), args.gradient_checkpointing, args.profile
        )
        results |= anchors | {"ratio_to_anchor": results["median_step_s"] / anchors["anchor_step_s"]}
    return results


@contextlib.contextmanager
def without_fused_kernels():
    """An ablation: transformers' own Mamba forward for the multi-token path (`fused_mamba`), for the duration."""
    from modeling_vlmamba import fused_mamba

    fused_mamba.uses_fused_kernels, original = (lambda hidden_states: False), fused_mamba.uses_fused_kernels
    try:
        yield
    finally:
        fused_mamba.uses_fused_kernels = original


def native_ttft(native, ids: torch.Tensor) -> float:
    """mamba_ssm's time to first token for `ids`: its `generate(cg=True)` of one token (the graph captured before)."""
    native.generate(ids, max_length=ids.shape[1] + 1, cg=True, top_k=1)
    return timed(lambda: native.generate(ids, max_length=ids.shape[1] + 1, cg=True, top_k=1), repeats=5)[0]


def prefill(args: argparse.Namespace) -> dict:
    """Time to first token against the vision tower + connector and mamba_ssm's prefill of the same tokens."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VLMambaForConditionalGeneration(paper_config()).to(torch.bfloat16).eval()
    native = mamba_ssm_model(model)
    results = {}
    for batch in args.batch_sizes:
        inputs = prompt(batch, generator)
        run = vlmamba_runner(model, inputs)
        run(1)
        ours, _ = timed(lambda run=run: run(1), repeats=5)
        with without_fused_kernels():
            stock, _ = timed(lambda run=run: run(1), repeats=5)
        with torch.no_grad():
            vision, _ = timed(lambda inputs=inputs: model.model.get_image_features(inputs["pixel_values"]), repeats=5)
        ids = inputs["input_ids"].clamp(max=VOCAB - 4)
        mamba_ssm_s = native_ttft(native, ids)
        bound = vision + mamba_ssm_s
        results[batch] = {
            "ttft_s": ours,
            "ttft_without_fused_kernels_s": stock,
            "vision_and_connector_s": vision,
            "mamba_ssm_ttft_s": mamba_ssm_s,
            "ratio_to_vision_plus_mamba_ssm": ours / bound,
            "ratio_without_fused_kernels": stock / bound,
        }
        print(f"prefill batch {batch}: {results[batch]}", flush=True)
        if args.profile and batch == args.batch_sizes[-1]:
            print(f"VL-Mamba time to first token, batch {batch}:", profile_table(lambda run=run: run(1)), sep="\n")
            native_prefill = functools.partial(native.generate, ids, max_length=ids.shape[1] + 1, cg=True, top_k=1)
            print(f"mamba_ssm time to first token, batch {batch}:", profile_table(native_prefill), sep="\n")
    return results


def median_step_s(step, steps: int = 6, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    return timed(step, repeats=steps)[0]


def mamba_ssm_step_s(batch: int, seq_len: int, checkpointing: bool, profile: bool = False) -> float:
    """Median training step of mamba_ssm's `MambaLMHeadModel` at the 2.8B shape: fp32 weights, bf16 autocast, fused
    AdamW, cross-entropy on fp32 logits; each block checkpointed with `checkpointing`."""
    from mamba_ssm.models.config_mamba import MambaConfig as RawConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    text = paper_config().text_config
    raw = RawConfig(d_model=text.hidden_size, n_layer=text.num_hidden_layers, vocab_size=VOCAB, ssm_cfg={})
    native = MambaLMHeadModel(raw, device="cuda", dtype=torch.float32)
    if checkpointing:

        class Checkpointed(torch.nn.Module):
            def __init__(self, block):
                super().__init__()
                self.block = block

            def forward(self, hidden_states, residual=None, inference_params=None, **kwargs):
                return checkpoint(self.block, hidden_states, residual, use_reentrant=False)

        native.backbone.layers = torch.nn.ModuleList(Checkpointed(block) for block in native.backbone.layers)
    optimizer = torch.optim.AdamW(native.parameters(), lr=1e-6, fused=True)
    ids = torch.randint(2, VOCAB - 4, (batch, seq_len), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = native(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    median = median_step_s(step)
    if profile:
        print("mamba_ssm training step:", profile_table(step, rows=20), sep="\n")
    return median


def training_anchors(batch: int, seq_len: int, checkpointing: bool, profile: bool = False) -> dict:
    """What the stage-2 step is held to, each part alone at the same shapes: mamba_ssm's own training step of the
    LLM (`mamba_ssm_step_s`), the frozen vision tower's forward, and the connector's forward and backward."""
    results = {"mamba_ssm_step_s": mamba_ssm_step_s(batch, seq_len, checkpointing, profile)}
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VLMambaForConditionalGeneration(paper_config())
    vision, connector = model.model.vision_tower.requires_grad_(False), model.model.multi_modal_projector
    pixels = torch.randn(batch, 3, 384, 384, device="cuda")

    def vision_forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return vision(pixels, output_hidden_states=[-2]).hidden_states[-2]

    features = vision_forward().float()

    def connector_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            connector(features).float().sum().backward()

    results["vision_forward_s"] = median_step_s(vision_forward)
    results["connector_forward_backward_s"] = median_step_s(connector_step)
    results["anchor_step_s"] = sum(results.values())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["decode", "prefill", "train"])
    parser.add_argument(
        "--llm", choices=sorted(LLM_SHAPES), default="mamba", help="decode: the language model's shape"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--skip-transformer", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--anchors", action=argparse.BooleanOptionalAction, default=True, help="train: measure the anchor step too"
    )
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--profile", action="store_true", help="print where the GPU time goes (torch.profiler)")
    args = parser.parse_args()
    results = {"decode": decode, "prefill": prefill, "train": train}[args.mode](args)
    results["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(results, indent=2, default=str))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
