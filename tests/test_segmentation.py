import pytest
import torch

from vig.dense.metrics import confusion_matrix, segmentation_scores
from vig.dense.segmentation import slide_logits
from vig.dense.transforms import reduce_zero_label


def test_miou_macc_aacc_match_hand_computed_values():
    label = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 2], [2, 0, 0, 1]])
    # Counting the 10 labelled pixels (rows = truth, columns = prediction):
    #   class 0: 4 pixels -> 3 right, 1 as class 1;  class 1: 4 -> 3 right, 1 as 2;  class 2: 2 -> 1 right, 1 as 0.
    confusion = confusion_matrix(prediction, label, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 2], expected[2, 2], expected[2, 0] = 3, 1, 3, 1, 1, 1
    assert torch.equal(confusion, expected)
    scores = segmentation_scores(confusion)
    # IoU = TP / (TP + FP + FN): 0 -> 3/(3+1+1), 1 -> 3/(3+1+1), 2 -> 1/(1+1+1); class 3 absent (NaN, skipped).
    iou = [3 / 5, 3 / 5, 1 / 3]
    assert scores["IoU"][:3] == pytest.approx(iou) and scores["IoU"][3] is None
    assert scores["mIoU"] == pytest.approx(sum(iou) / 3)
    assert scores["mAcc"] == pytest.approx((3 / 4 + 3 / 4 + 1 / 2) / 3)
    assert scores["aAcc"] == pytest.approx(7 / 10)


def test_confusion_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="reduce_zero_label"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), num_classes=4)


def test_reduce_zero_label_ignores_background_and_shifts_classes():
    label = torch.tensor([[0, 1, 2], [150, 255, 0]], dtype=torch.uint8)
    assert reduce_zero_label(label).tolist() == [[255, 0, 1], [149, 255, 255]]


def test_sliding_window_equals_whole_image_for_a_pixelwise_model():
    weight = torch.randn(5, 3, 1, 1)
    pixelwise = lambda x: torch.nn.functional.conv2d(x, weight)  # noqa: E731
    images = torch.rand(2, 3, 37, 50)
    whole = pixelwise(images)
    assert torch.allclose(slide_logits(pixelwise, images, 5, crop_size=(16, 16), stride=(11, 11)), whole, atol=1e-6)
    # A crop larger than the image: padded for the forward, cut back.
    assert torch.allclose(slide_logits(pixelwise, images, 5, crop_size=(64, 64), stride=(32, 32)), whole, atol=1e-6)
