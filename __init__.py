"""voxlm: Hub-native 3D medical vision-language models.

Importing voxlm registers every voxlm config, model and processor with the transformers Auto classes,
so ``AutoModel.from_pretrained(folder)`` works on a saved voxlm folder.
"""

__version__ = "0.1.0"
