import torch

from unetdist.train.metrics import ConfusionCounter, soft_dice_loss


def _logits_for(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float() * 10


def test_counts_match_hand_computed_case() -> None:
    target = torch.tensor([[[0, 1, 1], [0, 2, 2]]])
    pred = torch.tensor([[[0, 1, 0], [1, 2, 2]]])
    counter = ConfusionCounter(3, torch.device("cpu"))
    counter.update(_logits_for(pred, 3), target, torch.tensor(0.0))
    m = counter.summary()
    # class 1: tp=1, fp=1 (pixel (1,0)), fn=1 (pixel (0,2)) -> dice 2/4, iou 1/3
    assert abs(m["dice/class_1"] - 0.5) < 1e-12
    assert abs(m["iou/class_1"] - 1 / 3) < 1e-12
    # class 2: perfect
    assert m["dice/class_2"] == 1.0
    # foreground (any class != 0): true fg = 4 pixels, pred fg = 4, overlap = 3 -> dice 6/8
    assert abs(m["dice/foreground"] - 0.75) < 1e-12


def test_counts_add_up_over_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (4, 8, 8), generator=gen)
    logits = torch.randn(4, 2, 8, 8, generator=gen)
    whole = ConfusionCounter(2, torch.device("cpu"))
    whole.update(logits, target, torch.tensor(0.0))
    split = ConfusionCounter(2, torch.device("cpu"))
    split.update(logits[:1], target[:1], torch.tensor(0.0))
    split.update(logits[1:], target[1:], torch.tensor(0.0))
    assert torch.equal(whole.counts, split.counts)


def test_soft_dice_is_a_per_sample_mean() -> None:
    """Why it matters: the mean over DDP ranks must equal the loss of the global batch."""
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (4, 8, 8), generator=gen)
    logits = torch.randn(4, 3, 8, 8, generator=gen)
    halves = (soft_dice_loss(logits[:2], target[:2]) + soft_dice_loss(logits[2:], target[2:])) / 2
    torch.testing.assert_close(halves, soft_dice_loss(logits, target), rtol=1e-6, atol=1e-7)
    perfect = soft_dice_loss(_logits_for(target, 3) * 10, target)
    assert perfect < 1e-3
