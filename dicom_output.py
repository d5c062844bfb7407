"""A `Prediction` about a DICOM series as the objects radiologists' viewers show: a DICOM Segmentation (SEG) of its
mask on the source frames, and a Comprehensive 3D Structured Report (SR) of the question, the answer, its boxes in the
patient frame and a reference to the SEG. Both are written with highdicom, marked for research use, and name voxlm
and the model as the algorithm that made them.

    segmentation = dicom_segmentation(prediction, "hemorrhage", model_name="org/voxlm-ct")
    report = dicom_report(prediction, question, model_name="org/voxlm-ct", segmentation=segmentation)
    segmentation.save_as("seg.dcm"); report.save_as("sr.dcm")

`voxlm predict --dicom-seg-out / --dicom-sr-out` and the DICOMweb path (`voxlm.dicomweb`) call these.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re

import numpy as np

from voxlm.inference import Prediction

MANUFACTURER = "voxlm"
RESEARCH_USE = ("Research use only: generated automatically by voxlm, a vision-language model, and not verified by a "
                "physician; not for diagnostic use.")
# Codes of voxlm's own (DICOM PS3.16 8.2: private coding schemes start with "99"): what a prompted segment shows is
# the words the user asked for, which no standard code names.
PRIVATE_SCHEME = "99VOXLM"
# DICOM LO values (labels, model names) hold at most 64 characters.
LONG_STRING = 64
_ASKED_FOR = re.compile(
    r"^(?:please\s+)?(?:can you\s+|could you\s+)?(?:segment|outline|delineate|mask|contour|find|locate|show|mark)"
    r"\s+(?:me\s+)?(?:the\s+|any\s+|all\s+)?(?P<target>.+?)"
    r"(?:\s+(?:in|on|of|within)\s+(?:this|the|these)\b.*)?[\s.?!]*$",
    re.IGNORECASE,
)


def _highdicom():
    try:
        import highdicom
    except ImportError as error:  # an optional dependency: pip install 'voxlm[dicom]'
        raise ImportError("DICOM SEG and SR output needs highdicom: pip install 'voxlm[dicom]'") from error
    return highdicom


def segment_label(question: str) -> str:
    """What a segmentation request asks for, as a segment label: "Segment the hemorrhage in this CT." -> "hemorrhage";
    any other question is used as it is. At most 64 characters (a DICOM LO)."""
    question = " ".join(question.split())
    match = _ASKED_FOR.match(question)
    return (match["target"] if match else question.rstrip(" .?!"))[:LONG_STRING]


def voxlm_version() -> str:
    try:
        return importlib.metadata.version("voxlm")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def model_label(model_name: str) -> str:
    """The model's Hub id or folder as a DICOM LO (its last 64 characters): the `ManufacturerModelName` of what voxlm
    writes, by which a later run recognises its own results."""
    return str(model_name)[-LONG_STRING:]


def source_slices(prediction: Prediction) -> list:
    """The DICOM slices (headers) of the series the prediction's mask and boxes are on, in the order of its source
    grid's third axis; a `ValueError` when the input was not DICOM."""
    slices = prediction.volume.dicom_slices
    if not slices:
        raise ValueError(f"{prediction.volume.source} is not a DICOM series: DICOM SEG and SR outputs reference the "
                         "source series, so the input must be a DICOM folder, .zip or DICOMweb study")
    return slices


def _algorithm(model_name: str):
    highdicom = _highdicom()
    from pydicom.sr.codedict import codes

    return highdicom.AlgorithmIdentificationSequence(
        name=f"{MANUFACTURER} {model_label(model_name)}"[:LONG_STRING], family=codes.cid7162.ArtificialIntelligence,
        version=voxlm_version(), source=MANUFACTURER,
    )


def _equipment(model_name: str) -> dict:
    """The equipment attributes of every object voxlm writes: the model is the device."""
    return dict(manufacturer=MANUFACTURER, manufacturer_model_name=model_label(model_name),
                software_versions=voxlm_version())


def dicom_segmentation(prediction: Prediction, label: str, model_name: str, series_number: int = 9701):
    """The prediction's mask as a binary DICOM Segmentation on the source series' frames.

    Args:
        prediction (`Prediction`): from `predict` on a DICOM series or study, with an answer holding `[SEG]`.
        label (`str`): the segment label, e.g. `segment_label(question)`.
        model_name (`str`): the model's Hub id or folder, named as the algorithm.
        series_number (`int`, defaults to 9701): the new series' number.

    Returns:
        `highdicom.seg.Segmentation`: one frame per source slice that holds mask voxels (frame positions and the
        Frame of Reference are the source slices'), in the source study, referencing the source series.
    """
    highdicom = _highdicom()
    if prediction.mask is None:
        raise ValueError("The answer holds no [SEG], so there is no mask to write as a DICOM Segmentation")
    slices = source_slices(prediction)
    if not prediction.mask.any():
        raise ValueError("The predicted mask is empty: a DICOM Segmentation needs at least one segmented voxel")
    # The source grid is (columns j, rows i, slices k); a SEG's frames are (k, rows i, columns j).
    frames = np.ascontiguousarray(np.transpose(prediction.mask, (2, 1, 0))).astype(bool)
    # A CodeValue (SH) holds 16 characters; the label itself is the code's meaning.
    target = highdicom.sr.CodedConcept(value=re.sub(r"\W+", "-", label.lower()).strip("-")[:16] or "target",
                                       scheme_designator=PRIVATE_SCHEME, meaning=label)
    description = highdicom.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=highdicom.sr.CodedConcept(
            value="prompted", scheme_designator=PRIVATE_SCHEME, meaning="What the prompt asked to segment"),
        segmented_property_type=target, algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(model_name),
    )
    return highdicom.seg.Segmentation(
        source_images=slices, pixel_array=frames, segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=highdicom.UID(), series_number=series_number,
        sop_instance_uid=highdicom.UID(), instance_number=1, series_description=f"{MANUFACTURER}: {label}"[:LONG_STRING],
        content_description="voxlm mask (research use)", content_label="VOXLM", content_qualification="RESEARCH",
        # A model has no serial number (Type 1 in a SEG): the digest of its name stands in for one.
        device_serial_number=hashlib.sha1(str(model_name).encode()).hexdigest()[:16], **_equipment(model_name),
    )


def ras_to_lps(points) -> np.ndarray:
    """World points `(N, 3)` in RAS mm -> the DICOM patient frame (LPS mm): x and y change sign."""
    return np.asarray(points, dtype=np.float64) * np.array([-1.0, -1.0, 1.0])


def dicom_report(prediction: Prediction, question: str, model_name: str, segmentation=None,
                 series_number: int = 9702):
    """The question and the answer as a Comprehensive 3D Structured Report in the source study.

    Content: a "Diagnostic Imaging Report" container holding the research-use statement, the question (Request), and
    a Findings container with the answer (Finding), each box as a 3D spatial coordinate (a MULTIPOINT of its two
    opposite corners, in LPS mm in the source's Frame of Reference) and, when given, the SEG's segment.

    Args:
        prediction (`Prediction`): from `predict` on a DICOM series or study.
        question (`str`): what was asked.
        model_name (`str`): the model's Hub id or folder.
        segmentation (`highdicom.seg.Segmentation`, *optional*): the SEG written for the same answer, referenced.
        series_number (`int`, defaults to 9702): the new series' number.

    Returns:
        `highdicom.sr.Comprehensive3DSR`
    """
    highdicom = _highdicom()
    from pydicom.sr.codedict import codes

    sr = highdicom.sr
    slices = source_slices(prediction)
    frame_of_reference = slices[0].FrameOfReferenceUID
    findings = sr.ContainerContentItem(name=codes.DCM.Findings, relationship_type="CONTAINS")
    findings.ContentSequence = [sr.TextContentItem(name=codes.DCM.Finding, value=prediction.text,
                                                   relationship_type="CONTAINS")]
    for corners in prediction.boxes_world:  # (2, 3) RAS mm
        findings.ContentSequence.append(sr.Scoord3DContentItem(
            name=codes.DCM.ImageRegion, graphic_type=sr.GraphicTypeValues3D.MULTIPOINT,
            graphic_data=ras_to_lps(corners), frame_of_reference_uid=frame_of_reference, relationship_type="CONTAINS"))
    if segmentation is not None:
        findings.ContentSequence.append(sr.ImageContentItem(
            name=codes.DCM.ReferencedSegment, referenced_sop_class_uid=segmentation.SOPClassUID,
            referenced_sop_instance_uid=segmentation.SOPInstanceUID, referenced_segment_numbers=1,
            relationship_type="CONTAINS"))
    root = sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    root.ContentSequence = [
        sr.TextContentItem(name=codes.DCM.Comment, value=RESEARCH_USE, relationship_type="CONTAINS"),
        sr.TextContentItem(name=codes.DCM.Request, value=" ".join(question.split()), relationship_type="CONTAINS"),
        findings,
    ]
    evidence = list(slices) + ([segmentation] if segmentation is not None else [])
    return sr.Comprehensive3DSR(
        evidence=evidence, content=root, series_instance_uid=highdicom.UID(), series_number=series_number,
        sop_instance_uid=highdicom.UID(), instance_number=1, is_complete=True, series_description="voxlm answer",
        content_qualification="RESEARCH", **_equipment(model_name),
    )


def write_dicom_results(prediction: Prediction, question: str, model_name: str, *, seg_path=None, sr_path=None,
                        label: str | None = None) -> tuple:
    """Build (and write where paths are given) the SEG, when the answer holds a mask, and the SR that references it.

    Returns:
        `(segmentation or None, report)`.
    """
    segmentation = None
    if prediction.mask is not None and prediction.mask.any():
        segmentation = dicom_segmentation(prediction, label or segment_label(question), model_name)
        if seg_path is not None:
            segmentation.save_as(seg_path)
    report = dicom_report(prediction, question, model_name, segmentation)
    if sr_path is not None:
        report.save_as(sr_path)
    return segmentation, report
