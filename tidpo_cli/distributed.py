"""Every detail of running on several processes lives here: who this process is (from torchrun, the deepspeed
launcher, or SLURM's srun), the DeepSpeed engine and the config it is given, the reference model under
ZeRO-3, sums over ranks, and the consolidated model at the end.

The loop sees one interface, `Engine`: `module` (what forward passes call), `backward`, `micro_step`, `step`,
`save` / `load` and `full_state_dict`. `PlainEngine` is PyTorch in one process; `DeepSpeedEngine` wraps
`deepspeed.initialize`. DeepSpeed's own settings come from the `deepspeed` config group; everything it must
agree on with the loop (batch, accumulation, clipping, precision, optimizer, schedule) comes from `trainer`.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .errors import UserError
from .tracking import MetricSums
from .twin import hookless_twin

log = logging.getLogger("tidpo")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. One process: rank 0 of 1, and every method is a no-op."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (float64, so counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def sum_metrics(self, sums: MetricSums) -> MetricSums:
        """The metric sums of every rank added up (every rank logs the same names)."""
        if self.world == 1:
            return sums
        names = sorted(sums.sums)
        totals = sorted(sums.totals)
        flat = self.sum([sums.sums[n] for n in names] + [sums.counts[n] for n in names] + [sums.totals[n] for n in totals])
        out = MetricSums()
        for i, n in enumerate(names):
            out.sums[n], out.counts[n] = flat[i], flat[len(names) + i]
        for i, n in enumerate(totals):
            out.totals[n] = flat[2 * len(names) + i]
        return out


def launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for this process: as torchrun or the deepspeed
    launcher set them, or derived from SLURM's variables under `srun` with one task per device."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env or int(env.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return env  # torchrun / deepspeed launcher, or one process (a batch script without srun included)
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return env


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as `gpu[03-05,9],cpu1`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:  # prefix[03-05 ...: the first number, zero padding kept
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def setup(device: torch.device, *, deepspeed_enabled: bool = False) -> Dist:
    """Join the process group when there is more than one process, or DeepSpeed is on (it wants a group even
    for one process, e.g. ZeRO-3 offload on one GPU): nccl on GPUs, gloo on CPUs."""
    env = launch_env()
    world = int(env.get("WORLD_SIZE", "1"))
    if world == 1 and not deepspeed_enabled:
        return Dist(device=device)
    if world == 1:  # a group of one, on a free local port
        env = {**env, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ[name] = env[name]
    local_rank = int(env["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=int(env["RANK"]), world=world, local_rank=local_rank, device=device)


_left = False  # whether close() left a group (the process's entry, cli.entry, reads it)


def left_a_group() -> bool:
    return _left


def close() -> None:
    """Leave the process group, if this process joined one: PyTorch's documented end of a distributed program
    (`destroy_process_group`). Called once, at the command's end (cli.main, on an error's exit too), so a Hydra
    sweep's jobs in one process keep one group. It does not end gloo's threads while DeepSpeed still holds the
    group objects; how the process then ends is cli.entry's."""
    global _left
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        _left = True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_size_from_env() -> int:
    return int(launch_env().get("WORLD_SIZE", "1"))


def deepspeed_config(cfg: DictConfig, world: int, *, optimizer: bool = True) -> dict:
    """DeepSpeed's config, built from `trainer` (batch, accumulation, clipping, precision) and the `deepspeed`
    group's `zero_optimization`, so no value is typed twice. Without `optimizer`: an eval-only engine."""
    t = cfg.trainer
    zero = OmegaConf.to_container(cfg.deepspeed.zero_optimization, resolve=True)
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,   # the loop's own AdamW / RMSprop (trainer.optimizer)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,            # our tracker reports; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if not optimizer:
        config["zero_optimization"] = {"stage": zero.get("stage", 0),
                                       **{k: v for k, v in zero.items() if k.startswith("stage3_")}}
        if cfg.deepspeed.reference_offload:
            config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


class PlainEngine:
    """PyTorch in one process: the optimizer steps here, and a non-finite step is skipped."""

    def __init__(self, model, optimizer, scheduler, max_grad_norm: float | None):
        self.module = model
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def micro_step(self) -> None:
        pass

    def step(self, finite_loss: bool) -> tuple[float, bool]:
        """Clip and step (unless the loss or gradient is not finite); (gradient norm, whether it stepped)."""
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm or float("inf")))
        stepped = finite_loss and math.isfinite(norm)
        if stepped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path) -> None:
        from .checkpoint import save_weights

        save_weights(self.module, directory / "model.safetensors")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        from .checkpoint import load_weights

        load_weights(self.module, directory / "model.safetensors")
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))

    def full_state_dict(self) -> dict | None:
        return None  # the module holds every weight: save it as it is


ENGINE_TAG = "engine"  # DeepSpeed's checkpoint subdirectory inside checkpoints/step-N/


class DeepSpeedEngine:
    """A DeepSpeed engine around the policy, the loop's optimizer and LR schedule.

    Forward passes call the engine (its hooks gather ZeRO-3 weights and prepare the backward); `backward` is
    unscaled because the loop already divides by the items of the whole step; DeepSpeed steps (and clips) at
    the accumulation boundary in `micro_step`, and skips a step whose gradient is not finite.
    """

    def __init__(self, model, optimizer, scheduler, config: dict):
        import deepspeed

        self.module, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config, dist_init_required=False)
        self.scheduler = scheduler
        # LoRA: the frozen base comes back from where it was loaded, not from every checkpoint.
        self.frozen = any(not p.requires_grad for p in model.parameters())
        self.skipped = self.module.skipped_steps  # DeepSpeed's count of steps it skipped (non-finite gradient)

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)

    def micro_step(self) -> None:
        self.module.step()

    def step(self, finite_loss: bool) -> tuple[float, bool]:
        """DeepSpeed stepped in the last `micro_step`; report its gradient norm and whether it skipped."""
        skipped_before, self.skipped = self.skipped, self.module.skipped_steps
        norm = self.module.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, self.skipped == skipped_before and finite_loss and math.isfinite(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path) -> None:
        try:
            self.module.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False,
                                        exclude_frozen_parameters=self.frozen)
        except Exception:
            # A write failed (a full disk) before DeepSpeed's closing barrier, where the other ranks wait: meet them
            # there, so that every rank reaches the collective in which they agree to stop (checkpoint._together).
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                torch.distributed.barrier()
            raise

    def load(self, directory: Path) -> None:
        path, _ = self.module.load_checkpoint(str(directory), tag=ENGINE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=not self.frozen)
        if path is None:
            raise UserError(f"{directory} holds no DeepSpeed checkpoint ({ENGINE_TAG}/): was it written with "
                            "deepspeed=none? Resume with the deepspeed option it was written with")
        self.skipped = self.module.skipped_steps

    def full_state_dict(self) -> dict | None:
        """Every weight, gathered from the ZeRO-3 partitions onto rank 0 (a collective: every rank calls it);
        None below ZeRO-3, where each rank holds the whole model."""
        if self.module.zero_optimization_stage() != 3:
            return None
        return self.module._zero3_consolidated_16bit_state_dict()


def build_engine(policy, optimizer, scheduler, cfg: DictConfig, dist: Dist):
    if not cfg.deepspeed.enabled:
        if dist.world > 1:
            raise UserError(f"{dist.world} processes need DeepSpeed: add deepspeed=zero1, zero2 or zero3 "
                            "(deepspeed=none runs one process)")
        return PlainEngine(policy, optimizer, scheduler, cfg.trainer.max_grad_norm)
    return DeepSpeedEngine(policy, optimizer, scheduler, deepspeed_config(cfg, dist.world))


def shard_reference(reference, cfg: DictConfig, dist: Dist):
    """Under ZeRO-3 the reference becomes an eval-only ZeRO-3 engine (partitioned, no optimizer state; its
    weights optionally in CPU memory); otherwise it stays a replica. Returns what forward passes call."""
    if reference is None or not cfg.deepspeed.enabled:
        return reference
    if cfg.trainer.precision == "bf16" and isinstance(reference, torch.nn.Module):
        reference.to(torch.bfloat16)  # as DeepSpeed keeps the policy's working weights
    if cfg.deepspeed.zero_optimization.get("stage") != 3:
        return reference
    import deepspeed

    engine, *_ = deepspeed.initialize(model=reference, config=deepspeed_config(cfg, dist.world, optimizer=False),
                                      dist_init_required=False)
    engine.module.eval()
    return engine.module


# Of the memory free on the device, the share that the gathered weights and the generation's KV cache may take
# under `loss.anchor.zero3_weights=auto`; the rest is headroom for the sampling's activations and the allocator.
GATHER_SHARE = 0.5


def zero3_engine(model) -> bool:
    """Whether `model` is a DeepSpeed engine whose weights ZeRO-3 partitions."""
    stage = getattr(model, "zero_optimization_stage", None)
    return callable(stage) and stage() == 3


def generation_bytes(model, rows: int, length: int) -> int:
    """What generating `rows` sequences of `length` tokens with the weights gathered adds: the whole model in its
    working dtype (every rank holds it at once) and the KV cache (2 x layers x rows x length x kv heads x head dim)."""
    params = list(model.parameters())
    weights = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
    config = model.module.config if hasattr(model, "module") else model.config
    text = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = 2 * text.num_hidden_layers * rows * length * heads * head_dim * params[0].element_size()
    return weights + cache


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def gather_for_generation(model, setting: str, rows: int, length: int) -> bool:
    """Whether to gather a ZeRO-3 model's weights once for a whole generation (`loss.anchor.zero3_weights`):
    `gathered`, `per_layer` (every forward gathers each layer's weights, as in training), or `auto`: gathered when
    `generation_bytes` fits in GATHER_SHARE of the memory free on every rank (the ranks agree: a gather is a
    collective)."""
    if setting != "auto":
        return setting == "gathered"
    device = next(model.parameters()).device
    fits = generation_bytes(model, rows, length) <= GATHER_SHARE * free_bytes(device)
    if torch.distributed.is_initialized():
        flag = torch.tensor([0.0 if fits else 1.0], device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        fits = flag.item() == 0
    return fits


@contextmanager
def generation_model(model, zero3_weights: str = "auto", rows: int = 1, length: int = 1):
    """(what to call `generate` on, whether the processes must step generation together: HF's `synced_gpus`).

    Outside ZeRO-3 each process holds every weight and samples on its own. Under ZeRO-3 either the weights are
    gathered once for the whole generation (DeepSpeed's `GatheredParameters`) and sampled with `hookless_twin`, so
    each process again samples on its own; or every forward gathers each layer from every rank, and a process that
    finished early must keep stepping until all have."""
    if not zero3_engine(model):
        yield model, False
        return
    gathered = gather_for_generation(model, zero3_weights, rows, length)
    if getattr(model, "_tidpo_gathered", None) != gathered:  # said at the first generation and at each change
        model._tidpo_gathered = gathered
        log.info("anchors under ZeRO-3 (loss.anchor.zero3_weights=%s): %s", zero3_weights,
                 f"weights gathered once per generation ({generation_bytes(model, rows, length) / 2**20:.1f} MB "
                 "with the KV cache)" if gathered else "each layer gathered per layer for every generated token, "
                 "processes stepping together")
    if not gathered:
        yield model, torch.distributed.get_world_size() > 1
        return
    import deepspeed

    twin = model.__dict__.get("_tidpo_twin")
    if twin is None:  # in __dict__, not registered as a submodule of the engine: the twin is no part of the model
        twin = model.__dict__["_tidpo_twin"] = hookless_twin(model.module, zero3_hook_ids(model))
    with deepspeed.zero.GatheredParameters(list(model.module.parameters())), torch_linear():
        yield twin.train(model.module.training), False


@contextmanager
def torch_linear():
    """PyTorch's own `torch.nn.functional.linear` for a while. ZeRO-3 replaces it for the whole process with an
    autograd function of its own (`memory_efficient_linear`), which keeps a gathered weight out of what the
    backward holds on to; a generation has no backward, and pays that function's overhead in every layer of every
    generated token."""
    replaced = torch.nn.functional.linear
    torch.nn.functional.linear = torch._C._nn.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = replaced


def zero3_hook_ids(engine) -> set[int]:
    """The ids of the hooks ZeRO-3 put on the engine's modules: each module's fetch, release and backward hooks,
    and the root's start-of-forward hook, which resets the step of ZeRO-3's prefetch trace."""
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    return {h.id for h in [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]}


# What ZeRO-3's module hooks count per forward and use up in the backward (deepspeed/runtime/zero/parameter_offload.py):
# a module's parameters are gathered before its backward while `applied_pre_backward_ref_cnt` > 0 and released after
# it when `ds_grads_remaining` reaches 0.
ZERO3_BACKWARD_COUNTS = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")


@contextmanager
def extra_backward(model: torch.nn.Module):
    """Lets a backward run through the graph of a forward without using up that forward's ZeRO-3 backward hooks.

    ZeRO-3 counts one backward for each forward of a module; a first backward through the graph (the fused
    importance pass's gradient to the input embeddings, `retain_graph=True`) consumes the counts, and the training
    backward that follows would then find the weights of every layer not gathered. The counts as the forward left
    them are put back on leaving, so the training backward gathers and releases each layer as usual. Each gather of
    the extra backward is released at its end. A no-op for any other model (the attributes are absent)."""
    saved = [(m, {k: m.__dict__[k] for k in ZERO3_BACKWARD_COUNTS if k in m.__dict__}) for m in model.modules()]
    yield
    for module, counts in saved:
        module.__dict__.update(counts)


def read_engine_weights(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """The full fp32 weights of a DeepSpeed checkpoint (any ZeRO stage), merged on the CPU without a process
    group; None when `checkpoint` is not a DeepSpeed one."""
    if not (checkpoint / ENGINE_TAG).is_dir():
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ENGINE_TAG)
