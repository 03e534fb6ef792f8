"""Run megatron-core 0.19.2 on CPU with gloo: one explicit, reversible set of patches.

``enable()`` acts only when ``torch.cuda.is_available()`` is False (on a GPU machine it is a no-op)
and covers these CUDA assumptions (paths under megatron/core/, line numbers of 0.19.2):

1. CUDA RNG. tensor_parallel/random.py: ``CudaRNGStatesTracker.add`` (:285, calls at :303-306)
   and ``model_parallel_cuda_manual_seed`` (:490) call ``torch.cuda.get_rng_state`` /
   ``manual_seed``; ``fork`` (:311), ``_fork_rng`` (:545) and ``CheckpointFunction`` use
   ``_get_cuda_rng_state`` (:104) / ``_set_cuda_rng_state`` (:135); rerun_state_machine.py:979,992
   uses ``torch.cuda.get/set_rng_state``. All map onto the CPU default generator, the one CPU
   dropout draws from. As "CUDA" and CPU RNG are then one generator, ``fork`` would log "CPU RNG
   state changed within GPU RNG context" (:333) on every use: a logging filter drops that message.
2. Devices. ``device="cuda"`` (pipeline_parallel/schedules.py:749,1121,2292, optimizer/
   clip_grads.py:96-231, optimizer/optimizer.py:315,690-702,1249, distributed/
   param_and_grad_buffer.py:1145, tensor_parallel/data.py:37, the causal mask of
   transformer/utils.py:39), ``device=torch.cuda.
   current_device()`` (tensor_parallel/layers.py, mappings.py, utils.py, pipeline_parallel/
   p2p_communication.py:211-342, param_and_grad_buffer.py:1162-1186, optimizer/
   distrib_optimizer.py:998,1362) and ``.cuda()`` (tensor_parallel/data.py:84,
   distrib_optimizer.py:1374, optimizer.py:586-591). ``torch.cuda.current_device()`` returns the CPU device,
   and a ``TorchFunctionMode`` rewrites ``device=`` "cuda", "cuda:N", torch.device("cuda"[, N])
   or an int to "cpu", makes ``Tensor.cuda()`` return the tensor itself and
   ``Tensor.to(<cuda device>, ...)`` a CPU ``to``; ``.to(dtype)``, ``.to(tensor)`` and CPU devices
   pass through. Torch function modes are per thread: the mode covers the thread that called
   ``enable()`` (and CPU autograd, which runs there), not threads megatron starts itself.
3. Streams and sync. ``torch.cuda.current_stream`` / ``stream`` / ``Stream`` (distributed/
   param_and_grad_buffer.py:632,686-691,814, distributed_data_parallel.py:297), ``Event``
   (pipeline_parallel/fine_grained_activation_offload.py:357) and ``synchronize``
   (p2p_communication.py:263,419, distributed_data_parallel.py:649,672, parallel_state.py:216)
   become no-op stand-ins.
4. Type strings. ``Tensor.type()`` is compared with "torch.cuda.FloatTensor" / "HalfTensor" /
   "BFloat16Tensor" in optimizer/clip_grads.py:174 (``clip_grad_by_total_norm_fp32``),
   distrib_optimizer.py:401,466 (``_build_model_and_main_param_groups``, called only from
   ``DistributedOptimizer.__init__``) and :758 (``__init__``), optimizer.py:1009,1028
   (``Float16OptimizerWithFloat16Params.__init__``). Only while one of those functions runs does
   a no-argument ``.type()`` of a CPU tensor read "torch.cuda.<X>Tensor"; elsewhere it is untouched.

5. Activation recompute. ``CheckpointFunction.backward`` (tensor_parallel/random.py) re-runs the
   forward inside ``torch.autograd.backward``, where the device mode of item 2 is off (a mode is off
   inside its own handler), so e.g. the causal mask of transformer/utils.py:39 would ask for CUDA: the
   recompute runs with the mode pushed again.

``disable()`` restores every original and pops the mode. Scripts that use dist_checkpointing need
an ``if __name__ == "__main__":`` guard (it starts a spawn-context multiprocessing Manager).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

__all__ = ["enable", "disable", "is_enabled", "init_distributed"]

_MISSING = object()
_patches: list[tuple[object, str, object]] = []  # (owner, attribute, original), in patch order
_mode: _CpuDeviceMode | None = None
_type_scope = threading.local()
_RNG_LOGGER = "megatron.core.tensor_parallel.random"


def _is_cuda(device) -> bool:
    """'cuda', 'cuda:N', torch.device('cuda'[, N]) or a bare int (a CUDA ordinal)."""
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Sends every CUDA device request to the CPU (see the module docstring, item 2 and 4)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        out = func(*args, **kwargs)
        if (
            func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and getattr(_type_scope, "depth", 0)
            and not out.startswith("torch.cuda.")
        ):
            out = "torch.cuda." + out[len("torch.") :]
        return out


class _NoOpStream:
    """Stand-in for torch.cuda.Stream and torch.cuda.Event: CPU ops run in order on one thread."""

    def __init__(self, *args, **kwargs):
        pass

    def _nothing(self, *args, **kwargs):
        return None

    wait_stream = wait_event = synchronize = record = wait = _nothing

    def query(self):
        return True

    def record_event(self, event=None):
        return event if event is not None else _NoOpStream()


def _cuda_type_scope(fn):
    """Wrap fn so that, while it runs, Tensor.type() of CPU tensors reads 'torch.cuda.X'."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _type_scope.depth = getattr(_type_scope, "depth", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _type_scope.depth -= 1

    return wrapper


@contextlib.contextmanager
def _device_mode_on():
    """The device mode on the stack for a block that runs where it is off (inside autograd's backward)."""
    if _mode is None or _mode in _get_current_function_mode_stack():
        yield
        return
    _mode.__enter__()
    try:
        yield
    finally:
        _mode.__exit__(None, None, None)


def _set(owner, name, value) -> None:
    _patches.append(
        (owner, name, owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING))
    )
    setattr(owner, name, value)


def _rng_filter(record: logging.LogRecord) -> bool:
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable(force: bool = False) -> None:
    """Install every patch for this process (idempotent; a no-op when CUDA is available, unless `force`:
    a tool that runs a model on the CPU of a GPU node)."""
    if _mode is not None or (torch.cuda.is_available() and not force):
        return
    try:
        _install()
    except BaseException:
        disable()  # leave nothing half-installed
        raise


def _install() -> None:
    global _mode
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as mp_random

    def get_rng_state(device="cuda", *args, **kwargs):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda", *args, **kwargs):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        torch.default_generator.manual_seed(int(seed))

    # 1. RNG: torch.cuda and torch.cuda.random are separate names for the same functions.
    for owner in (torch.cuda, torch.cuda.random):
        _set(owner, "get_rng_state", get_rng_state)
        _set(owner, "set_rng_state", set_rng_state)
        _set(owner, "manual_seed", manual_seed)
    _set(mp_random, "_get_cuda_rng_state", get_rng_state)
    _set(mp_random, "_set_cuda_rng_state", set_rng_state)
    logging.getLogger(_RNG_LOGGER).addFilter(_rng_filter)
    # 2. device queries; 3. streams, events, synchronisation.
    # a CPU device, not 0: backward functions (e.g. mappings._reduce_scatter_along_first_dim) allocate with
    # device=torch.cuda.current_device() while the mode is popped (a mode is off inside its own handler,
    # and torch.autograd.backward goes through it), so the value must already be a CPU device
    _set(torch.cuda, "current_device", lambda: torch.device("cpu"))
    _set(torch.cuda, "current_stream", lambda device=None: _NoOpStream())
    _set(torch.cuda, "Stream", _NoOpStream)
    _set(torch.cuda, "Event", _NoOpStream)
    _set(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())
    _set(torch.cuda, "synchronize", lambda device=None: None)
    # 5. activation recompute: the re-run forward sees the device mode again.
    checkpoint_backward = mp_random.CheckpointFunction.backward

    def recompute_backward(ctx, *args):
        with _device_mode_on():
            return checkpoint_backward(ctx, *args)

    _set(mp_random.CheckpointFunction, "backward", staticmethod(recompute_backward))
    # 4. cuda type-string checks, scoped to the functions that make them.
    clip = clip_grads.clip_grad_by_total_norm_fp32
    wrapped_clip = _cuda_type_scope(clip)
    for name in (
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.optimizer",
        "megatron.core.models.mimo.optimizer",
    ):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "clip_grad_by_total_norm_fp32", None) is clip:
            _set(module, "clip_grad_by_total_norm_fp32", wrapped_clip)
    for cls in (distrib_optimizer.DistributedOptimizer, optimizer.Float16OptimizerWithFloat16Params):
        _set(cls, "__init__", _cuda_type_scope(cls.__init__))
    # 2. the device mode goes last, so a failure above leaves no mode behind.
    _mode = _CpuDeviceMode()
    _mode.__enter__()


def disable() -> None:
    """Undo enable(): restore every patched attribute and pop the device mode."""
    global _mode
    if _mode is not None:
        stack = _get_current_function_mode_stack()
        if not stack or stack[-1] is not _mode:
            raise RuntimeError("megatron_cpu: a TorchFunctionMode entered after enable() is active")
        _mode.__exit__(None, None, None)
        _mode = None
    logging.getLogger(_RNG_LOGGER).removeFilter(_rng_filter)
    while _patches:
        owner, name, original = _patches.pop()
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def is_enabled() -> bool:
    return _mode is not None


def init_distributed(rank: int, world_size: int, init_method: str, **kwargs) -> None:
    """init_process_group("gloo", ...) (kwargs go to it, e.g. timeout), then enable()."""
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, **kwargs)
    enable()
