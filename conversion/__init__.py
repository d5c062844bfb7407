"""Released checkpoints of other projects converted into voxlm folders (`voxlm convert`): weights shard by shard,
the config, the processor that reproduces the source's preprocessing and prompts, the tokenizer and a model card.
The key maps and configs are the models' business (`voxlm.modeling.convert_m3d`); the folders, which hold
processors, are assembled here."""

from voxlm.modeling.convert_m3d import checkpoint_files

from .checkpoints import convert_shards, resolve_source
from .colipri import convert_colipri
from .dcformer_siglip import convert_dcformer_siglip
from .hlip import convert_hlip
from .m3d import convert_m3d_clip, convert_m3d_lamed
from .med3dvlm import convert_med3dvlm
from .merlin import convert_merlin

__all__ = ["checkpoint_files", "convert_colipri", "convert_dcformer_siglip", "convert_hlip", "convert_m3d_clip",
           "convert_m3d_lamed", "convert_med3dvlm", "convert_merlin", "convert_shards", "resolve_source"]
