"""The memory plan: peak device memory of one training iteration, traced before any weight is loaded.

How it works (read top to bottom):

1. **Modules on ``meta``.** The frozen bases, the student (fp32 master weights), the teacher and, in an
   adversarial phase, the discriminator are built on the ``meta`` device with their real dtypes and
   ``requires_grad`` flags: shapes only, no weight file read, nothing allocated.
2. **Fake tensors.** Inside ``torch._subclasses.FakeTensorMode`` the modules get fake CPU storage
   (``to_empty``); every tensor op computes shapes and dtypes only. CPU fake tensors pick the same attention
   kernels as real CPU runs (the ``meta`` device would fall back to the N x N math path and overestimate
   attention many times), and autograd works on them (on fake CUDA tensors it aborts the process), so a
   plan for a GPU is traced on the CPU, with ComfyUI's attention as it is on NVIDIA GPUs
   (``comfy_backend.attention_of_nvidia_gpus``) rather than the CPU choice of the ComfyUI imported here.
3. **One warm-up iteration, then one tracked.** The warm-up creates the optimizer state (Adam's two moments);
   the second iteration runs under :class:`torch.distributed._tools.mem_tracker.MemTracker`, which sees
   every tensor created or freed and keeps the peak of live bytes with a breakdown: parameters, gradients,
   optimizer state, activations (saved for backward), backward temporaries, other.
4. **By hand** (what a tracer cannot see), as separate lines: the CUDA context and library workspaces, and an
   allocator margin for fragmentation and kernel scratch space.

Traced on real CPU tensors the same way, the tracker agreed with the CPU allocator's peak within 5%
(``tests/test_memory.py`` checks 20% at three sizes, ``benchmarks/bench_memory_plan.py`` prints the ratio).

The iteration traced is the loop's own :func:`training.loop.train_iteration` (see :func:`plan_iteration`),
on synthetic data of the dataset's shapes: per lane and micro-batch the teacher's n Euler steps without
gradients, the student's jump and its backward (MSE), or D's pass, D's step and the student's pass through the
updated D (adversarial), gradient clipping and the steps. The SD1.5 UNet traced is ComfyUI's own, built on
``meta`` from the run's checkpoint headers with the teacher's skeleton and the run's discriminator
(:class:`ComfyModels`), when ComfyUI can be imported; otherwise a stand-in with SD1.5's exact parameters and
block structure (:mod:`training.sd15_standin`), so a plan needs no ComfyUI. The plan's table says which.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch._subclasses import FakeTensorMode
from torch._subclasses.fake_tensor import DataDependentOutputException

from ._core import core
distill = core("distill")
InvalidInputError = core("errors").InvalidInputError
LightningError = core("errors").LightningError
MotionModuleSet = core("motion_module").MotionModuleSet

from . import sd15_standin
from .placement import Placement, float32_masters

GiB = 1024 ** 3
MiB = 1024 ** 2
#: CUDA context plus cuBLAS/cuDNN handles and workspaces of a PyTorch process: 0.3-1 GiB depending on GPU,
#: driver and which libraries load; we take a high-side constant. Not seen by any tracer.
CUDA_CONTEXT_BYTES = 768 * MiB
#: When free memory was read in this process the context already exists; the libraries' share remains.
CUDA_LIBRARIES_BYTES = 256 * MiB
#: Caching-allocator fragmentation and kernel scratch space (cuDNN/cuBLAS workspaces, the missing few per
#: cent the CPU check shows), as a fraction of the traced peak.
ALLOCATOR_MARGIN = 0.10
#: bitsandbytes' 8-bit Adam keeps two uint8 moments per parameter (+ a float scale per 2048-value block):
#: counted by hand, since its CUDA kernels cannot run on fake tensors.
ADAM8BIT_STATE_BYTES_PER_PARAM = 2
SD15_TOKENS, SD15_CONTEXT = 77, 768

BREAKDOWN_KEYS = ("frozen weights", "trainable weights", "gradients", "optimizer state", "activations",
                  "backward temporaries", "buffers and other")


# --- 1. the generic tracer --------------------------------------------------------------------------------

class _Tracker(MemTracker):
    """MemTracker that (a) counts frozen parameters without hooking them (hooks need requires_grad) and
    (b) lets a root module run more than once per iteration (micro-batches, lanes, teacher steps): its old
    module statistics are dropped, the global peak is kept. Both override private methods of torch 2.x."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        def grad_hook(grad):
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        param_bytes = buffer_bytes = 0
        for param in module.parameters():
            infos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
            param_bytes += sum(i.mem_consumed for i in infos)
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)))
        for buffer in module.buffers():
            infos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
            buffer_bytes += sum(i.mem_consumed for i in infos)
        return param_bytes, buffer_bytes

    def _pre_fw_hook(self, module, inputs):
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                del self.memory_tracking[module]  # a root module called again
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state):
        # Only the global peak is used; the base class also walks every module's statistics on every op,
        # which made a UNet trace minutes long.
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)

    def _pre_bw_hook(self, module, args):
        if module is not None and module in self.memory_tracking:
            super()._pre_bw_hook(module, args)

    def _post_bw_hook(self, module, args):
        if module is not None and module in self.memory_tracking:
            super()._post_bw_hook(module, args)

    def _post_fw_hook(self, module, inputs, outputs):
        if module in self.memory_tracking:
            super()._post_fw_hook(module, inputs, outputs)


@dataclasses.dataclass
class Trace:
    """Peak live bytes of one iteration and what they were at that moment (parts sum to ``peak_bytes``)."""

    peak_bytes: int
    breakdown: dict[str, int]


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st._cdata not in seen:  # the StorageImpl address: views share it (private but stable)
            seen.add(st._cdata)
            total += st.nbytes()
    return total


def _check_meta(modules: Mapping[str, nn.Module]) -> None:
    for name, module in modules.items():
        for pname, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.device.type != "meta":
                raise InvalidInputError(
                    f"memory plan: {name}.{pname} is on {t.device}, not 'meta'; build the modules with "
                    "torch.device('meta') (materialize=False) so that tracing allocates nothing real")


def warm_up(modules, optimizers, iteration=None) -> None:
    """Bring the optimizers to their steady state (Adam's moments exist), as after the first iteration.

    Without ``iteration``: one step on zero gradients, which creates exactly the state a real first step
    creates at a fraction of the cost of tracing a whole iteration.
    """
    if iteration is not None:
        iteration(modules, optimizers)
    else:
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def trace_iteration(build: Callable[[], dict[str, nn.Module]],
                    make_optimizers: Callable[[dict[str, nn.Module]], list[torch.optim.Optimizer]],
                    iteration: Callable[[dict[str, nn.Module], list[torch.optim.Optimizer]], Any], *,
                    warmup: str = "step") -> Trace:
    """Peak memory of ``iteration(modules, optimizers)`` traced on fake tensors.

    ``build()`` returns named modules on ``meta`` with final dtypes and ``requires_grad`` (frozen ones
    False). Nothing real is allocated for them: they get fake CPU storage inside ``FakeTensorMode``.
    ``warmup``: ``"step"`` (zero-gradient optimizer step, see :func:`warm_up`) or ``"iteration"`` (a whole
    untracked iteration first). The iteration must not read tensor values (no ``.item()``, ``bool(t)``, ``.tolist()``).
    """
    modules = build()
    _check_meta(modules)
    trainable_params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in modules.values():
            module.to_empty(device="cpu")
        trainable_bytes = _storage_bytes(p for m in modules.values() for p in m.parameters() if p.requires_grad)
        optimizers = make_optimizers(modules)
        warm_up(modules, optimizers, iteration if warmup == "iteration" else None)
        tracker = _Tracker()
        tracker.track_external(*modules.values(), *optimizers)
        with tracker:
            iteration(modules, optimizers)
        snapshot = tracker.get_tracker_snapshot("peak")
    del trainable_params
    parts = dict.fromkeys(BREAKDOWN_KEYS, 0)
    peak = 0
    for dev_snap in snapshot.values():
        params = dev_snap.get(_MemRefType.PARAM, 0)
        parts["trainable weights"] += min(trainable_bytes, params)
        parts["frozen weights"] += params - min(trainable_bytes, params)
        parts["gradients"] += dev_snap.get(_MemRefType.GRAD, 0)
        parts["optimizer state"] += dev_snap.get(_MemRefType.OPT, 0)
        parts["activations"] += dev_snap.get(_MemRefType.ACT, 0)
        parts["backward temporaries"] += dev_snap.get(_MemRefType.TEMP, 0)
        parts["buffers and other"] += dev_snap.get(_MemRefType.BUFFER, 0) + dev_snap.get(_MemRefType.OTH, 0)
        peak += sum(v for k, v in dev_snap.items() if k in _MemRefType.__members__.values())
    return Trace(peak, parts)


def _fill_real(module: nn.Module, generator: torch.Generator) -> None:
    """Small random values (memory does not depend on them; garbage from ``to_empty`` could be NaN/denormal)."""
    with torch.no_grad():
        for t in module.parameters():
            t.copy_(torch.randn(t.shape, generator=generator) * 0.02)
        for t in module.buffers():
            if t.is_floating_point():
                t.zero_()


def measure_real_peak(build, make_optimizers, iteration, *, seed: int = 0, warmup: str = "step") -> int:
    """The CPU allocator's peak bytes during the same iteration run on real tensors (for checking the plan).

    Live bytes before the iteration (weights, buffers, gradients, optimizer state) are counted from the
    tensors; the allocator events during it come from the profiler (``profile_memory``), summed in time order.
    The event tree is a private profiler API of torch 2.x.
    """
    from torch._C._profiler import _EventType

    modules = build()
    generator = torch.Generator().manual_seed(seed)
    for module in modules.values():
        module.to_empty(device="cpu")
        _fill_real(module, generator)
    optimizers = make_optimizers(modules)
    warm_up(modules, optimizers, iteration if warmup == "iteration" else None)
    live = [*(t for m in modules.values() for t in (*m.parameters(), *m.buffers())),
            *(v for opt in optimizers for state in opt.state.values() for v in state.values()
              if isinstance(v, torch.Tensor))]
    before = _storage_bytes(live)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        iteration(modules, optimizers)
    events: list[tuple[int, int]] = []

    def walk(node):
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size))  # frees are negative sizes
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    running = high = 0
    for _, size in sorted(events, key=lambda e: e[0]):  # stable: same-time events keep tree order
        running += size
        high = max(high, running)
    return before + high


# --- 2. what is planned: settings read from the config -----------------------------------------------------

@dataclasses.dataclass
class Geometry:
    """Latent clip size: frames and latent height/width (image pixels / 8 for SD1.5)."""

    frames: int
    height: int
    width: int

    @classmethod
    def from_pixels(cls, frames: int, height: int, width: int) -> "Geometry":
        if height % 8 or width % 8:
            raise InvalidInputError(f"image size {width}x{height} must be a multiple of 8 (SD1.5 latents are 1/8)")
        return cls(frames, height // 8, width // 8)

    def label(self) -> str:
        return f"{self.width * 8}x{self.height * 8}x{self.frames}"


@dataclasses.dataclass
class StandIn:
    """Widths of the stand-in UNet and motion module (defaults: full-size SD1.5 and AnimateDiff v2)."""

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    heads: int = 8
    groups: int = 32
    context_dim: int = SD15_CONTEXT
    tokens: int = SD15_TOKENS
    motion_heads: int = 8
    attention_levels: tuple[int, ...] = (0, 1, 2)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def full_size(self) -> bool:
        return self == StandIn()


# (section, key) -> settings field; the options search writes these back as `section.key=value`.
_FIELDS = {
    ("run", "device"): "device", ("run", "precision"): "precision",
    ("model", "kind"): "kind", ("model", "resident_bases"): "resident_bases",
    ("model", "gradient_checkpointing"): "checkpointing",
    ("stage", "name"): "stage", ("stage", "mse_only"): "mse_only", ("stage", "clips"): "clips",
    ("stage", "micro_batch"): "micro_batch", ("stage", "grad_clip"): "grad_clip",
    ("stage", "optimizer"): "optimizer",
    ("discriminator", "trainable"): "d_trainable", ("discriminator", "gradient_checkpointing"): "d_checkpointing",
}


@dataclasses.dataclass
class PlanSettings:
    """The part of a training config that decides memory (names: see ``_FIELDS``)."""

    kind: str = "sd15"
    bases: int = 1
    resident_bases: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    checkpointing: bool = False
    stage: str = "8->4"
    mse_only: bool = False
    clips: int = 1
    micro_batch: int = 1
    grad_clip: float = 1.0
    optimizer: str = "adam"
    d_trainable: str = "full"
    d_checkpointing: bool = False

    @classmethod
    def from_config(cls, config) -> "PlanSettings":
        """From a ``training.config.Config`` (or anything with the same sections and field names)."""
        values = {}
        for (section, key), field in _FIELDS.items():
            part = getattr(config, section, None)
            if part is not None and hasattr(part, key):
                values[field] = getattr(part, key)
        model = getattr(config, "model", None)
        if model is not None and getattr(model, "bases", None) is not None:
            values["bases"] = max(1, len(model.bases))
        return cls(**values)

    def with_override(self, override: str) -> "PlanSettings":
        """A copy with one ``section.key=value`` applied (values parsed as TOML scalars)."""
        key, sep, raw = override.partition("=")
        parts = tuple(key.strip().split("."))
        if not sep or parts not in _FIELDS:
            known = ", ".join(f"{s}.{k}" for s, k in _FIELDS)
            raise InvalidInputError(f"memory plan: unknown override {override!r}; keys that change memory: {known}")
        field = _FIELDS[parts]
        current = getattr(self, field)
        value: Any = raw.strip().strip('"')
        if isinstance(current, bool):
            value = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, int):
            value = int(value)
        elif isinstance(current, float):
            value = float(value)
        return dataclasses.replace(self, **{field: value})

    def override_string(self, field: str) -> str:
        section, key = next(sk for sk, f in _FIELDS.items() if f == field)
        value = getattr(self, field)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        return f"{section}.{key}={text}"

    # -- derived ------------------------------------------------------------------------------------------

    def resident_count(self) -> int:
        return self.bases if self.resident_bases == "all" else 1 if self.resident_bases == "one" else self.bases

    def compute_dtype(self, device: str) -> torch.dtype:
        if device == "cpu":
            return torch.float32  # the loop forces fp32 on CPU
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def stage_spec(self) -> distill.Stage:
        for stage in distill.paper_stages(one_step=True, iterations=1):
            if stage.name == self.stage.replace(" ", ""):
                if self.mse_only and stage.has_adversarial:
                    return dataclasses.replace(stage, phases=(distill.mse_phase(1),))
                return stage
        names = [s.name for s in distill.paper_stages(one_step=True)]
        raise InvalidInputError(f"stage.name {self.stage!r} is not one of {names}")


# --- 3. the iteration traced --------------------------------------------------------------------------------

def _standin_parts(spec: StandIn, settings: PlanSettings, geometry: Geometry, phase_kind: str, device: str):
    """Modules on meta for one phase: resident bases, student (fp32, trainable), teacher, discriminator."""
    from . import loop

    dtype = settings.compute_dtype(device)
    motion_kwargs = {"heads": spec.motion_heads, "norm_groups": spec.groups}
    unet_kwargs = {"model_channels": spec.model_channels, "channel_mult": spec.channel_mult, "heads": spec.heads,
                   "groups": spec.groups, "context_dim": spec.context_dim, "attention_levels": spec.attention_levels}

    def build():
        with torch.device("meta"):
            modules: dict[str, nn.Module] = {}
            for i in range(settings.resident_count()):
                base = sd15_standin.StandInUNet(index=i, **unet_kwargs).to(dtype).requires_grad_(False)
                modules[f"base{i}"] = base
            modules["student"] = MotionModuleSet(spec.channels, **motion_kwargs)  # fp32 masters
            # what the run checkpoints: the student's motion modules, not the frozen UNet's blocks
            loop.set_gradient_checkpointing(modules["student"], settings.checkpointing)
            # the run holds its teacher in float32 (``comfy_backend.load_teacher``), whatever the compute dtype
            modules["teacher"] = MotionModuleSet(spec.channels, **motion_kwargs).requires_grad_(False)
            if phase_kind != distill.MSE:
                encoder = sd15_standin.StandInUNet(encoder_only=True, **unet_kwargs)
                backbone = sd15_standin.StandInBackbone(encoder, sd15_standin.down_mid_motion(spec.channels,
                                                                                             **motion_kwargs))
                backbone.gradient_checkpointing = settings.d_checkpointing
                down = 2 ** (len(spec.channel_mult) - 1)  # the UNet halves the latent at every level but the last
                feature = (geometry.frames, -(-geometry.height // down), -(-geometry.width // down))
                discriminator = core("discriminator")
                # the run's head width, narrowed with a narrow stand-in
                disc = discriminator.FlowDiscriminator(
                    backbone, num_bases=settings.bases, feature_size=feature,
                    conditional=phase_kind == distill.CONDITIONAL,
                    head_channels=min(discriminator.SD15_HEAD_CHANNELS, spec.channels[-1]))
                set_discriminator_trainability(disc, settings.d_trainable, dtype)
                modules["discriminator"] = disc
        return modules

    return build


def light_trainable(name: str) -> bool:
    """``discriminator.trainable = "light"``: motion modules, time / base-index embeddings and the head."""
    return any(part in name for part in ("motion", "time_embed", "base_embedding", "head"))


def set_discriminator_trainability(disc: nn.Module, trainable: str, frozen_dtype: torch.dtype) -> None:
    """``full``: everything trains (fp32 masters). ``light``: the rest is frozen and stored in ``frozen_dtype``."""
    if trainable not in ("full", "light"):
        raise InvalidInputError(f"discriminator.trainable must be 'full' or 'light', got {trainable!r}")
    if trainable == "full":
        return
    for name, module in disc.named_modules():
        if light_trainable(name):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if not light_trainable(f"{name}.{pname}"):
                param.requires_grad_(False)
                param.data = param.data.to(frozen_dtype)


def make_optimizers_for(settings: PlanSettings, device: str, phase_kind: str = distill.MSE):
    """The loop's optimiser per trainable model (student first, then D): ``training.loop.make_optimizer``, so
    the state traced is the state the run keeps. ``adam8bit`` is traced as a stateless SGD step (its CUDA
    kernels cannot run on fake tensors); its 2 bytes/parameter are added by hand."""
    from . import loop

    phase = _phase_of(settings.stage_spec(), phase_kind)

    def make(modules):
        optimizers = []
        for name in ("student", "discriminator"):
            if name not in modules:
                continue
            params = [p for p in modules[name].parameters() if p.requires_grad]
            if settings.optimizer == "adam8bit":
                optimizers.append(torch.optim.SGD(params, lr=phase.lr, foreach=False))
            else:
                optimizers.append(loop.make_optimizer(params, phase, settings.optimizer))
        return optimizers

    return make


def _phase_of(stage: distill.Stage, phase_kind: str) -> distill.Phase:
    for phase in stage.phases:
        if phase.kind == phase_kind:
            return phase
    raise InvalidInputError(f"stage {stage.name} has no {phase_kind!r} phase "
                            f"(its phases: {[p.kind for p in stage.phases]})")


class _TracePlacement(Placement):
    """The loop's placement for a trace: modules stay where the tracer put them (fake CPU storage, one per
    resident base) and forward passes autocast to the planned device's compute dtype, so a bf16 GPU run is
    traced on the CPU with bf16 activations (a real CPU placement always runs float32)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__("cpu", "fp32", "all")
        self.dtype = dtype

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.dtype)


def _synthetic_data(geometry: Geometry, cfg: float, tokens: int, context_dim: int):
    """A lane's ``data(n, generator)`` with the dataset's shapes: latents, prompt and (CFG) empty-prompt
    conditioning. Values never matter to memory."""
    def data(n: int, generator: torch.Generator):
        latents = torch.randn(n * geometry.frames, 4, geometry.height, geometry.width, generator=generator)
        cond = torch.randn(n, tokens, context_dim, generator=generator)
        uncond = torch.randn(n, tokens, context_dim, generator=generator) if cfg != 1.0 else None
        return latents, cond, uncond
    return data


def plan_iteration(settings: PlanSettings, geometry: Geometry, phase_kind: str, device: str, *,
                   tokens: int = SD15_TOKENS, context_dim: int = SD15_CONTEXT):
    """``iteration(modules, optimizers)``: one call of the loop's own :func:`training.loop.train_iteration`
    over ``settings.bases`` lanes on the resident bases, then the gradient release the trainer does after
    every iteration. What is traced is what the run executes, not a description of it."""
    from . import loop

    stage = settings.stage_spec()
    phase = _phase_of(stage, phase_kind)
    placement = _TracePlacement(settings.compute_dtype(device))
    data = _synthetic_data(geometry, stage.cfg, tokens, context_dim)

    def iteration(modules, optimizers):
        resident = [m for k, m in modules.items() if k.startswith("base")]
        # with one resident base every lane runs on it in turn, as swapped bases do on the device
        lanes = [distill.Lane(resident[i % len(resident)], data, geometry.frames) for i in range(settings.bases)]
        disc = modules.get("discriminator")
        loop.train_iteration(stage, phase, lanes, modules["student"], modules["teacher"], optimizers[0],
                             generator=torch.Generator().manual_seed(0), clips=settings.clips,
                             micro_batch=min(settings.micro_batch, settings.clips), discriminator=disc,
                             disc_optimizer=optimizers[1] if disc is not None else None, placement=placement,
                             total_bases=settings.bases, grad_clip=settings.grad_clip)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)

    return iteration


def plan_pieces(settings: PlanSettings, geometry: Geometry, phase_kind: str, device: str,
                unet: "StandIn | ComfyModels | None" = None):
    """(build, make_optimizers, iteration) for one phase: what is traced, and what :func:`measure_real_peak`
    runs for real in the checks. ``unet``: ComfyUI's own UNet built from the run's files (:class:`ComfyModels`)
    or the stand-in (:class:`StandIn`, the default)."""
    if isinstance(unet, ComfyModels):
        return (_comfy_parts(unet, settings, geometry, phase_kind, device),
                make_optimizers_for(settings, device, phase_kind),
                plan_iteration(settings, geometry, phase_kind, device))
    spec = unet or StandIn()
    return (_standin_parts(spec, settings, geometry, phase_kind, device),
            make_optimizers_for(settings, device, phase_kind),
            plan_iteration(settings, geometry, phase_kind, device, tokens=spec.tokens, context_dim=spec.context_dim))


@dataclasses.dataclass
class ComfyModels:
    """The run's own files, traced through the modules the run builds: ComfyUI's UNet on ``meta`` from each
    checkpoint's header, the teacher's skeleton from its header, the discriminator from
    ``training.sd15_setup`` (no weight is read)."""

    bases: list[str]
    teacher: str

    @classmethod
    def from_config(cls, config, device: str) -> "tuple[ComfyModels | None, str]":
        """The config's files when ComfyUI can be imported and the files' headers can be read; else None and
        why (the plan then traces the stand-in)."""
        model = getattr(config, "model", None)
        bases = [str(b) for b in getattr(model, "bases", []) or []]
        teacher = str(getattr(model, "teacher", "") or "")
        if not bases or not teacher:
            return None, "no model.bases / model.teacher to read"
        if not teacher.lower().endswith(".safetensors"):
            return None, f"the teacher {Path(teacher).name} is not a .safetensors file (its header is needed)"
        missing = [p for p in [*bases, teacher] if not Path(p).is_file()]
        if missing:
            return None, f"{missing[0]} does not exist"
        try:
            from . import comfy_backend

            comfy_backend.import_comfy(device)
        except (ImportError, LightningError) as error:
            return None, f"ComfyUI is not importable here ({str(error).splitlines()[0][:120]})"
        return cls(bases, teacher), ""


def _comfy_parts(models: ComfyModels, settings: PlanSettings, geometry: Geometry, phase_kind: str, device: str):
    """Modules on meta for one phase, built by the code the run uses (``training.sd15_setup``,
    ``training.comfy_backend``, ``training.loop``): frozen bases in the compute dtype (as ComfyUI loads a UNet
    for a GPU), the float32 teacher, the student, and D with the loop's trainability and checkpointing."""
    from . import comfy_backend, loop, sd15_setup

    dtype = settings.compute_dtype(device)

    def build():
        modules: dict[str, nn.Module] = {}
        bases = []
        for i in range(settings.resident_count()):
            # "auto": a plan for a GPU may be made on a machine without one (ComfyUI then imports for the CPU)
            base = comfy_backend.meta_base(i, models.bases[i % len(models.bases)],
                                           device="cpu" if device == "cpu" else "auto")
            bases.append(base.to(dtype))
            modules[f"base{i}"] = base
        skeleton = comfy_backend.load_teacher(models.teacher, materialize=False)
        student = sd15_setup.trainable_copy(skeleton)
        loop.set_gradient_checkpointing(student, settings.checkpointing)
        modules["student"] = student
        modules["teacher"] = sd15_setup.frozen(skeleton)
        if phase_kind != distill.MSE:
            make = sd15_setup.discriminator_factory(
                bases[0], modules["teacher"], num_bases=settings.bases, frames=geometry.frames,
                latent_height=geometry.height, latent_width=geometry.width, trainable=settings.d_trainable)
            disc = make(phase_kind == distill.CONDITIONAL)
            loop.set_discriminator_trainable(disc, settings.d_trainable)
            disc.backbone.gradient_checkpointing = settings.d_checkpointing
            modules["discriminator"] = float32_masters(disc)  # what the placement does to it
        return modules

    return build


# --- 4. the plan --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FitOption:
    """Config overrides (``section.key=value``) that make the plan fit, with the peak they give."""

    overrides: list[str]
    peak_bytes: int

    def __str__(self) -> str:
        sets = " ".join(f"--set {o}" for o in self.overrides)
        return f"{sets}  (peak {self.peak_bytes / GiB:.2f} GiB)"


@dataclasses.dataclass
class MemoryPlan:
    """The estimate for one configuration (interface 8): ``peak_bytes`` = traced peak + hand-added lines."""

    peak_bytes: int
    breakdown: dict[str, int]
    traced_bytes: int
    phase_peaks: dict[str, int]
    phase: str
    free_bytes: int | None
    device: str
    model_source: str
    geometry: Geometry
    settings: PlanSettings
    options_that_fit: list[FitOption] = dataclasses.field(default_factory=list)
    remarks: list[str] = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.peak_bytes <= self.free_bytes

    def table(self) -> str:
        s = self.settings
        lines = [f"memory plan: {s.kind} stage {s.stage}, {self.geometry.label()} (frames, pixels), "
                 f"{s.clips} clip(s)/base in micro-batches of {s.micro_batch}, {s.bases} base(s) "
                 f"({s.resident_count()} resident), precision {s.precision if self.device != 'cpu' else 'fp32'}, "
                 f"checkpointing student={s.checkpointing} D={s.d_checkpointing}, D {s.d_trainable}, {s.optimizer}",
                 f"device: {self.device}; UNet traced: {self.model_source}",
                 f"peak phase: {self.phase} (" + ", ".join(f"{k} {v / GiB:.2f} GiB"
                                                           for k, v in self.phase_peaks.items()) + ")",
                 f"{'part':<42}{'GiB':>10}"]
        for key, value in self.breakdown.items():
            lines.append(f"  {key:<40}{value / GiB:>10.3f}")
        lines.append(f"  {'= peak':<40}{self.peak_bytes / GiB:>10.3f}")
        if self.free_bytes is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"free device memory {self.free_bytes / GiB:.2f} GiB: {verdict}")
        lines += [f"note: {n}" for n in self.remarks]
        if not self.fits:
            if self.options_that_fit:
                lines.append("options that fit:")
                lines += [f"  {o}" for o in self.options_that_fit]
            else:
                lines.append("no option searched fits; use a smaller clip size or a larger GPU")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise (refuse to start) when the plan does not fit, naming the options that would."""
        if not self.fits:
            raise MemoryPlanError(self)


class MemoryPlanError(LightningError):
    def __init__(self, plan: MemoryPlan):
        self.plan = plan
        super().__init__(f"estimated peak {plan.peak_bytes / GiB:.2f} GiB exceeds free device memory "
                         f"{(plan.free_bytes or 0) / GiB:.2f} GiB\n{plan.table()}")


def _target_device(settings: PlanSettings, free_bytes: int | None) -> str:
    if settings.device.startswith("cuda"):
        return "cuda"
    if settings.device == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() or free_bytes is not None else "cpu"


def _free_device_bytes(device: str, settings: PlanSettings) -> int | None:
    if device != "cuda" or not torch.cuda.is_available():
        return None
    index = int(settings.device.split(":")[1]) if ":" in settings.device else torch.cuda.current_device()
    return torch.cuda.mem_get_info(index)[0]


def _attention_for(device: str, unet):
    """ComfyUI's attention as the target device runs it (see ``comfy_backend.attention_of_nvidia_gpus``)."""
    if isinstance(unet, ComfyModels) and device == "cuda":
        from . import comfy_backend

        return comfy_backend.attention_of_nvidia_gpus()
    return contextlib.nullcontext()


def _trace_phase(settings, geometry, phase_kind, device, unet) -> Trace:
    with _attention_for(device, unet):
        return trace_iteration(*plan_pieces(settings, geometry, phase_kind, device, unet))


def iteration_flops(settings: PlanSettings, geometry: Geometry, phase_kind: str, device: str,
                    unet: "StandIn | ComfyModels | None" = None) -> int:
    """FLOPs of one iteration of the phase, counted on the same fake-tensor iteration the plan traces
    (:mod:`training.compute`)."""
    from . import compute

    with _attention_for(device, unet):
        return compute.count_flops(*plan_pieces(settings, geometry, phase_kind, device, unet))


def _hand_lines(settings: PlanSettings, trace: Trace, device: str, free_measured: bool, trainable: int
                ) -> dict[str, int]:
    lines = {}
    if settings.optimizer == "adam8bit":
        lines["8-bit optimizer state (by hand, 2 B/param)"] = ADAM8BIT_STATE_BYTES_PER_PARAM * trainable
    if device == "cuda":
        lines["CUDA libraries (by hand)" if free_measured else "CUDA context + libraries (by hand)"] = (
            CUDA_LIBRARIES_BYTES if free_measured else CUDA_CONTEXT_BYTES)
        lines[f"allocator margin (by hand, {ALLOCATOR_MARGIN:.0%})"] = int(ALLOCATOR_MARGIN * trace.peak_bytes)
    return lines


def _trainable_count(settings: PlanSettings, geometry: Geometry, phase: str, device: str,
                     unet: "StandIn | ComfyModels | None") -> int:
    modules = plan_pieces(settings, geometry, phase, device, unet)[0]()
    return sum(p.numel() for m in modules.values() for p in m.parameters() if p.requires_grad)


def _plan(settings: PlanSettings, geometry: Geometry, *, free_bytes, device, unet, free_measured,
          phases: Sequence[str] | None = None) -> MemoryPlan:
    stage = settings.stage_spec()
    kinds = list(dict.fromkeys(p.kind for p in stage.phases)) if phases is None else list(phases)
    traces = {kind: _trace_phase(settings, geometry, kind, device, unet) for kind in kinds}
    worst = max(traces, key=lambda k: traces[k].peak_bytes)
    trace = traces[worst]
    extra = _hand_lines(settings, trace, device, free_measured,
                        _trainable_count(settings, geometry, worst, device, unet)
                        if settings.optimizer == "adam8bit" else 0)
    breakdown = {**trace.breakdown, **extra}
    return MemoryPlan(peak_bytes=trace.peak_bytes + sum(extra.values()), breakdown=breakdown,
                      traced_bytes=trace.peak_bytes, phase_peaks={k: t.peak_bytes for k, t in traces.items()},
                      phase=worst, free_bytes=free_bytes, device=device, model_source="", geometry=geometry,
                      settings=settings)


def candidate_changes(settings: PlanSettings, device: str) -> list[tuple[str, Any]]:
    """Concrete alternative settings, cheapest in training quality and speed first."""
    out: list[tuple[str, Any]] = []
    adversarial = settings.stage_spec().has_adversarial
    if not settings.checkpointing:
        out.append(("checkpointing", True))
    if settings.resident_count() > 1:
        out.append(("resident_bases", "one"))
    if device != "cpu" and settings.precision == "fp32":
        out.append(("precision", "bf16"))
    if settings.micro_batch > 1:
        out.append(("micro_batch", 1))
    if adversarial and not settings.d_checkpointing:
        out.append(("d_checkpointing", True))
    if adversarial and settings.d_trainable == "full":
        out.append(("d_trainable", "light"))
    if settings.optimizer == "adam" and importlib.util.find_spec("bitsandbytes") is not None:
        out.append(("optimizer", "adam8bit"))
    if settings.clips > 1:
        out.append(("clips", 1))
    return out


def search_options(settings: PlanSettings, geometry: Geometry, free_bytes: int, *, device: str,
                   unet: "StandIn | ComfyModels | None" = None, free_measured: bool = False, worst_phase: str | None = None,
                   max_options: int = 4) -> list[FitOption]:
    """Options that fit: each single change that fits on its own, else the shortest run of the changes
    (in :func:`candidate_changes` order) that fits. Every candidate is traced, not guessed."""
    changes = candidate_changes(settings, device)
    phases = [worst_phase] if worst_phase else None
    found: list[FitOption] = []

    def peak(s):
        return _plan(s, geometry, free_bytes=free_bytes, device=device, unet=unet,
                     free_measured=free_measured, phases=phases).peak_bytes

    for field, value in changes:
        s = dataclasses.replace(settings, **{field: value})
        p = peak(s)
        if p <= free_bytes:
            found.append(FitOption([s.override_string(field)], p))
    if found:
        return sorted(found, key=lambda o: o.peak_bytes)[:max_options]
    s, applied = settings, []
    for field, value in changes:
        s = dataclasses.replace(s, **{field: value})
        applied.append(field)
        p = peak(s)
        if p <= free_bytes:
            # drop changes that the fitting set does not need, latest first kept
            needed = list(applied)
            for f in list(applied[:-1]):
                trial = settings
                for g in needed:
                    if g != f:
                        trial = dataclasses.replace(trial, **{g: getattr(s, g)})
                tp = peak(trial)
                if tp <= free_bytes:
                    needed.remove(f)
                    p = tp
            final = settings
            for g in needed:
                final = dataclasses.replace(final, **{g: getattr(s, g)})
            return [FitOption([final.override_string(g) for g in needed], p)]
    return []


def estimate(config, *, free_bytes: int | None = None, geometry: Geometry | None = None,
             standin: StandIn | None = None, settings: PlanSettings | None = None,
             search: bool = True) -> MemoryPlan:
    """Peak device memory of one iteration of ``config``'s stage, before any weight is loaded (interface 8).

    ``free_bytes``: device memory available; default ``torch.cuda.mem_get_info`` on CUDA, None (no
    verdict) on CPU. ``geometry``: the clip size; default the dataset's (``data.dataset``).
    The UNet traced is ComfyUI's own, built from ``model.bases`` and ``model.teacher`` on ``meta``, when
    ComfyUI can be imported (a node, or the CLI in ComfyUI's Python); else the stand-in, and the plan says
    why. ``standin`` forces the stand-in at given widths (tests); ``settings`` replaces what is read from
    ``config``.
    """
    settings = settings or PlanSettings.from_config(config)
    if settings.kind != "sd15":
        raise InvalidInputError(f"the memory plan traces SD1.5 runs; model.kind={settings.kind!r} (the toy world "
                                "fits in any memory) is not planned")
    if settings.micro_batch < 1 or settings.clips < 1:
        raise InvalidInputError("stage.clips and stage.micro_batch must be at least 1")
    geometry = geometry or _dataset_geometry(config)
    device = _target_device(settings, free_bytes)
    free_measured = False
    if free_bytes is None:
        free_bytes = _free_device_bytes(device, settings)
        free_measured = free_bytes is not None
    unet: StandIn | ComfyModels | None = standin
    why_standin = "a stand-in was asked for"
    if unet is None:
        unet, why_standin = ComfyModels.from_config(config, "cpu" if device == "cpu" else "auto")
    try:
        plan = _plan(settings, geometry, free_bytes=free_bytes, device=device, unet=unet,
                     free_measured=free_measured)
    except DataDependentOutputException:
        if not isinstance(unet, ComfyModels):
            raise
        # ComfyUI's CPU sub-quadratic attention slices by tensor values at large sizes: not traceable
        unet, why_standin = None, "ComfyUI's attention at this size reads tensor values, which fake tensors cannot"
        plan = _plan(settings, geometry, free_bytes=free_bytes, device=device, unet=unet,
                     free_measured=free_measured)
    if isinstance(unet, ComfyModels):
        plan.model_source = (f"ComfyUI's SD1.5 UNet of {Path(unet.bases[0]).name}, the teacher "
                             f"{Path(unet.teacher).name} and the run's discriminator, on meta from the files' headers")
    else:
        spec = unet or StandIn()
        plan.model_source = ("stand-in SD1.5 UNet (training.sd15_standin: same parameters and block structure as "
                             "ComfyUI's)" if spec.full_size else f"stand-in UNet at reduced widths {spec.channels}")
        plan.remarks.append(f"the UNet traced is the stand-in, not ComfyUI's ({why_standin}): same parameters and "
                            "blocks; its peak was 1-5% below ComfyUI's UNet's in the comparisons in the README")
    if device == "cuda":
        plan.remarks.append("traced on CPU fake tensors; CUDA kernels' scratch space is inside the allocator margin")
    if settings.optimizer == "adam8bit":
        plan.remarks.append("8-bit Adam state is estimated (2 bytes/parameter), not traced")
    if search and not plan.fits and free_bytes is not None:
        plan.options_that_fit = search_options(settings, geometry, free_bytes, device=device, unet=unet,
                                               free_measured=free_measured, worst_phase=plan.phase)
    return plan


def _dataset_geometry(config) -> Geometry:
    data = getattr(config, "data", None)
    path = getattr(data, "dataset", "") if data is not None else ""
    if path:
        from . import dataset as dataset_module
        ds = dataset_module.LatentDataset(path)
        return Geometry(ds.frames, ds.height, ds.width)
    raise InvalidInputError("memory plan: no clip size; set data.dataset to a latent cache, or pass "
                            "--frames/--height/--width (image pixels) to `python -m training estimate`")


# --- 5. CLI -------------------------------------------------------------------------------------------------

def register_cli(subparsers) -> None:
    """``python -m training estimate CONFIG.toml [--set section.key=value ...] [--free-gb X]``."""
    parser = subparsers.add_parser("estimate", help="trace one iteration on fake tensors and print peak memory",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="training config (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--free-gb", type=float, default=None,
                        help="device memory to plan against in GiB (default: free memory of the CUDA device)")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (latent x 8)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (latent x 8)")
    parser.set_defaults(func=run_cli)


def _load_config(path: str, overrides: list[str]):
    from . import config as config_module

    return config_module.load(path, overrides), []


def run_cli(args) -> int:
    config, late = _load_config(args.config, list(args.overrides))
    settings = PlanSettings.from_config(config)
    for override in late:
        settings = settings.with_override(override)
    geometry = None
    if args.frames or args.height or args.width:
        if not (args.frames and args.height and args.width):
            raise InvalidInputError("give all of --frames, --height and --width (or none: the dataset's size)")
        geometry = Geometry.from_pixels(args.frames, args.height, args.width)
    free = None if args.free_gb is None else int(args.free_gb * GiB)
    plan = estimate(config, free_bytes=free, geometry=geometry, settings=settings)
    print(plan.table())
    return 0 if plan.fits else 2


if __name__ == "__main__":  # pragma: no cover - `python -m training estimate` is the entry point
    import argparse

    top = argparse.ArgumentParser(prog="python -m training.memory")
    register_cli(top.add_subparsers(dest="command", required=True))
    ns = top.parse_args()
    sys.exit(ns.func(ns))
