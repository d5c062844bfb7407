"""Zero-shot classification with prompt ensembles."""

import torch
import torch.nn.functional as F

from voxlm.evaluation.zero_shot import class_embeddings, zero_shot_probabilities


class FakeTokenizer:
    """Encodes each text as the index of its first word in a small vocabulary, so embeddings are predictable."""

    vocabulary = ["bleed", "normal", "findings:", "impression:"]

    def __call__(self, texts, **kwargs):
        ids = torch.tensor([[self.vocabulary.index(t.split()[0].lower()) if t.split()[0].lower() in self.vocabulary
                             else 0] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class FakeClip(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.0))
        self.table = torch.eye(4)

    def get_text_features(self, input_ids, attention_mask):
        return self.table[input_ids[:, 0]]

    def get_image_features(self, pixel_values):
        return pixel_values.flatten(1)[:, :4]


def test_class_embedding_is_the_normalised_mean_over_prompts_and_templates():
    classes = class_embeddings(FakeClip(), FakeTokenizer(), {"bleed": ["bleed"], "normal": ["normal"]},
                               templates=("{}", "Findings: {}"))
    expected_bleed = F.normalize(torch.tensor([1.0, 0, 1.0, 0]), dim=0)  # "bleed" and "Findings: bleed"
    torch.testing.assert_close(classes[0], expected_bleed)
    assert classes.shape == (2, 4)


def test_probabilities_follow_the_closest_class():
    classes = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    volumes = torch.zeros(2, 1, 2, 2, 2)
    volumes.view(2, -1)[0, 0] = 1.0
    volumes.view(2, -1)[1, 1] = 1.0
    probabilities = zero_shot_probabilities(FakeClip(), volumes, classes)
    assert probabilities.argmax(dim=1).tolist() == [0, 1]
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))
