"""Model cards for the three model kinds render with `huggingface_hub.ModelCard`: lineage, intended use and limits,
preprocessing, measured results as `model-index`, memory, and how to load."""

import pytest
import yaml
from tiny_models import tiny_voxlm_config

from voxlm.model_cards import (
    memory_summary,
    preprocessing_summary,
    render_adapter_card,
    render_voxclip_card,
    render_voxlm_card,
)
from voxlm.modeling import VoxLMForConditionalGeneration
from voxlm.processing import VoxVolumeProcessor

RESULT = dict(task="retrieval", task_type="image-text-retrieval", dataset="voxlm-phantoms", split="test",
              metric="recall@5", variant="image to report, pool 100", value=0.4321)
COMMON = dict(data_source="phantoms", stages="a stage", limits="Synthetic data only.", preprocessing="brain window",
              memory="12 MiB", repo_or_path="runs/x/final")


def front_matter(card) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


@pytest.mark.parametrize(
    "render, fields, library, lineage",
    [
        (render_voxlm_card, dict(vision_source="VoxCLIP run", llm_source="tiny-llama"), "transformers",
         ["| vision encoder | VoxCLIP run |", "| language model | tiny-llama |"]),
        (render_voxclip_card, dict(vision_source="random VoxViT", text_source="MiniLM", objectives="infonce"),
         "transformers",
         ["| vision encoder | random VoxViT |", "| text encoder | MiniLM |", "| objectives | infonce |"]),
        (render_adapter_card, dict(base_source="runs/align/final", base_path="runs/align/final", lora="r=16",
                                   modules_to_save="seg_head"), "peft",
         ["| base VoxLM | runs/align/final |", "| LoRA | r=16 |",
          "| trained in full (`modules_to_save`) | seg_head |"]),
    ],
)
def test_each_kind_renders_lineage_use_results_memory_and_loading(render, fields, library, lineage):
    card = render("voxlm-test", [RESULT], **COMMON, **fields)
    text = str(card)
    metadata = front_matter(card)
    assert metadata["library_name"] == library and "voxlm" in metadata["tags"]
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.4321
    for row in lineage:
        assert row in text
    assert "Out of scope: clinical decision-making, diagnosis" in text
    assert "Synthetic data only." in text and "brain window" in text and "12 MiB" in text
    assert "| retrieval | voxlm-phantoms | test | recall@5 (image to report, pool 100) | 0.4321 |" in text
    assert "## How to load" in text and '"runs/x/final"' in text and "{{" not in text


def test_cards_without_results_say_how_to_measure_them():
    card = render_voxclip_card("c", [], vision_source="v", text_source="t", objectives="o", **COMMON)
    assert "model-index" not in front_matter(card)
    assert "voxlm evaluate --model runs/x/final" in str(card)


def test_preprocessing_and_memory_are_read_from_the_objects():
    text = preprocessing_summary(VoxVolumeProcessor(image_size=(8, 16, 16), ct_window="subdural"))
    assert "'subdural' Hounsfield window" in text and "[8, 16, 16]" in text and "percentiles 0.5-99.5" in text
    assert "else 'CT', except that a volume without air" in text and "is normalised as MR" in text
    assert "else 'MR'," in preprocessing_summary(VoxVolumeProcessor(modality="MR"))
    model = VoxLMForConditionalGeneration(tiny_voxlm_config())
    count = sum(p.numel() for p in model.parameters())
    assert f"{count / 1e6:.2f} M parameters" in memory_summary(model)
    assert f"{count * 4 / 2**20:.1f} MiB of float32" in memory_summary(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    next(model.parameters()).requires_grad_(True)
    trainable = next(model.parameters()).numel()
    assert f"{trainable / 1e6:.2f} M trainable parameters" in memory_summary(model, trainable_only=True)


def test_table_cells_escape_pipes():
    from voxlm.model_cards import table_cell

    assert table_cell(r"language_model\..*\.(q_proj|v_proj)") == r"language_model\..*\.(q_proj\|v_proj)"
