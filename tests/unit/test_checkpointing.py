"""Activation checkpointing changes memory and nothing else: same step, same BN statistics, same keys."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import unetdist.parallel.checkpointing as ckpt
from unetdist import __version__, apply_activation_checkpointing
from unetdist.parallel.checkpointing import POLICIES, is_checkpointed, select_stages
from unetdist.model import UNet
from unetdist.model.flops import train_step_flops

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _small_model(norm: str = "batch") -> UNet:
    """Depth 3, so that ``highres`` (levels 0-1) and ``all`` select different stages."""
    torch.manual_seed(0)
    return UNet(in_channels=2, num_classes=3, base_width=8, depth=3, norm=norm)


def _train_step(
    model: nn.Module, policy: str, convert: Callable[[nn.Module], nn.Module] = lambda m: m
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], nn.Module]:
    """One forward, cross-entropy and backward on fixed data; returns loss, grads, buffers, model."""
    model = copy.deepcopy(model).train()
    apply_activation_checkpointing(model, policy)
    converted = convert(model)
    if not hasattr(converted, "_orig_mod"):
        model = converted  # SyncBatchNorm conversion may return a new module; compile wraps the old
    gen = torch.Generator().manual_seed(1)
    channels, classes = model.hparams["in_channels"], model.hparams["num_classes"]
    x = torch.randn(2, channels, 37, 45, generator=gen)  # odd sizes: the padding path is recomputed too
    target = torch.randint(0, classes, (2, 37, 45), generator=gen)
    loss = F.cross_entropy(converted(x), target)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return loss.detach(), grads, buffers, model


def _assert_same_step(ref: tuple, got: tuple) -> None:
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    assert got[1].keys() == ref[1].keys() and got[2].keys() == ref[2].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-5, atol=1e-8, msg=name)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("policy", ["highres", "all"])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_step_identical_to_no_checkpointing(policy: str, norm: str) -> None:
    model = _small_model(norm)
    reference = _train_step(model, "none")
    result = _train_step(model, policy)
    _assert_same_step(reference, result)
    if norm == "batch":
        bn_buffers = [n for n in result[2] if n.endswith(BN_BUFFERS)]
        assert len(bn_buffers) == 3 * 2 * (1 + 2 * 3)  # three buffers, two BNs per stage, seven stages
        assert all(result[2][n].item() == 1 for n in bn_buffers if n.endswith("num_batches_tracked"))
        # The guard puts the original buffer objects back: the model still owns its buffers.
        trained = result[3]
        assert all(b is trained.get_buffer(n) for n, b in trained.named_buffers())
        assert all(m.track_running_stats for m in trained.modules() if isinstance(m, nn.BatchNorm2d))


def test_syncbatchnorm_converted_after_wrapping_is_guarded_too() -> None:
    """The guard looks up buffers at recomputation time, so the order of conversion does not matter."""
    model = _small_model()
    reference = _train_step(model, "none")
    result = _train_step(model, "all", nn.SyncBatchNorm.convert_sync_batchnorm)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in result[3].modules())
    _assert_same_step(reference, result)


def test_plain_checkpoint_double_counts_batchnorm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trap is real: without the guard the recomputation updates the running statistics again."""
    monkeypatch.setattr(ckpt, "_bn_guard_contexts", lambda stage: (contextlib.nullcontext(), contextlib.nullcontext()))
    model = _small_model()
    reference = _train_step(model, "none")
    loss, grads, buffers, _ = _train_step(model, "all")
    torch.testing.assert_close(loss, reference[0])  # forward and gradients are still right ...
    assert buffers["inc.double_conv.1.num_batches_tracked"].item() == 2  # ... but BN counted the batch twice
    with pytest.raises(AssertionError):
        torch.testing.assert_close(buffers["inc.double_conv.1.running_mean"], reference[2]["inc.double_conv.1.running_mean"])
    with pytest.raises(AssertionError):
        _assert_same_step(reference, (loss, grads, buffers))


def test_eval_and_no_grad_outputs_unchanged() -> None:
    model = _small_model()
    _train_step(model, "none")  # nothing to learn from it; just exercise the model once
    x = torch.randn(1, 2, 33, 40)
    with torch.no_grad():
        expected = model.eval()(x)
        got = apply_activation_checkpointing(copy.deepcopy(model), "all").eval()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_state_dict_keys_and_module_names_unchanged() -> None:
    base = _small_model()
    keys = list(base.state_dict())
    names = [n for n, _ in base.named_modules()]
    saved = {}
    for policy in POLICIES:
        model = apply_activation_checkpointing(copy.deepcopy(base), policy)
        assert list(model.state_dict()) == keys, policy
        assert [n for n, _ in model.named_modules()] == names, policy
        saved[policy] = model.state_dict()
    for src in POLICIES:  # a checkpoint written under one policy loads under every other
        for dst in POLICIES:
            apply_activation_checkpointing(copy.deepcopy(base), dst).load_state_dict(saved[src], strict=True)


def test_unknown_policy_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"'selective'.*none, highres, all"):
        apply_activation_checkpointing(_small_model(), "selective")


def test_reapplying_never_double_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_checkpoint = ckpt.checkpoint

    def counting_checkpoint(fn: Callable, module: nn.Module, *args: object, **kwargs: object) -> object:
        calls.append(type(module).__name__)
        return real_checkpoint(fn, module, *args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", counting_checkpoint)
    model = _small_model()
    x = torch.randn(2, 2, 24, 24)
    expected = {
        "all": ["DoubleConv", "Down", "Down", "Down", "Up", "Up", "Up"],
        "highres": ["DoubleConv", "Down", "Up", "Up"],
        "none": [],
    }
    for policy in ["all", "all", "highres", "highres", "none", "all"]:
        apply_activation_checkpointing(model, policy)
        calls.clear()
        model(x)
        assert calls == expected[policy], policy
        wrapped = [s.name for s in model.stages() if is_checkpointed(s.module)]
        assert wrapped == select_stages(model.stages(), policy)


def test_policies_select_by_level() -> None:
    stages = UNet(base_width=4, depth=4).stages()
    assert select_stages(stages, "none") == []
    assert select_stages(stages, "highres") == ["inc", "downs.0", "ups.2", "ups.3"]
    assert select_stages(stages, "all") == ["inc", "downs.0", "downs.1", "downs.2", "downs.3",
                                            "ups.0", "ups.1", "ups.2", "ups.3"]


def test_public_api() -> None:
    assert __version__ == "0.1.0"
    model = UNet(base_width=4, depth=1)
    assert apply_activation_checkpointing(model, "all") is model


# ---- memory and FLOPs at the design size: 256 x 256, batch 2, the default width 64 ----


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    """Bytes the autograd graph keeps for backward after forward + loss, counted per storage.

    Every tensor an op saves for backward passes the pack hook, including the stage inputs that
    non-reentrant checkpoint keeps (it saves them outside its own hooks). One storage is often
    saved several times (an in-place ReLU output is saved by the ReLU and by the next
    convolution; views share their base's storage) but occupies memory once, so each distinct
    storage counts once. Parameters are excluded: they are held whatever the policy. Storages
    are keyed by address, which is unique while the graph keeps them all alive.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.cross_entropy(model(x), target)
    return sum(kept.values())


def test_saved_bytes_at_256_batch_2() -> None:
    torch.manual_seed(0)
    model = UNet()  # default width 64
    x = torch.randn(2, 1, 256, 256)
    target = torch.randint(0, 2, (2, 256, 256))
    kept = {}
    for policy in ("none", "highres", "all"):
        kept[policy] = saved_activation_bytes(apply_activation_checkpointing(model, policy), x, target)
    # Under `all` the graph still holds every stage input/output feature map; at least the two
    # 64-channel full-resolution ones (inc's output and the last Up's output): the hook sees them.
    full_res_map = 2 * 64 * 256 * 256 * 4
    assert kept["all"] >= 2 * full_res_map
    assert kept["all"] <= 0.30 * kept["none"], kept
    assert kept["all"] < kept["highres"] < kept["none"], kept


def _counted_step_flops(policy: str) -> int:
    """FlopCounterMode over forward + loss + backward, on the meta device (shapes only, no arithmetic)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = UNet()
        x = torch.randn(2, 1, 256, 256)
        target = torch.randint(0, 2, (2, 256, 256))
    apply_activation_checkpointing(model, policy)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), target).backward()
    return counter.get_total_flops()


def test_step_flops_rise_at_most_40_percent() -> None:
    flops = {policy: _counted_step_flops(policy) for policy in ("none", "highres", "all")}
    assert flops["none"] < flops["highres"] < flops["all"] <= 1.40 * flops["none"], flops
    for policy, counted in flops.items():  # and the analytic count used for MFU agrees exactly
        assert counted == train_step_flops(256, 256, 2, policy=policy), policy


@pytest.mark.slow
def test_compiled_checkpointed_step_matches() -> None:
    """Under torch.compile (aot_eager: Dynamo + AOTAutograd, no C++ toolchain) the step is unchanged."""
    torch.manual_seed(0)
    model = UNet(base_width=4, depth=2)
    reference = _train_step(model, "none")
    result = _train_step(model, "all", lambda m: torch.compile(m, backend="aot_eager"))
    _assert_same_step(reference, result)
