"""The CUDA-graph decode of `VLMambaForConditionalGeneration.generate`: the language model's one-token step
(`decode_step`) captured in a CUDA graph over a state cache of its own (`DecodeGraph`), and the stopping
criterion that replays the next step while `generate` waits to learn whether to stop (`DecodeAhead`)."""

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.stopping_criteria import StoppingCriteria

from .decode_step import ssm_matrices

if TYPE_CHECKING:
    from .modeling_vlmamba import VLMambaForConditionalGeneration

# CUDA graphs kept for decoding (one per batch size); the oldest is dropped beyond this.
MAX_DECODE_GRAPHS = 8


class DecodeGraph:
    """The language model's one-token decode step captured in a CUDA graph, over a state cache of its own.

    A Mamba's decode state has a fixed size and is updated in place, so one capture replays exactly; eager decoding
    is bound by kernel launches instead (16 tokens/s for Mamba-2.8B on an H100). The captured step is
    `decode_step`. `generate` calls `reset` and prefills into `cache`; each decode step then copies the new
    token ids in and replays. The graph is captured at the first decode step and reused by later `generate` calls
    with the same batch size, as long as what the capture baked in stays the same (`key`: where the parameters live,
    and the state of any PEFT adapters).

    Decoding ahead: `generate` waits for the GPU after every token to ask whether to stop, and a step launched only
    after that wait leaves the GPU idle meanwhile. So, once `generate` has chosen a token, `launch_ahead` already
    replays the step of that token on a stream of its own (the token stays on the GPU); the host's wait covers the
    current stream only, and the next `step` takes the logits the replay left. When generation then stops, that
    replay was for nothing and the states have advanced past the returned tokens: decoding ahead is only used where
    the cache is not handed back to the caller, and `generate` ends every call with `join`, which orders later work
    (the next call's `reset`, freeing a dropped graph, the caller's own) after it.

    One graph serves one `generate` call at a time: not thread-safe, and the `cache_params` a call returns is reset
    by the next call of that batch size.
    """

    def __init__(self, model: "VLMambaForConditionalGeneration", batch_size: int, key: tuple):
        self.cache = DynamicCache(config=model.config.text_config)
        self.cache.decode_graph = self
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
        self.key = key  # `model.decode_graph_key()` at creation
        self.ssm_A = ssm_matrices(model.model.language_model)  # refreshed in place by `reset`
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.ahead_stream = torch.cuda.Stream(model.device)
        self.ahead_enabled = False  # set per `generate` call by `reset`
        self.ahead_token: torch.Tensor | None = None  # the `input_ids[:, -1:]` whose step was launched ahead
        self.not_done = torch.zeros(batch_size, dtype=torch.bool, device=model.device)  # `DecodeAhead`'s answer

    @torch.no_grad()
    def reset(self, model: "VLMambaForConditionalGeneration", decode_ahead: bool) -> None:
        """Empty the cache and recompute `A` (the weights may have changed in place since the last call)."""
        self.cache.reset()
        self.ssm_A.copy_(ssm_matrices(model.model.language_model))
        self.ahead_enabled = decode_ahead

    def step(self, model: "VLMambaForConditionalGeneration", input_ids: torch.LongTensor) -> torch.Tensor:
        """Logits `(batch, 1, vocab)` of the next token after `input_ids` `(batch, 1)`; the cache advances."""
        with torch.cuda.device(self.input_ids.device):
            if self.ahead_token is not None:
                ahead, self.ahead_token = self.ahead_token, None
                if not same_tensor(ahead, input_ids):
                    raise RuntimeError(
                        "The decode graph already ran the step of the token generate chose, but was then given other "
                        "input_ids. Decoding ahead expects generate's own loop: pass cuda_graph_decode=False to "
                        "generate when its input_ids are changed between steps."
                    )
                torch.cuda.current_stream().wait_stream(self.ahead_stream)
                return self.logits
            self.input_ids.copy_(input_ids)
            if self.graph is None:
                self._capture(model)
            self.graph.replay()
        return self.logits

    def launch_ahead(self, input_ids: torch.LongTensor) -> None:
        """Replay the step of the newest token, `input_ids[:, -1:]`, now, on `ahead_stream` (see the class)."""
        if not self.ahead_enabled or self.graph is None or self.ahead_token is not None:
            return
        with torch.cuda.device(self.input_ids.device):
            self.input_ids.copy_(input_ids[:, -1:])  # on the current stream, after the ops that chose the token
            self.ahead_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.ahead_stream):
                self.graph.replay()
        self.ahead_token = input_ids[:, -1:]  # holding it keeps its memory from being reused

    def join(self) -> None:
        """Order the current stream's later work after any replay launched ahead (which may still be running)."""
        torch.cuda.current_stream(self.input_ids.device).wait_stream(self.ahead_stream)
        self.ahead_token = None

    def _capture(self, model: "VLMambaForConditionalGeneration") -> None:
        states = [(layer.conv_states[0].clone(), layer.recurrent_states[0].clone()) for layer in self.cache.layers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():  # compiles and autotunes the kernels outside the capture
            for _ in range(2):
                model.decode_logits(self.input_ids, self.cache, self.ssm_A)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = model.decode_logits(self.input_ids, self.cache, self.ssm_A)
        for layer, (conv, recurrent) in zip(self.cache.layers, states, strict=True):  # undo the warm-up steps
            layer.conv_states[0].copy_(conv)
            layer.recurrent_states[0].copy_(recurrent)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` view the same memory the same way, unmodified in place since (a host-side check)."""
    return (a.data_ptr(), a.shape, a.stride(), a._version) == (b.data_ptr(), b.shape, b.stride(), b._version)


class DecodeAhead(StoppingCriteria):
    """Launches `DecodeGraph`'s next step ahead; never stops a sequence itself.

    `generate` calls its stopping criteria right after it has chosen each token and before it waits for the GPU to
    learn whether to stop: the one point of its loop where the next step can be launched early (see `DecodeGraph`).
    No step is launched once `max_length` is reached, where generation stops for certain.
    """

    def __init__(self, graph: DecodeGraph, max_length: int | None):
        self.graph, self.max_length = graph, max_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.max_length is None or input_ids.shape[1] < self.max_length:
            self.graph.launch_ahead(input_ids)
        return self.graph.not_done
