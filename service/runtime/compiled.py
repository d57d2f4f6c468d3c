"""The decode step compiled by `torch.compile` (inductor's CPU backend), for fixed batch sizes.

A batch-1 decode step of the embedded model runs ~1,800 small operators (norms, RoPE, KV writes,
residuals, SwiGLU) around 121 matrix products; in eager mode each costs a dispatch from Python,
and on two cores that was about as much time as the products themselves. Compiled, the model's
whole step (every layer, the paged KV writes, the attention over gathered slots, the LM head) is
one graph: the elementwise work fused into generated C++ loops, the products still the kernels
chosen by measurement (service/runtime/kernels.py). Attention, one query per row, is either
SDPA over a gathered copy of each row's slots (masked to the longest row) or
`torch.ops.nemotron.decode_attention` (service/runtime/native: it reads the slots where they
lie, each row only as far as its own length): per size, whichever timed faster here, just
before that size's graph is made (`choose_attention`).

As vLLM does for CUDA graphs, the graph is made for a fixed set of batch sizes (SIZES); a
decode-only step of B sequences runs the smallest listed size >= B once that size is ready, the
extra rows padded: they write and read only the store's scratch slot, and their logits are
dropped. The context length
is a dynamic dimension, so a growing context compiles nothing new. Prefill and mixed steps stay
eager (their shapes vary with every prompt).

Compiling takes tens of seconds per size on two cores, so it runs on a background thread once
the engine is ready: steps run eagerly until their size's graph is ready (compiled, and timed
faster than the same step run eagerly), then compiled. Inductor
keeps what it compiled in `$NEMOTRON_CACHE_DIR/inductor` (TORCHINDUCTOR_CACHE_DIR), so a restart
traces again but compiles nothing. Not compiled: fp32 engines (the exact reference: one kernel
per operation, batch-invariant), tensor parallel, CUDA.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import types
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from engine_build.embedded import default_cache_dir
from engine_build.events import log_event
from engine_build.model import NemotronModel
from service.runtime import native
from service.runtime.kernels import best_seconds
from service.runtime.kv_pages import PagedKVStore
from service.runtime.native import cxx_compiler
from service.runtime.options import COMPILED_DECODE_SIZES

if TYPE_CHECKING:  # importing torch._dynamo takes seconds; serving without compiling skips it
    from torch._dynamo.guards import GuardFilterEntry

SIZES = COMPILED_DECODE_SIZES
MIN_CONTEXT = 2  # the dynamic context dimension starts here (a size-1 dimension specializes)
TIMING_REPEATS = 5
COMPILE_THREAD = "decode-compile"
# The context the timing attends over: attention's share of a step grows with it, and a
# compiled attention that loses at long contexts must show it.
TIMING_CONTEXT = 512
# The generated wrapper checks no sizes, strides, alignments or scalars of what it is given (its
# arguments are ours, checked by their guards; the weights and store are fixed once loaded):
# ~640 checks a step in Python, ~3 ms of a ~25 ms batch-1 step here (docs/benchmarks.md).
INDUCTOR_OPTIONS = {"size_asserts": False, "scalar_asserts": False, "alignment_asserts": False}


def inductor_cache_dir(environ: dict[str, str] | os._Environ[str]) -> Path:
    """Where inductor keeps what it compiled: TORCHINDUCTOR_CACHE_DIR, else the product cache.

    Importing `torch._dynamo` (which loading a model may do) writes torch's own default,
    `/tmp/torchinductor_<user>`, into TORCHINDUCTOR_CACHE_DIR when it is unset; that value is
    not the user's choice, and in a pod /tmp is an emptyDir lost at every restart, so it counts
    as unset here.
    """
    # Imported here: importing torch._inductor imports torch._dynamo (seconds).
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    chosen = environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and Path(chosen) != Path(torch_default()).absolute():
        return Path(chosen)
    return default_cache_dir(environ) / "inductor"


class DecodeAttention:
    """`StepAttention` of a compiled decode step: plain tensors, one new token per row.

    `write_slots` [B] is where each row's new key and value go, `read_slots` [B, L] the slots it
    attends over (its context, then padding), `bias` [B, 1, 1, L] 0 or -inf, `lengths` [B] how
    many of its read slots each row attends over. `native`: attend through
    `torch.ops.nemotron.decode_attention` (reads the slots where they are, `lengths` of each
    row) instead of SDPA over a gathered copy of every row's L slots with the bias.
    """

    def __init__(
        self,
        store: PagedKVStore,
        positions: Tensor,
        write_slots: Tensor,
        read_slots: Tensor,
        bias: Tensor,
        lengths: Tensor,
        native: bool = False,
    ) -> None:
        self.store, self.positions = store, positions
        self.write_slots, self.read_slots, self.bias = write_slots, read_slots, bias
        self.lengths, self.native = lengths, native

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Write the rows' keys and values, then attend over their slots."""
        keys, values = self.store.keys[layer], self.store.values[layer]
        keys.index_copy_(0, self.write_slots, k[0])
        values.index_copy_(0, self.write_slots, v[0])
        if self.native:
            return torch.ops.nemotron.decode_attention(
                q[0].contiguous(), keys, values, self.read_slots, self.lengths, q.shape[-1] ** -0.5
            )[None]
        return gathered_attention(q[0], keys, values, self.read_slots, self.bias)[None]


def gathered_attention(
    q: Tensor, keys: Tensor, values: Tensor, read: Tensor, bias: Tensor
) -> Tensor:
    """SDPA of q [B, heads, hd] over the gathered slots `read` [B, L] of the store, masked by
    `bias` [B, 1, 1, L]: [B, heads, hd]."""
    attended = F.scaled_dot_product_attention(
        q[:, :, None],  # [B, heads, 1, hd]
        keys[read].transpose(1, 2),  # [B, kv, L, hd]
        values[read].transpose(1, 2),
        attn_mask=bias,
        enable_gqa=keys.shape[1] != q.shape[1],
    )
    return attended[:, :, 0]


class DecodeBatch:
    """The padded inputs of one decode-only step for a compiled size."""

    def __init__(
        self,
        size: int,
        rows: Sequence[tuple[int, Tensor]],
        store: PagedKVStore,
        length: int = MIN_CONTEXT,
    ) -> None:
        """`rows`: (token, slots of positions 0..context) per decoding sequence, in order;
        `length`: the least number of slots every row reads (padding reads only the scratch)."""
        scratch = store.scratch_slot
        length = max([MIN_CONTEXT, length, *(len(slots) for _, slots in rows)])
        tokens = [token for token, _ in rows] + [0] * (size - len(rows))
        positions = [len(slots) - 1 for _, slots in rows] + [0] * (size - len(rows))
        read = torch.full((size, length), scratch, dtype=torch.long)
        visible = torch.zeros(size, 1, 1, length, dtype=torch.bool)
        visible[:, 0, 0, 0] = True  # padding rows see the scratch slot only
        for row, (_, slots) in enumerate(rows):
            read[row, : len(slots)] = slots
            visible[row, 0, 0, : len(slots)] = True
        self.tokens = torch.tensor([tokens], dtype=torch.long)
        self.positions = torch.tensor([positions], dtype=torch.long)
        self.write_slots = read[torch.arange(size), self.positions[0]].clone()
        self.write_slots[len(rows) :] = scratch
        self.read_slots = read
        self.bias = torch.zeros(visible.shape, dtype=store.dtype).masked_fill(
            ~visible, float("-inf")
        )
        self.lengths = visible[:, 0, 0].sum(dim=1)
        torch._dynamo.mark_dynamic(self.read_slots, 1)
        torch._dynamo.mark_dynamic(self.bias, 3)

    def inputs(self) -> tuple[Tensor, ...]:
        """The compiled step's arguments."""
        return (
            self.tokens,
            self.positions,
            self.write_slots,
            self.read_slots,
            self.bias,
            self.lengths,
        )


class CompiledDecode:
    """The compiled decode step of one model and store, and the sizes ready to run."""

    def __init__(self, model: NemotronModel, store: PagedKVStore, sizes: Sequence[int] = SIZES):
        self.model, self.store, self.sizes = model, store, tuple(sorted(sizes))
        self.ready: tuple[int, ...] = ()
        self.failed: str | None = None
        # Per size: "native" (torch.ops.nemotron.decode_attention) or "sdpa", timed before its
        # graph is made (service/runtime/native; "sdpa" where the native kernels are absent).
        self.attention: dict[int, str] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._compiled: Callable[..., Tensor] = torch.compile(
            own_code(self._step),
            fullgraph=True,
            options={"guard_filter_fn": argument_guards, **INDUCTOR_OPTIONS},
        )
        # The store's slot count follows the memory budget: dynamic, so that the cached
        # artefacts serve any budget (a static count would key them to this one).
        for tensor in (*store.keys.values(), *store.values.values()):
            torch._dynamo.mark_dynamic(tensor, 0)

    def _step(
        self,
        tokens: Tensor,
        positions: Tensor,
        write: Tensor,
        read: Tensor,
        bias: Tensor,
        lengths: Tensor,
    ) -> Tensor:
        native = self.attention.get(tokens.shape[1]) == "native"
        attention = DecodeAttention(self.store, positions, write, read, bias, lengths, native)
        return self.model.forward_step(tokens, attention)[0].float()  # [size, vocab]

    def size_for(self, batch: int) -> int | None:
        """The size that runs `batch` rows: the smallest configured size that holds them, when
        it is ready (compiled, and timed faster than eager); None: run the step eagerly. A
        larger ready size is not used instead: it was timed against eager at its own size only.
        """
        size = next((size for size in self.sizes if size >= batch), None)
        return size if size in self.ready else None

    def drop(self, size: int, error: BaseException) -> None:
        """Stop using a size whose compiled step failed while serving (eager from now on)."""
        self.ready = tuple(s for s in self.ready if s != size)
        log_event(
            "decode_compiled_failed",
            logging.ERROR,
            batch_size=size,
            error=f"{type(error).__name__}: {error}",
        )

    def stop(self) -> None:
        """Compile no further size (the one compiling now, if any, finishes)."""
        self._stopping = True

    @torch.inference_mode()
    def run(self, size: int, rows: Sequence[tuple[int, Tensor]]) -> Tensor:
        """Logits [len(rows), vocab] (float32) of one decode-only step, padded to `size`."""
        batch = DecodeBatch(size, rows, self.store)
        logits = self._compiled(*batch.inputs())
        return logits[: len(rows)]

    def compile_all(self) -> None:
        """Compile every size, smallest first; each is used as soon as it is ready, if faster.

        Compiled is not faster everywhere (fused elementwise work saves the most at one row, and
        inductor's products can lose to the eager kernels at larger batches), so each size's
        compiled step is timed against the same step run eagerly, and used only when faster.
        """
        for size in self.sizes:
            if self._stopping:
                return
            log_event("decode_compiling", logging.INFO, batch_size=size)
            started = time.perf_counter()
            try:
                self.attention[size] = self.choose_attention(size)
                # Batch sizes stay static: each size is its own graph (with its own kernels).
                with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                    self.run(size, [])  # padding rows only: writes nothing but the scratch slot
                eager_s, compiled_s = self._time(size)
            except Exception as error:  # a backend failure: serve eagerly
                self.failed = f"{type(error).__name__}: {error}"
                log_event("decode_compile_failed", logging.WARNING, size=size, error=self.failed)
                return
            faster = compiled_s < eager_s
            if faster:
                self.ready = (*self.ready, size)
            log_event(
                "decode_compiled",
                logging.INFO,
                batch_size=size,
                seconds=round(time.perf_counter() - started, 2),
                eager_ms=round(eager_s * 1e3, 2),
                compiled_ms=round(compiled_s * 1e3, 2),
                attention=self.attention[size],
                used=faster,
                cache=str(inductor_cache_dir(os.environ)),
            )

    @torch.inference_mode()
    def _time(self, size: int) -> tuple[float, float]:
        """Best seconds of a padding-only step of `size` rows, eager and compiled, in turns."""
        inputs = DecodeBatch(size, [], self.store, TIMING_CONTEXT).inputs()
        best = best_seconds(
            {"eager": partial(self._step, *inputs), "compiled": partial(self._compiled, *inputs)},
            TIMING_REPEATS,
            warmups=0,
        )
        return best["eager"], best["compiled"]

    @torch.inference_mode()
    def choose_attention(self, size: int) -> str:
        """ "native" or "sdpa" for steps of `size` rows: the faster over TIMING_CONTEXT slots
        (distinct ones per row) of the first attention layer, timed in turns."""
        if not native.load() or not self.store.keys:
            return "sdpa"
        keys, values = next(iter(self.store.keys.values())), next(iter(self.store.values.values()))
        slots, _, head_dim = keys.shape
        heads = self.model.graph.num_attention_heads
        q = torch.randn(size, heads, head_dim).to(keys.dtype)
        read = (torch.arange(size * TIMING_CONTEXT) % slots).reshape(size, TIMING_CONTEXT)
        lengths = torch.full((size,), TIMING_CONTEXT, dtype=torch.long)
        bias = torch.zeros(size, 1, 1, TIMING_CONTEXT, dtype=keys.dtype)
        op = torch.ops.nemotron.decode_attention
        best = best_seconds(
            {
                "native": partial(op, q, keys, values, read, lengths, head_dim**-0.5),
                "sdpa": partial(gathered_attention, q, keys, values, read, bias),
            },
            TIMING_REPEATS,
        )
        return min(best, key=best.__getitem__)

    def start(self, threads: int) -> threading.Thread:
        """Compile in the background (a daemon thread with the engine's thread count)."""

        def target() -> None:
            torch.set_num_threads(threads)
            self.compile_all()

        self._thread = threading.Thread(target=target, name=COMPILE_THREAD, daemon=True)
        self._thread.start()
        return self._thread

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background compilation ended; whether it did within `timeout`."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True


def own_code(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`method` (bound) over a copy of its code object: its own cache of compiled graphs.

    Dynamo keeps compiled graphs, and their guards, per code object. `argument_guards` drops the
    guards that told two CompiledDecode objects' graphs apart (their model and store), so each
    object's step gets a code object, and so a cache, of its own.
    """
    function = method.__func__  # type: ignore[attr-defined]
    copy = types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__
    )
    return types.MethodType(copy, method.__self__)  # type: ignore[attr-defined]


def argument_guards(guards: Sequence[GuardFilterEntry]) -> list[bool]:
    """Keep the guards on the step's arguments (their sizes pick each batch size's graph) and
    on global state (grad mode, the shape environment); drop those on the model and the store,
    fixed once loaded, and on module globals.

    So nothing checks, on a call, what was fixed when a size's graph was made: the model's
    modules and kernel choices, the store's tensors, `CompiledDecode.attention`. None of them
    changes after `compile_decode` (kernel choices are installed before it; a size's attention
    is chosen just before its graph); whatever would change them must make a new CompiledDecode.

    The dropped ones were ~5,700 checks (every module's hooks and attributes, every weight's
    metadata) on every call: ~3 ms of a ~20 ms batch-1 step on two AVX2 cores
    (docs/benchmarks.md, issue 13).
    """
    return [not (guard.is_global or _on_self(guard.name)) for guard in guards]


def _on_self(name: str) -> bool:
    return name == "self" or name.startswith(("self.", "self["))


def compiling() -> bool:
    """Whether a background compilation is still running in this process.

    It cannot be interrupted, and an interpreter that exits while it is inside torch aborts
    (`terminate called without an active exception`, exit 134): the server then leaves with
    `os._exit` once it has stopped cleanly (service/cli.py).
    """
    return any(t.name == COMPILE_THREAD and t.is_alive() for t in threading.enumerate())


def compile_decode(
    model: NemotronModel,
    store: PagedKVStore,
    device: torch.device,
    tensor_parallel: int,
    sizes: Sequence[int] = SIZES,
) -> CompiledDecode | None:
    """The decode step to compile (`start` it once the engine is ready), where it can be."""
    reason = can_compile(model, device, tensor_parallel)
    if reason is not None:
        log_event("decode_not_compiled", logging.INFO, reason=reason)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir(os.environ))
    return CompiledDecode(model, store, sizes)


def can_compile(model: NemotronModel, device: torch.device, tensor_parallel: int) -> str | None:
    """Why this model's decode step is not compiled here, or None when it can be."""
    if device.type != "cpu":
        return f"the device is {device.type}: only CPU steps are compiled"
    if tensor_parallel != 1:
        return "tensor parallel engines run eagerly"
    if model.dtype == torch.float32:
        return "fp32 engines are the exact reference and run eagerly"
    if cxx_compiler() is None:
        return "no C++ compiler (g++, c++, clang++ or $CXX) for inductor's CPU kernels"
    return None
