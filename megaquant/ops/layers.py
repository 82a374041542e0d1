"""A recipe's BF16 layers: every hooked GEMM of the chosen transformer layers runs plain, in both passes.

`install_bf16_layers(model, numbers)` hooks each selected layer: the outermost modules that carry a
`layer_number` (Megatron's TransformerLayer; its SelfAttention and core attention carry the same number
inside it). Megatron's layer numbers are global (1-based, offset by the pipeline stage and virtual
chunk), so every stage hooks exactly its own share of the set.

- Forward: a pre-hook sets `state.PLAIN_SCOPE` for the layer's forward and its hook restores it, so the
  fprop GEMMs run plain (also when activation recomputation re-runs the forward inside the backward).
- Backward: Megatron's linear backward calls the dgrad and wgrad hooks on its own, outside the forward
  hooks. The hooks therefore wrap the layer's outputs in `_Enter` and its hidden-states input in `_Leave`
  (identities). Autograd can run no backward node of the layer before `_Enter`'s (each needs the gradient
  it passes on) and `_Leave`'s only after every node that feeds the layer input's gradient, which is every
  node holding a hooked GEMM. `_Enter.backward` sets the scope, `_Leave.backward` clears it.
- The model's own forward pre-hook clears the scope at each micro-batch: a layer whose input needs no
  gradient has no `_Leave` node, and its scope must not leak into the next micro-batch.

The ops read the scope once per call (megaquant.ops.gemm, megaquant.ops.attention): a Python decision, so
a CUDA graph captured over the step replays it; nothing here reads a device value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from megaquant.errors import LaunchError
from megaquant.ops.state import PLAIN_ALL, PLAIN_LINEAR, PLAIN_SCOPE

__all__ = ["install_bf16_layers", "install_recipe_bf16_layers", "numbered_layers"]


class _Enter(torch.autograd.Function):
    """Identity on a layer's outputs; its backward starts the layer's backward: scope = mode."""

    @staticmethod
    def forward(ctx: Any, mode: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.mode = mode
        # aliases, not views: a stage's output must be viewless (Megatron's pipeline frees its .data)
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        PLAIN_SCOPE[0] = ctx.mode
        return (None, *grads)


class _Leave(torch.autograd.Function):
    """Identity on a layer's hidden-states input; its backward ends the layer's backward: scope = 0."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        PLAIN_SCOPE[0] = 0
        return grad


def numbered_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost submodules of `model` with an int `layer_number` (TransformerLayer, not the
    attention modules inside it), in module order."""
    found: list[torch.nn.Module] = []

    def walk(module: torch.nn.Module) -> None:
        for child in module.children():
            if isinstance(getattr(child, "layer_number", None), int):
                found.append(child)
            else:
                walk(child)

    walk(model)
    return found


def _hooks(mode: int) -> tuple[Any, Any]:
    """The forward pre-hook and hook of one BF16 layer (they share the scope to restore)."""
    before = [0]

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        before[0], PLAIN_SCOPE[0] = PLAIN_SCOPE[0], mode
        if not torch.is_grad_enabled():
            return None
        hidden = kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):  # TransformerBlock passes it by keyword
            return (args, {**kwargs, "hidden_states": _Leave.apply(hidden)}) if hidden.requires_grad else None
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            return (_Leave.apply(args[0]), *args[1:]), kwargs
        return None

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        PLAIN_SCOPE[0] = before[0]
        if not torch.is_grad_enabled():
            return None
        items = list(output) if isinstance(output, tuple) else [output]
        grads = [i for i, t in enumerate(items) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not grads:
            return None
        wrapped = _Enter.apply(mode, *(items[i] for i in grads))
        for i, t in zip(grads, wrapped, strict=True):
            items[i] = t
        return tuple(items) if isinstance(output, tuple) else items[0]

    return pre_hook, hook


def _clear_scope(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    PLAIN_SCOPE[0] = 0


def install_bf16_layers(
    models: torch.nn.Module | Sequence[torch.nn.Module], numbers: Iterable[int], *, attention: bool = True
) -> tuple[int, ...]:
    """Run every hooked GEMM of the layers whose `layer_number` is in `numbers` unquantized (path
    `plain`): linear GEMMs forward and backward, and with `attention` the QK/PV GEMMs too. `models`: one
    module or Megatron's list of model chunks. Returns the layer numbers hooked here (this pipeline
    stage's share), sorted. Refuses a layer that Megatron replays through its per-layer CUDA graphs
    (the module hooks would not run)."""
    wanted = set(numbers)
    mode = PLAIN_ALL if attention else PLAIN_LINEAR
    chunks = [models] if isinstance(models, torch.nn.Module) else list(models)
    hooked: list[int] = []
    for chunk in chunks:
        selected = [m for m in numbered_layers(chunk) if m.layer_number in wanted]
        for layer in selected:
            number = int(getattr(layer, "layer_number"))  # noqa: B009  (an int: numbered_layers)
            if hasattr(layer, "cudagraph_manager"):
                raise LaunchError(
                    f"layer {number} is to run in BF16 (the recipe's BF16 layers), but it runs "
                    "through Megatron's per-layer CUDA graphs, which bypass the module hooks that keep it "
                    "unquantized; drop --cuda-graph-impl local (full_iteration graphs are fine)"
                )
            pre_hook, hook = _hooks(mode)
            layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
            layer.register_forward_hook(hook)
            hooked.append(number)
        if selected:
            chunk.register_forward_pre_hook(_clear_scope)
    return tuple(sorted(hooked))


def install_recipe_bf16_layers(
    models: torch.nn.Module | Sequence[torch.nn.Module], num_layers: int, recipe: str | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """install_bf16_layers for the configured recipe's BF16 layers of a `num_layers`-layer model; returns
    (the recipe's layers, those hooked in `models`). Nothing is hooked when the recipe keeps none."""
    from megaquant.ops.config import _DEFAULTS
    from megaquant.recipes import DEFAULT_RECIPE, get_recipe

    name = recipe if recipe is not None else str(_DEFAULTS.get("recipe", DEFAULT_RECIPE))
    r = get_recipe(name)
    numbers = r.bf16_layer_numbers(num_layers)
    if not numbers:
        return (), ()
    return numbers, install_bf16_layers(models, numbers, attention=r.bf16_attention)
