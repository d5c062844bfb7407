"""Released checkpoints of other projects converted into voxlm folders (`voxlm convert`): weights shard by shard,
the config, the processor that reproduces the source's preprocessing and prompts, the tokenizer and a model card.
The key maps and configs are the models' business (`voxlm.modeling.convert_m3d`); the folders, which hold
processors, are assembled here."""

from voxlm.modeling.convert_m3d import checkpoint_files

from .checkpoints import convert_shards, resolve_source
from .dcformer_siglip import convert_dcformer_siglip
from .m3d import convert_m3d_clip, convert_m3d_lamed

__all__ = ["checkpoint_files", "convert_dcformer_siglip", "convert_m3d_clip", "convert_m3d_lamed", "convert_shards",
           "resolve_source"]
