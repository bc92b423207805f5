"""Second module trees over a model's own weights, for sampling the anchors: one without ZeRO-3's hooks
(`hookless_twin`), and one whose Linear weights hold their casts to autocast's precision (`autocast_weights`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")
# What transformers caches on a model for its compiled decode step (`get_compiled_call`): a `torch.compile` of that
# model's own `__call__`, so a twin that kept it would run the model's weights, not its own.
COMPILED_CALL = ("_compiled_call", "_last_compile_config")


def hookless_twin(module: torch.nn.Module, dropped: set[int]) -> torch.nn.Module:
    """A second tree of module objects over the very same parameters and buffers (so no memory, and every change of
    the weights seen at once), whose hook tables leave out the hooks with ids in `dropped`.

    Under ZeRO-3 the anchors are sampled on it while the weights are gathered. DeepSpeed's own answer,
    `unwrap_model_for_generation` (TRL's too), removes ZeRO-3's hooks from the model and registers them anew
    afterwards, and registering them anew throws away ZeRO-3's record of the order in which a training step
    fetches the weights (TRL invalidates it on purpose: generation's forwards would have garbled it); every
    training step after a generation then ran without it. The twin leaves the model and its hooks as they are."""
    twins: dict[int, torch.nn.Module] = {}

    def twin_of(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) not in twins:  # a module shared by two parents is shared by their twins too
            t = twins[id(m)] = m.__class__.__new__(m.__class__)
            t.__dict__.update((k, v) for k, v in m.__dict__.items() if k not in COMPILED_CALL)
            t._parameters, t._buffers = dict(m._parameters), dict(m._buffers)
            for name in HOOK_DICTS:
                setattr(t, name, type(getattr(m, name))((k, v) for k, v in getattr(m, name).items()
                                                        if k not in dropped))
            t._modules = {name: None if child is None else twin_of(child) for name, child in m._modules.items()}
        return twins[id(m)]

    return twin_of(module)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The precision autocast runs matmuls in on this device type at this point, None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cached_by_autocast(p: torch.Tensor | None) -> bool:
    """Whether autocast keeps its cast of `p` for the rest of its block: an fp32 leaf that requires grad (a
    trainable weight; a frozen one, as LoRA's base weights, is cast anew at every call)."""
    return p is not None and p.dtype == torch.float32 and p.requires_grad and p.is_leaf


@contextmanager
def autocast_weights(model: torch.nn.Module, dtype: torch.dtype | None):
    """`model` for a compiled decode step under autocast to `dtype`: a twin whose `nn.Linear` weights and biases
    that autocast would cache hold their casts to `dtype`, copied from `model` on entering; `model` itself where
    `dtype` is None or nothing is cast.

    Eager autocast casts a trainable fp32 weight at its first call and keeps the cast until the autocast block
    ends, so a generation's tokens reuse it. A compiled decode step has no such cache and casts every weight again
    for every token: measured on the CPU, 3.9x the step with the casts held on a 52 M-parameter Llama
    (docs/benchmarks.md). The twin hands the compiled step the casts autocast's cache would hold, so the numbers
    are the same (`tests/test_anchors.py`). Its modules and its casts persist on `model`, refreshed in place at
    every generation, so the compiled step (and a CUDA graph of it) sees the same modules and the same tensors at
    the same addresses every time, and compiles once. Their cost: the casts are kept between generations, half of
    the fp32 Linear weights' memory in bf16."""
    if dtype is None or dtype == torch.float32:
        yield model
        return
    twin, casts = model.__dict__.get("_tidpo_autocast_twin", (None, []))
    if twin is None or casts[0][0].dtype != dtype:
        if not any(cached_by_autocast(p) for m in model.modules() if isinstance(m, torch.nn.Linear)
                   for p in m._parameters.values()):
            yield model
            return
        model.__dict__.pop("_tidpo_autocast_twin", None)  # else the new twin's copy of __dict__ would keep it alive
        twin, casts = hookless_twin(model, set()), []
        for t, m in zip(twin.modules(), model.modules()):
            if isinstance(m, torch.nn.Linear):
                for k, p in m._parameters.items():
                    if cached_by_autocast(p):  # the twin's own storage for the cast: t._parameters is its copy
                        t._parameters[k] = torch.nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=False)
                        casts.append((t._parameters[k], p))
        model.__dict__["_tidpo_autocast_twin"] = twin, casts  # in __dict__, not a submodule: no part of the model
    with torch.no_grad():
        for cast, p in casts:
            cast.copy_(p)  # the cast, into the same storage as last time
    yield twin.train(model.training)
