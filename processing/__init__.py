"""Volumes in, tensors out: readers, the volume processor, and the volume + text processor."""

from .image_processing_voxlm import (
    CT_WINDOWS,
    VolumeMetadata,
    VoxVolumeProcessor,
    colipri_volume_processor,
    dcformer_volume_processor,
    hlip_volume_processor,
    is_ct,
    m3d_volume_processor,
    merlin_volume_processor,
    released_encoder_processor,
    pad_studies,
    resize_volume,
)
from .pipeline_voxlm import VoxLMPipeline
from .processing_voxclip import VoxCLIPProcessor
from .processing_voxlm import (
    BOX_END_TOKEN,
    BOX_START_TOKEN,
    IMAGE_TOKEN,
    SEG_TOKEN,
    VoxLMProcessor,
    add_voxlm_tokens,
    format_box,
    parse_boxes,
)
from .readers import ReadLimits, Study, Volume, VolumeError, read_study, read_volume, safe_extract_zip

__all__ = [
    "CT_WINDOWS",
    "IMAGE_TOKEN",
    "SEG_TOKEN",
    "BOX_START_TOKEN",
    "BOX_END_TOKEN",
    "ReadLimits",
    "Study",
    "Volume",
    "VolumeError",
    "VolumeMetadata",
    "VoxCLIPProcessor",
    "VoxLMPipeline",
    "VoxLMProcessor",
    "VoxVolumeProcessor",
    "add_voxlm_tokens",
    "format_box",
    "is_ct",
    "m3d_volume_processor",
    "colipri_volume_processor",
    "dcformer_volume_processor",
    "hlip_volume_processor",
    "merlin_volume_processor",
    "released_encoder_processor",
    "pad_studies",
    "parse_boxes",
    "read_study",
    "read_volume",
    "resize_volume",
    "safe_extract_zip",
]
