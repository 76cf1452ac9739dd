"""Activation checkpointing policies for the UNet, applied from outside the model.

Why this module exists: the reference's ``use_checkpointing()`` cannot work (it calls the
``torch.utils.checkpoint`` *module*), and plain checkpointing of a BatchNorm network is subtly
wrong: the recomputation during backward runs BatchNorm's forward a second time in training mode
and so updates ``running_mean``, ``running_var`` and ``num_batches_tracked`` twice per step
(pytorch/pytorch issue 96136). Here checkpointing changes nothing but memory:

* non-reentrant ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` per stage;
* during recomputation every buffer of the stage (BatchNorm's running statistics and
  ``num_batches_tracked``, of BatchNorm2d or SyncBatchNorm alike) is swapped for a scratch copy,
  looked up when the recomputation starts (so SyncBatchNorm conversion after wrapping is fine),
  and the originals are put back untouched. In training mode BatchNorm normalises with the batch
  statistics, so the recomputed activations equal the first pass bit for bit. Under
  ``torch.compile`` no guard is passed (compile accepts only dispatch-mode contexts there, and
  AOTAutograd's recomputation does not replay buffer mutations);
* the stage's ``forward`` is replaced on the instance, so module names and state-dict keys do not
  change: a checkpoint saved under one policy loads under any other.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from unetdist.model.stages import POLICIES, select_stages

if TYPE_CHECKING:
    from unetdist.model.unet import Stage, UNet

__all__ = ["POLICIES", "apply_activation_checkpointing", "select_stages"]


@contextlib.contextmanager
def _scratch_buffers(stage: nn.Module) -> Iterator[None]:
    """Let the recomputation update throw-away copies of the stage's buffers.

    Every registered buffer (BatchNorm's ``running_mean``, ``running_var``,
    ``num_batches_tracked``) is replaced by a clone for the duration and the original object is
    put back afterwards, untouched (not even its version counter moves). Replacing the buffers,
    rather than switching ``track_running_stats`` off, keeps the recomputed ops identical to the
    first pass: BatchNorm saves its running buffers for backward, and non-reentrant checkpoint
    requires the recomputation to save exactly as many tensors as the forward did.
    """
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for module in stage.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    swapped.append((module, name, buf))
                    module._buffers[name] = buf.clone()
        yield
    finally:
        for module, name, buf in swapped:
            module._buffers[name] = buf


def _bn_guard_contexts(stage: nn.Module) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """``context_fn`` for checkpoint: nothing in the first pass, scratch buffers when recomputing."""
    return contextlib.nullcontext(), _scratch_buffers(stage)


def _checkpointed_forward(stage: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The stage's own ``forward`` under non-reentrant checkpointing with the BatchNorm guard.

    Installed as ``stage.forward``, so ``nn.Module.__call__`` still runs the stage's hooks once,
    outside the checkpointed region, and never during recomputation.
    """
    forward = type(stage).forward
    if torch.compiler.is_compiling():
        # Dynamo accepts no custom context_fn argument at all, not even the default passed by name.
        return checkpoint(forward, stage, *args, use_reentrant=False, **kwargs)
    context_fn = functools.partial(_bn_guard_contexts, stage)
    return checkpoint(forward, stage, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` wrapped this module's forward."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def _unwrap(module: nn.Module) -> None:
    if is_checkpointed(module):
        del module.__dict__["forward"]


def _wrap(module: nn.Module) -> None:
    if "forward" in module.__dict__ and not is_checkpointed(module):
        raise RuntimeError(f"{type(module).__name__}.forward is already patched by someone else; refusing to wrap")
    module.__dict__["forward"] = functools.partial(_checkpointed_forward, module)


def apply_activation_checkpointing(model: UNet, policy: str) -> UNet:
    """Set the model's activation checkpointing policy, in place.

    Each selected stage recomputes its activations during backward instead of keeping them;
    only its inputs are kept. Applying again replaces the previous policy (``none`` removes all
    wrapping); stages are never wrapped twice. Parameters, buffers, module names and state-dict
    keys are untouched.

    Args:
        model: a UNet, or any module with a ``stages()`` method returning
            ``(name, module, level)`` triples.
        policy: ``none``, ``highres`` (stages at full and half resolution, where most activation
            memory lives) or ``all`` (every stage: ``inc``, each ``downs.i`` and ``ups.j``; the
            1x1 head ``outc`` is left out because checkpointing it would save nothing).

    Returns:
        The same model object.

    Raises:
        ValueError: for an unknown policy (naming it and the valid ones).
    """
    stages: list[Stage] = list(model.stages())
    selected = set(select_stages(stages, policy))
    for name, module, _ in stages:
        _unwrap(module)
        if name in selected:
            _wrap(module)
    return model
