"""torch.compile for Coconut: a compiled decoder pass, compiled transformer blocks, and a
captured decoding step.

The `compile: True` config key compiles in place (modules, parameter names and the
state dict stay as they are), in one of two ways (startup.py picks):

`compile_decoder(model)`, when the model runs whole (one process, or a replica per
process for only_eval) without activation checkpointing: the decoder stack (the base
model without its LM head) is one graph per pass shape, its KV cache update included,
so a latent pass over one column is one call of compiled code instead of some 100
small operations per layer.
Shapes are dynamic, and training at any stage makes three graphs: the first pass, on
an empty cache (a batch without latents runs with a cache too, to share it), every
one-column pass whatever the cache length, and the longer passes after a latent
(the cache keeps its tensors contiguous, ContiguousCache, so the strides that graphs
guard on stay the same); no-grad decoding makes its own. No graph break. On CUDA it
makes four, about a minute each on an H100 host (torch 2.11): the one-column passes'
attention mask is padded for the attention kernel or not by whether the cache length
plus one is a multiple of 8 (a guard, so two graphs). It made five before inductor's
mix-order reductions were switched off (_no_mix_order_reductions).

`compile_blocks(model)`, under FSDP2 or with activation checkpointing, compiles each
transformer block of the base model, as torchtitan does (regional compilation): FSDP2
can shard the blocks afterwards, its hooks stay outside the graphs, and one compiled
block's code serves every layer. The latent passes call the blocks with varying shapes
(the first piece, one column per latent, the rest), so:

- shapes are dynamic (`dynamic=True`): one graph for one-column passes, one for longer
  ones, with and without a cache, in training and in no-grad decoding;
- the KV cache's `update` (a Python list of per-layer tensors) runs outside the graphs
  (`torch.compiler.disable` on `CompileFriendlyCache.update`), and integer module
  attributes such as `layer_idx` are not specialised, so layers share graphs instead
  of compiling one per layer.

- a pass over one column (a latent, a decoded token) runs the blocks eagerly
  (`Coconut._pass_mode`): it is dispatch-bound, and a compiled block's guards and
  runtime wrappers cost more than the kernels they save (measured on a CPU proxy and
  an H100: latent steps twice as slow compiled). Compiled: the batch without latents
  (one pass, no cache: one graph per block), the first piece and the rest.

The bound: at most RECOMPILE_LIMIT graphs per compiled code object (block forward,
attention forward, and the pieces around the cache update), however many layers;
measured on GPT-2: 7 to 11 graphs in all for training steps at stages 0 and 6. Past
that, dynamo runs the block eagerly (correct, slower) and says so in a warning.

`captured_decoder(coconut, shape, max_new_tokens)` (CUDA only, used by
`Coconut.generate`): the prompt's passes fill a preallocated KV cache
(transformers' StaticCache); each one-column pass (every latent, then every new token)
is one call of a step compiled with mode="reduce-overhead" (a CUDA graph replay), with
fixed shapes (the prompt's longer pieces run eagerly): the cache length is
rounded up to a multiple of CACHE_BUCKET, and a sub-batch of local-attention models'
gapless decoding to a power of two rows (bucket_rows, repeating the last prompt), so a
few graphs serve every batch.
Any failure disables it for that model and generation falls back to the eager loop.
"""

import contextlib

import torch
from transformers import DynamicCache

from coconut import context_length, decoder_of, standalone
from distributed import transformer_blocks

RECOMPILE_LIMIT = 32
CACHE_BUCKET = 256  # static cache lengths are rounded up to a multiple of this (few shapes, few graphs)


class CompileFriendlyCache(DynamicCache):
    """A DynamicCache whose update runs eagerly, outside compiled graphs.

    Traced, the update would index the cache's layer list with the block's layer_idx
    and guard on it: one recompilation per layer.
    """

    @torch.compiler.disable
    def update(self, *args, **kwargs):
        return super().update(*args, **kwargs)


class ContiguousCache(DynamicCache):
    """A DynamicCache that keeps its keys and values contiguous, for the compiled decoder.

    Inductor may drop the first pass's torch.cat onto an empty cache and keep the keys
    as the attention's (batch, heads, seq, dim) view of a (batch, seq, heads, dim)
    projection, while every later pass's torch.cat makes them contiguous: graphs guard on
    those strides, so the first latent pass would compile a graph and the next another
    (seen with inductor on a CPU and on an H100)."""

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(key_states.contiguous(), value_states.contiguous(), *args, **kwargs)


def _raise_recompile_limit() -> None:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def _no_mix_order_reductions() -> None:
    """Inductor's mix-order reductions off, for the whole process (an inductor setting).

    On GPUs (torch 2.11 here) inductor fuses a layer norm backward's two reductions when
    a pass is large enough, and guards on that size (batch x length x width against
    5 Mi): a short first piece and a long one then compiled a graph each, about a minute
    apiece on an H100 host. Off, as in PyTorch's own internal builds, that guard and its
    graph are gone. Whether the unfused reductions cost the large passes time is not
    measured."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False


def compile_decoder(model, **compile_kwargs) -> None:
    """Compile the decoder stack of `model` (a Coconut or a Hugging Face causal LM) in
    place, one graph per pass shape (see the module's docstring). Not for FSDP2-sharded
    models (use compile_blocks). compile_kwargs go to torch.compile (default dynamic=True;
    tests pass backend=...)."""
    base = getattr(model, "base_causallm", model)
    _raise_recompile_limit()
    _no_mix_order_reductions()
    # one graph holds every layer, so layer indices stay constants (dynamo's default);
    # compile_blocks unspecialises them, which made compiling the decoder 3.7x slower
    torch._dynamo.config.allow_unspec_int_on_nn_module = False
    decoder_of(base).compile(**{"dynamic": True, **compile_kwargs})
    base.coconut_compiled = "decoder"
    if hasattr(model, "compiled_decoder"):  # a Coconut
        match_compiled_base(model)


def compile_blocks(model, **compile_kwargs) -> int:
    """Compile every transformer block of `model` (a Coconut or a Hugging Face causal LM)
    in place; returns how many. Call it before sharding. compile_kwargs go to
    torch.compile (default dynamic=True; tests pass backend=...)."""
    base = getattr(model, "base_causallm", model)
    torch._dynamo.config.allow_unspec_int_on_nn_module = True  # layer_idx: no recompile per layer
    _raise_recompile_limit()
    _no_mix_order_reductions()
    blocks = transformer_blocks(base)
    for block in blocks:
        block.compile(**{"dynamic": True, **compile_kwargs})
    base.coconut_compiled = "blocks"
    if hasattr(model, "cache_class"):  # a Coconut
        match_compiled_base(model)
    return len(blocks)


def match_compiled_base(coconut) -> None:
    """Give a Coconut the cache and pass settings its base model's compilation needs (a
    traced cache update for a compiled decoder, one kept outside compiled blocks): also
    for a Coconut built around an already compiled base, as evaluate.generator_for's plain
    decoder for the methods without latents."""
    how = getattr(coconut.base_causallm, "coconut_compiled", None)
    if how == "decoder":
        coconut.compiled_decoder = True
        coconut.cache_class = ContiguousCache
    elif how == "blocks":
        coconut.cache_class = CompileFriendlyCache
        coconut.compiled_blocks = True


# ----------------------------------------------------------------------------- decoding
class CapturedDecoder:
    """Greedy decoding with a preallocated KV cache and one compiled step per token.

    capture=True (CUDA): the step is compiled with mode="reduce-overhead", i.e. replayed
    as a CUDA graph. capture=False runs the same step eagerly (how the tests check the
    static-cache path on a CPU).
    """

    def __init__(self, coconut, capture: bool = True):
        _raise_recompile_limit()  # one graph per (batch, cache bucket): evaluation meets a few
        self.coconut = coconut
        self.capture = capture
        self.enabled = True
        self.error = None
        self.path = "cuda-graph" if capture else "static-cache"
        self.step = torch.compile(self._step, mode="reduce-overhead", dynamic=False) if capture else self._step
        self._caches = {}  # (batch, capacity, dtype) -> StaticCache, reused: graphs keep its addresses

    def _step(self, embeds, mask, positions, cache):
        """One column through the model: embeds (batch, 1, hidden) at positions (batch, 1),
        mask (batch, capacity). Returns its last hidden state (batch, 1, hidden) (a latent's
        value) and the greedy next token (batch,)."""
        coconut = self.coconut
        hidden = coconut._decoder_pass(embeds, mask, positions, cache)
        return hidden, coconut.lm_head(hidden[:, -1]).argmax(-1)

    def _call_step(self, embeds, mask, positions, cache):
        # standalone inputs: a column sliced out of the prompt's (batch, width) positions has
        # strides that depend on the width, and a graph compiled with dynamic=False guards on
        # strides, so every prompt width would compile (and capture) a graph of its own
        embeds, positions = standalone(embeds), standalone(positions)
        _mark_static(cache)
        if self.capture:  # the graph's outputs are overwritten by its next replay: copy them
            torch.compiler.cudagraph_mark_step_begin()
        hidden, token = self.step(embeds, mask, positions, cache)
        return hidden.clone(), token.clone()

    def disable(self, error) -> None:
        import warnings

        self.enabled = False
        self.error = f"{type(error).__name__}: {error}"
        self._caches.clear()
        warnings.warn(f"captured decoding failed, decoding eagerly from now on ({self.error})", stacklevel=3)

    def _cache(self, batch: int, capacity: int, dtype):
        from transformers import StaticCache

        key = (batch, capacity, dtype)
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = StaticCache(config=self.coconut.base_causallm.config, max_cache_len=capacity)
        else:
            cache.reset()
        return cache

    def run(self, input_ids, prompt_mask, position_ids, max_new_tokens: int, rows_up_to=None):
        """(generated (batch, max_new_tokens), n_kept (batch,)), as Coconut._decode_eager.
        rows_up_to: run the batch as bucket_rows' size, at most this many rows (a sub-batch
        of a batch of that size); None: as it comes."""
        from coconut import DecodeState

        coconut, eos = self.coconut, self.coconut.eos_token_id
        rows = input_ids.shape[0]
        if rows_up_to is not None:
            padded = max(rows, min(bucket_rows(rows), rows_up_to))
            input_ids, prompt_mask, position_ids = (_pad_rows(t, padded) for t in (input_ids, prompt_mask, position_ids))
        batch, width = input_ids.shape
        capacity = -(-(width + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
        dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled() else None
        cache = self._cache(batch, capacity, dtype)
        mask = prompt_mask.new_zeros(batch, capacity)  # (batch, capacity): the cache's columns in use
        mask[:, :width] = prompt_mask

        def latent_pass(embeds, prefix_mask, positions, cache):  # the prompt's one-column passes
            return self._call_step(embeds, mask, positions, cache)[0]

        next_token, cache = coconut._prefill(input_ids, prompt_mask, position_ids, False, cache, latent_pass)
        lengths = prompt_mask.sum(1)  # (batch,)
        state = DecodeState(input_ids.new_full((batch, max_new_tokens), eos), torch.zeros_like(lengths),
                            torch.zeros(batch, dtype=torch.bool, device=input_ids.device))
        all_done = LaggedFlag(input_ids.device)
        for step in range(max_new_tokens):
            token = state.record(step, next_token, max_new_tokens, eos)
            # every row done one step ago: that step's token, and this one, were EOS everywhere
            if step == max_new_tokens - 1 or all_done.read():
                break
            all_done.write(state.done.all())
            mask[:, width + step] = 1
            _, next_token = self._call_step(coconut.embedding(token[:, None]), mask, (lengths + step)[:, None], cache)
        return state.generated[:rows], state.n_kept[:rows]


def bucket_rows(rows: int) -> int:
    """The batch a captured step runs for a sub-batch of `rows` prompts: the next power of
    two. One graph is compiled and captured per batch size (a quarter of a minute or more
    each on a GPU host), and the gapless sub-batches of local-attention models
    (Coconut._generate_gapless) vary in size from batch to batch: they then share a few
    graphs instead of compiling up to the recompile limit. Whole batches run as they come
    (a batch size chosen to fill the GPU stays that size)."""
    return 1 << (rows - 1).bit_length()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (batch, ...) with its last row repeated up to `rows`: the copies decode as that row
    does, finish with it, and are dropped."""
    extra = rows - t.shape[0]
    return t if extra == 0 else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])


class LaggedFlag:
    """A device-side bool read one step late, without draining the GPU's queue.

    Decoding stops when every row is done, and reading that (bool(done.all())) waits
    for the GPU to finish the step just launched, so the host prepares each token's
    step while the GPU idles. Read one step late instead, the host runs a step ahead:
    on CUDA the flag goes to pinned host memory behind an event, and reading it waits
    for that copy only. The price is one step past the end, whose token is EOS in
    every row (DecodeState records EOS for done rows) and is kept nowhere.
    """

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        # the device's own context and stream, not the current device's (generate.py --device cuda:1)
        with torch.cuda.device(device) if self.cuda else contextlib.nullcontext():
            self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)  # the last flag written
        self.event = torch.cuda.Event() if self.cuda else None
        self.written = False

    def write(self, flag: torch.Tensor) -> None:
        self.host.copy_(flag, non_blocking=self.cuda)  # on the current stream of the flag's device
        if self.cuda:
            self.event.record(torch.cuda.current_stream(self.device))
        self.written = True

    def read(self) -> bool:
        """The flag last written (False before any): waits for its copy, not for later work."""
        if not self.written:
            return False
        if self.cuda:
            self.event.synchronize()
        return bool(self.host)


def _mark_static(cache) -> None:
    """Mark the cache's tensors as static addresses, once: the captured step writes into
    them, and inductor replays a step that writes into an input as a CUDA graph only when
    that input's address is marked static. A StaticCache marks its tensors itself when
    it allocates them eagerly, but not when it allocates them inside a compiled region,
    as the prompt's first pass does when the decoder or its blocks are compiled
    (`compile: True`): the steps then ran without CUDA graphs, silently."""
    if getattr(cache, "coconut_marked_static", False):
        return
    layers = cache.layers
    for layer in layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                torch._dynamo.mark_static_address(value)
    # a layer the prompt's passes have not filled yet has no tensors to mark: look again next step
    cache.coconut_marked_static = all(getattr(layer, "is_initialized", True) for layer in layers)


def captured_decoder(coconut, shape, max_new_tokens: int):
    """The model's CapturedDecoder when this batch can use it, else None (decode eagerly).

    Needs `coconut.cuda_graphs` (default True), a model whose positions reach the
    padded length, and no earlier failure.
    """
    decoder = getattr(coconut, "_captured_decoder", None)
    if decoder is None:
        decoder = coconut._captured_decoder = CapturedDecoder(coconut, capture=True)
    if not decoder.enabled or not getattr(coconut, "cuda_graphs", True):
        return None
    limit = context_length(coconut.base_causallm.config)
    capacity = -(-(shape[1] + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    if limit is not None and capacity > limit:
        return None
    return decoder
