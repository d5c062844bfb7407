"""Zero-shot classification with prompt ensembles."""

import torch
import torch.nn.functional as F

from voxlm.evaluation.zero_shot import class_embeddings, zero_shot_probabilities


class FakeProcessor:
    """Encodes each text as the index of its first word in a small vocabulary, so embeddings are predictable."""

    vocabulary = ["bleed", "normal", "findings:", "impression:"]

    def __call__(self, text):
        texts = text
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

    def get_image_features(self, pixel_values, scan_mask=None):
        return pixel_values.flatten(1)[:, :4]


def test_class_embedding_is_the_normalised_mean_over_prompts_and_templates():
    classes = class_embeddings(FakeClip(), FakeProcessor(), {"bleed": ["bleed"], "normal": ["normal"]},
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


def tiny_study_clip():
    """A tiny study-mode VoxCLIP (scan then study attention, up to 3 scans, max pooling) with a 1-layer BERT."""
    from tiny_models import tiny_vision_config

    from voxlm.modeling import VoxCLIPConfig, VoxCLIPModel

    torch.manual_seed(0)
    text = dict(model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                vocab_size=99, max_position_embeddings=64)
    vision = tiny_vision_config(max_scans=3, attention_levels=["scan", "study"], pooling="max")
    model = VoxCLIPModel(VoxCLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).eval()
    model.logit_scale.data.fill_(0.0)  # scale 1: random features give soft probabilities that show every change
    return model


def test_zero_shot_of_a_study_reads_its_real_scans_only():
    model = tiny_study_clip()
    classes = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    studies = torch.rand(2, 3, 1, 8, 16, 16)
    scan_mask = torch.tensor([[True, True, False], [True, True, True]])
    probabilities = zero_shot_probabilities(model, studies, classes, scan_mask=scan_mask)
    assert probabilities.shape == (2, 3)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))
    # the padded study is classified as the two-scan study it holds; read as three scans it would not be
    torch.testing.assert_close(probabilities[:1], zero_shot_probabilities(model, studies[:1, :2], classes), atol=1e-5,
                               rtol=0)
    assert not torch.allclose(zero_shot_probabilities(model, studies, classes)[0], probabilities[0], atol=1e-4)
    # a one-scan study is classified as its volume
    torch.testing.assert_close(zero_shot_probabilities(model, studies[:, :1], classes),
                               zero_shot_probabilities(model, studies[:, 0], classes), atol=1e-5, rtol=0)
