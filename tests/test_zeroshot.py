"""The zero-shot evaluator on models whose answer is known in advance."""
import torch
from torch.utils.data import TensorDataset

from fastclip.eval.zeroshot import topk_correct, zero_shot_eval

CLASSNAMES = ["cat", "dog", "owl", "emu", "yak", "elk"]


class OneHotTextModel(torch.nn.Module):
    """A text embeds as the one-hot of the class it names (after an optional swap of classes);
    images are passed through, so the test chooses every logit."""

    def __init__(self, swap=None):
        super().__init__()
        self.swap = swap or {}

    def encode_image(self, images, normalize=False):
        return images

    def encode_text(self, texts, normalize=False):
        out = torch.zeros(len(texts), len(CLASSNAMES))
        for row, text in enumerate(texts):
            cls = next(i for i, c in enumerate(CLASSNAMES) if c in text)
            out[row, self.swap.get(cls, cls)] = 1.0
        return out


def images_with_distinct_logits():
    """Image of class c = e_c + 0.5 e_{c+1} + 0.25 e_{c+2} + ...: no two logits tie."""
    weights = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0625, 0.03])
    labels = torch.arange(6)
    feats = torch.stack([torch.roll(weights, int(c)) for c in labels])
    return TensorDataset(feats.repeat(3, 1), labels.repeat(3))


class RawStrings(list):
    """A 'tokenized' batch that is just the strings (open_clip calls .to(device) on it)."""

    def to(self, device):
        return self


def raw_strings(texts):
    return RawStrings(texts)


def test_perfect_classifier_scores_one():
    data = images_with_distinct_logits()
    acc = zero_shot_eval(OneHotTextModel(), raw_strings, data, CLASSNAMES, ["a {}", "the {}"], "cpu", batch_size=4)
    assert acc == {"top1": 1.0, "top5": 1.0}


def test_swapped_classes_give_the_hand_computed_accuracy():
    # Texts of classes 0 and 1 swapped. Class 0 images rank [1, 0, 2, 3, 4]: top-1 miss, top-5 hit.
    # Class 1 images rank [0, 2, 3, 4, 5, 1]: miss both. Classes 2..5 are right.
    data = images_with_distinct_logits()
    acc = zero_shot_eval(OneHotTextModel(swap={0: 1, 1: 0}), raw_strings, data, CLASSNAMES, ["a {}"], "cpu",
                         batch_size=5)
    assert acc["top1"] == 4 / 6
    assert acc["top5"] == 5 / 6


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2)) == {1: 1, 2: 1}
