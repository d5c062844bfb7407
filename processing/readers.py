"""Read CT and MRI volumes from files or arrays into one canonical layout, or fail with a clear `VolumeError`.

Canonical layout: the array is reoriented to RAS (nibabel's orientation tools), then its axes are reversed so that depth
(the superior-inferior axis, axial slices) comes first: `(D, H, W) = (S, A, R)`. The original affine and the
orientation transform are kept, so a mask predicted in the canonical layout maps back onto the file's own grid.

Readers are the field's: nibabel (NIfTI), pydicom (DICOM series, folder or `.zip`), SimpleITK (NRRD, MHA/MHD), numpy
(`.npy`, never unpickled). Every reader checks the header before it allocates the data: the voxel count
(`max_voxels`) and the bytes the read will hold (`ReadLimits`: decoded data, rescaled copies, the float32 canonical
array, unpacked archives, file counts). Detached data files (NRRD `data file`, MetaImage `ElementDataFile`) must be
regular files beside their header, so a header cannot make voxlm read other files. A `MemoryError` is reported as
such, never as a corrupt file.

A study is several series of one examination: `read_study` reads a folder or `.zip` of DICOM files grouped by
`SeriesInstanceUID`, or a list of files (each NIfTI / NRRD / `.npy` file one series, loose DICOM slices grouped by
series), into a `Study` of canonical volumes in reading order.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import logging
import math
import os
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

# Optional readers: the processor also runs as remote code in a process without voxlm or its dependencies, where
# NIfTI and NumPy volumes need only nibabel and numpy; DICOM needs pydicom and NRRD / MetaImage SimpleITK, and a file
# that needs a missing one is refused with the install command (`_reader`). The `try` keeps transformers' remote-code
# import check from demanding them.
try:
    import pydicom
except ImportError:
    pydicom = None
try:
    import SimpleITK as sitk
except ImportError:
    sitk = None

DEFAULT_MAX_VOXELS = 1024**3  # a 1024^3 volume: far above any CT, small enough to refuse hostile headers
NAN_POLICIES = ("error", "zero")
# RAS voxel axes -> canonical (S, A, R): reverse them.
CANONICAL_AXES = (2, 1, 0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip")
# A NRRD / MetaImage header is a few KB of text, a detached LIST of 10,000 file names about 1 MB: more is not a header.
MAX_HEADER_BYTES = 2**20
# sform and qform entries (mm, mm per voxel) that differ by more than this are a disagreement worth a warning; the
# qform's float32 quaternion alone rounds by ~1e-5.
AFFINE_TOLERANCE = 1e-2
DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"

logger = logging.getLogger(__name__)


class VolumeError(ValueError):
    """A volume that voxlm cannot use; the message names the source and the problem."""


def _reader(module, package: str, source: str, what: str):
    """`module` (an optional reader imported above), or a `VolumeError` that says how to install it."""
    if module is None:
        raise VolumeError(f"{source}: reading {what} needs the `{package}` package (pip install {package})")
    return module


@dataclass(frozen=True)
class ReadLimits:
    """What one read may take, checked from headers before the work starts. Raise a field for a genuine file; the
    Space sets its own from environment variables.

    Args:
        max_bytes (`int`, defaults to 4 GiB): memory for the arrays of one read, added up from the header before any
            voxel is read: the decoded data, its rescaled copy (NIfTI scaling makes float64) and the float32 canonical
            array. The series of one study share it.
        max_unpacked_bytes (`int`, defaults to 4 GiB): bytes one read may unpack: the entries of a `.zip` (extracted
            to a temporary folder, removed after) and deflated DICOM files (inflated in memory, each within
            `max_bytes` too).
        max_files (`int`, defaults to 10,000): entries of a `.zip`, files in a DICOM folder or in a list, data files
            named by one NRRD / MetaImage header; counted before any is read.
    """

    max_bytes: int = 4 * 2**30
    max_unpacked_bytes: int = 4 * 2**30
    max_files: int = 10_000


def _mib(size: float) -> str:
    return f"{size / 2**20:,.{1 if size < 10 * 2**20 else 0}f} MiB"


def _check_bytes(needed: int, limits: ReadLimits, source: str, what: str) -> None:
    if needed > limits.max_bytes:
        raise VolumeError(
            f"{source}: reading it takes about {_mib(needed)} ({what}), above the "
            f"{_mib(limits.max_bytes)} this read may take; raise ReadLimits.max_bytes if it is genuine"
        )


def _check_files(count: int, limits: ReadLimits, source: str, what: str) -> None:
    if count > limits.max_files:
        raise VolumeError(
            f"{source}: {what} {count:,} files, more than {limits.max_files:,}; raise ReadLimits.max_files if this is "
            "genuine"
        )


def _out_of_memory(source: str, limits: ReadLimits) -> VolumeError:
    return VolumeError(
        f"{source}: the volume does not fit in this process's memory, although it is within ReadLimits.max_bytes "
        f"({_mib(limits.max_bytes)}); give the process more memory, or lower max_bytes so that such "
        "volumes are refused before reading"
    )


@contextlib.contextmanager
def _decoding(source: str, problem: str):
    """A decoder library's errors as a `VolumeError` naming the source and the problem. `MemoryError` passes through:
    the public readers report it as a memory problem, never as a corrupt file."""
    try:
        yield
    except (MemoryError, VolumeError):
        raise
    except Exception as error:  # nibabel, numpy, pydicom and SimpleITK raise many types for bad files
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise VolumeError(f"{source}: {problem} ({detail})") from error


def _check_regular_file(path: Path, source: str, what: str) -> None:
    """Refuse a path that is not a regular file (a FIFO, a device such as /dev/urandom, a folder): such paths never
    end, block, or are not data."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise VolumeError(f"{source}: {what} cannot be opened ({error.strerror})") from error
    if not stat.S_ISREG(mode):
        raise VolumeError(f"{source}: {what} is not a regular file (a device, pipe or folder); give a file")


@dataclass
class Volume:
    """A volume in the canonical layout, with what it takes to map results back to the source grid.

    Args:
        array (`np.ndarray` of shape `(D, H, W)`, float32): the voxels, depth (S) first.
        affine (`np.ndarray` of shape `(4, 4)`): the source's voxel-to-RAS-world affine (for the source's own axes).
        spacing (`tuple[float, float, float]`): voxel size in mm along `(D, H, W)`.
        source (`str`): the file name, or "array input".
        orientation (`np.ndarray` of shape `(3, 2)`): nibabel orientation transform from the source axes to RAS.
        source_shape (`tuple[int, int, int]`): the source's array shape.
        modality (`str`, *optional*): the modality the file declares (DICOM `Modality`), if any.
        dicom_slices (`list[pydicom.Dataset]`): for a DICOM series, each slice's dataset without its pixel data, in
            the order of the source's third array axis (slice `k` of `source_shape`): what a DICOM Segmentation or
            Structured Report about this volume references. Empty for other inputs.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    orientation: np.ndarray = field(default_factory=lambda: np.array([[0, 1], [1, 1], [2, 1]], dtype=float))
    source_shape: tuple[int, int, int] = ()
    modality: str | None = None
    dicom_slices: list = field(default_factory=list, repr=False)

    def to_source_grid(self, canonical: np.ndarray) -> np.ndarray:
        """Map an array in the canonical layout `(D, H, W)` back onto the source's array grid."""
        ras = np.transpose(canonical, CANONICAL_AXES)
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), self.orientation)
        return np.ascontiguousarray(nib.orientations.apply_orientation(ras, back))

    def canonical_to_world(self, points) -> np.ndarray:
        """Canonical voxel coordinates -> world coordinates in mm (RAS, through the source's affine).

        Args:
            points (array of shape `(N, 3)`): `(d, h, w)` voxel-index coordinates on the canonical grid (continuous).

        Returns:
            `np.ndarray` of shape `(N, 3)`: `(x, y, z)` in mm, RAS.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        to_ras = nib.orientations.ornt_transform(self.orientation, nib.orientations.axcodes2ornt(("R", "A", "S")))
        ras_to_source = nib.orientations.inv_ornt_aff(to_ras, self.source_shape)  # RAS voxel -> source voxel
        ras_voxels = points[:, list(CANONICAL_AXES)]  # (N, 3) (d, h, w) = (S, A, R) -> (R, A, S)
        homogeneous = np.concatenate([ras_voxels, np.ones((len(points), 1))], axis=1)  # (N, 3) -> (N, 4)
        return (self.affine @ ras_to_source @ homogeneous.T).T[:, :3]


def _check_voxels(shape, max_voxels: int, source: str) -> None:
    count = math.prod(int(s) for s in shape)
    if count > max_voxels:
        raise VolumeError(
            f"{source}: the header claims {count:,} voxels (shape {tuple(int(s) for s in shape)}), above the limit of "
            f"{max_voxels:,}; raise max_voxels if this volume is genuine"
        )


def _select_frame(data: np.ndarray, frame: int | None, source: str) -> np.ndarray:
    """Reduce a 4D array (..., T) to one 3D frame, or explain why it cannot be used."""
    data = np.squeeze(data, axis=tuple(a for a in range(3, data.ndim) if data.shape[a] == 1)) if data.ndim > 3 else data
    if data.ndim < 3 or min(data.shape[:3]) < 2:
        raise VolumeError(f"{source}: a 3D volume is needed, got an image of shape {data.shape}")
    if data.ndim == 3:
        return data
    if data.ndim > 4:
        raise VolumeError(f"{source}: {data.ndim}D data of shape {data.shape} is not a volume")
    if frame is None:
        raise VolumeError(
            f"{source}: 4D data of shape {data.shape} holds {data.shape[3]} frames or channels; pick one with frame=N"
        )
    if not -data.shape[3] <= frame < data.shape[3]:
        raise VolumeError(f"{source}: frame {frame} does not exist, the data has {data.shape[3]} frames")
    return data[..., frame]


def _check_affine(affine: np.ndarray, source: str) -> None:
    """Refuse affines that place no voxel in the world: NaN / Inf entries, an axis of zero length, parallel axes."""
    if not np.isfinite(affine).all():
        raise VolumeError(f"{source}: the affine (voxel-to-world matrix) holds NaN or Inf: {affine[:3].tolist()}")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # |det| over the product of the axis lengths is 1 for orthogonal axes and 0 for parallel ones.
    if zooms.min() <= 0 or abs(np.linalg.det(affine[:3, :3])) <= 1e-3 * zooms.prod():
        raise VolumeError(
            f"{source}: the affine (voxel-to-world matrix) is singular: voxel sizes {zooms.tolist()} mm, axes "
            f"{affine[:3, :3].T.tolist()}; an axis of zero length or two parallel axes place no voxel in the world"
        )


def _canonical(data: np.ndarray, affine: np.ndarray, source: str, modality: str | None = None,
               dicom_slices: list | None = None) -> Volume:
    """Reorient source-axis data to RAS and put depth first."""
    affine = np.asarray(affine, dtype=np.float64)
    _check_affine(affine, source)
    orientation = nib.orientations.io_orientation(affine)
    to_ras = nib.orientations.ornt_transform(orientation, nib.orientations.axcodes2ornt(("R", "A", "S")))
    ras = nib.orientations.apply_orientation(data, to_ras)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # spacing along the source axes
    ras_zooms = np.empty(3)
    ras_zooms[to_ras[:, 0].astype(int)] = zooms
    canonical = np.ascontiguousarray(np.transpose(ras, CANONICAL_AXES), dtype=np.float32)
    return Volume(
        array=canonical,
        affine=affine,
        spacing=tuple(float(z) for z in ras_zooms[list(CANONICAL_AXES)]),
        source=source,
        orientation=orientation,
        source_shape=tuple(data.shape),
        modality=modality,
        dicom_slices=dicom_slices or [],
    )


def _check_dtype(dtype: np.dtype, source: str) -> None:
    """Refuse voxel types that are not one real number per voxel, before the data is read."""
    if dtype.kind == "c":
        raise VolumeError(
            f"{source}: the voxels are complex ({dtype}); voxlm reads real values only, save the magnitude "
            "(np.abs) or the real part as its own volume"
        )
    if dtype.fields is not None and set(dtype.names) >= {"R", "G", "B"}:
        raise VolumeError(
            f"{source}: the voxels are RGB colour ({dtype}); voxlm reads one grey level per voxel, save one channel "
            "(e.g. data['R']) or a grey-level mix as its own volume"
        )
    if dtype.kind not in "biuf":
        raise VolumeError(f"{source}: voxels must be numbers, got dtype {dtype}")


def _read_nifti(path: Path, frame, max_voxels, limits: ReadLimits) -> tuple[np.ndarray, np.ndarray]:
    with _decoding(path.name, "not a readable NIfTI file"):
        image = nib.load(path)
    return _image_data(image, path.name, frame, max_voxels, limits)


def _image_data(image, source: str, frame, max_voxels, limits: ReadLimits) -> tuple[np.ndarray, np.ndarray]:
    """Data and affine of a nibabel image, loaded from a file or built in memory. The affine is nibabel's (the sform
    when its code is set, else the qform, else the voxel sizes), as MONAI and nilearn read it too; a qform that
    disagrees with the sform in use is logged."""
    with _decoding(source, "not a readable NIfTI image"):
        shape = image.header.get_data_shape()
        dtype = image.get_data_dtype()
        affine = image.affine if image.affine is not None else image.header.get_best_affine()
        sform, sform_code = image.header.get_sform(coded=True)
        qform, qform_code = image.header.get_qform(coded=True)
    _check_voxels(shape, max_voxels, source)
    _check_dtype(dtype, source)
    voxels = math.prod(int(s) for s in shape)
    # nibabel applies scaling in float64; an image built in memory holds its array as is.
    scaled = getattr(image.dataobj, "slope", 1) != 1 or getattr(image.dataobj, "inter", 0) != 0
    _check_bytes(voxels * (dtype.itemsize + 8 * scaled + 4), limits, source,
                 f"{dtype} data{', rescaled to float64' if scaled else ''} and a float32 copy")
    if sform_code > 0 and qform_code > 0 and not np.allclose(sform, qform, rtol=0, atol=AFFINE_TOLERANCE):
        logger.warning("%s: the sform and the qform disagree (by up to %.3g); using the sform, as nibabel does",
                       source, float(np.abs(sform - qform).max()))
    with _decoding(source, "the NIfTI data is truncated or corrupt"):
        data = np.asanyarray(image.dataobj)
    return _select_frame(data, frame, source), affine


def _read_npy(path: Path, max_voxels, limits: ReadLimits) -> np.ndarray:
    with _decoding(path.name, "not a readable .npy file"), open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise VolumeError(f"{path.name}: .npy format version {version[0]}.{version[1]} is not one numpy writes")
        # Version 3.0 differs from 2.0 only by a UTF-8 header, which matters for field names: a volume has none.
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
    if dtype.hasobject:
        raise VolumeError(f"{path.name}: the .npy array holds Python objects, which voxlm never unpickles")
    _check_voxels(shape, max_voxels, path.name)
    _check_dtype(dtype, path.name)
    voxels = math.prod(int(s) for s in shape)
    _check_bytes(voxels * (dtype.itemsize + 4), limits, path.name, f"{dtype} data and a float32 copy")
    with _decoding(path.name, "the .npy data is truncated or corrupt"):
        return np.load(path, allow_pickle=False)


def _header_lines(path: Path, source: str) -> list[str]:
    """The text lines at the start of a NRRD or MetaImage file, up to `MAX_HEADER_BYTES` (the binary data of an
    attached file decodes too, as latin-1, and is never looked at: parsing stops at the header's end)."""
    with open(path, "rb") as handle:
        text = handle.read(MAX_HEADER_BYTES + 1)
    if len(text) > MAX_HEADER_BYTES and path.suffix.lower() in (".nhdr", ".mhd"):
        raise VolumeError(f"{source}: the detached header is longer than {MAX_HEADER_BYTES:,} bytes; not a header")
    return text.decode("latin-1").splitlines()


def _data_file_names(value: str, following: list[str], limits: ReadLimits, source: str) -> list[str]:
    """The data files a NRRD `data file` or MetaImage `ElementDataFile` value names: one file, `LIST` (the names on
    the lines that follow), or a printf pattern `<format> <min> <max> <step> [<dim>]`."""
    tokens = value.split()
    if tokens and tokens[0] == "LIST":
        names = [line.strip() for line in following if line.strip()]
    elif len(tokens) in (4, 5) and "%" in tokens[0]:
        try:
            first, last, step = (int(t) for t in tokens[1:4])
            names = range(first, last + (1 if step > 0 else -1), step)
        except ValueError as error:  # non-integer bounds, or a step of 0
            raise VolumeError(f"{source}: the data file pattern {value!r} is not <format> <min> <max> <step>") \
                from error
        _check_files(len(names), limits, source, "the header names")
        try:
            names = [tokens[0] % index for index in names]
        except (TypeError, ValueError) as error:
            raise VolumeError(f"{source}: the data file pattern {tokens[0]!r} is not a printf pattern") from error
    else:
        names = [value.strip()]
    _check_files(len(names), limits, source, "the header names")
    return names


def _itk_data_files(path: Path, limits: ReadLimits) -> list[str]:
    """The detached data files a NRRD or MetaImage header names (none when the data is attached), from the header
    text itself, before SimpleITK opens anything.

    NRRD: `key: value` lines after the `NRRD000X` magic, up to the first blank line; the field is `data file` (or
    `datafile`). MetaImage: `Key = Value` lines up to `ElementDataFile`, the last one; `LOCAL` means attached.
    """
    lines = _header_lines(path, path.name)
    if path.suffix.lower() in (".nrrd", ".nhdr"):
        if not lines or not lines[0].startswith("NRRD000"):
            raise VolumeError(f"{path.name}: not a NRRD file (it does not start with the NRRD000X magic)")
        for index, line in enumerate(lines[1:], start=1):
            if not line.strip():
                break
            key, colon, value = line.partition(":")
            if colon and not line.startswith("#") and key.strip().lower() in ("data file", "datafile"):
                return _data_file_names(value.removeprefix("=").strip(), lines[index + 1 :], limits, path.name)
        return []
    for index, line in enumerate(lines):
        key, equals, value = line.partition("=")
        if equals and key.strip().lower() == "elementdatafile":
            value = value.strip()
            return [] if value.upper() == "LOCAL" else _data_file_names(value, lines[index + 1 :], limits, path.name)
    raise VolumeError(f"{path.name}: not a MetaImage file (no ElementDataFile line in its header)")


def _check_data_file(header: Path, name: str, source: str) -> None:
    """A detached data file must be a regular file beside its header (in its folder or below): no absolute path, no
    `..`, no link leading out. Otherwise a header could make voxlm read, and a Space show, any file on the server."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts or relative.drive:
        raise VolumeError(
            f"{source}: the header's data file {name!r} is not beside it; a detached data file must sit in the "
            "header's folder (a relative path without '..')"
        )
    folder = header.parent.resolve()
    target = (header.parent / relative).resolve()
    if not target.is_relative_to(folder):
        raise VolumeError(f"{source}: the header's data file {name!r} is a link that leads out of the header's folder")
    _check_regular_file(target, source, f"the header's data file {name!r}")


def _read_itk(path: Path, frame, max_voxels, limits: ReadLimits) -> tuple[np.ndarray, np.ndarray]:
    _reader(sitk, "SimpleITK", path.name, "NRRD / MetaImage files")

    for name in _itk_data_files(path, limits):
        _check_data_file(path, name, path.name)
    reader = sitk.ImageFileReader()
    # The header was parsed as this format above; SimpleITK must not pick another reader by probing the content.
    reader.SetImageIO("NrrdImageIO" if path.suffix.lower() in (".nrrd", ".nhdr") else "MetaImageIO")
    reader.SetFileName(str(path))
    with _decoding(path.name, "not a readable NRRD/MHA file"):
        reader.ReadImageInformation()
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel_type:
        raise VolumeError(f"{path.name}: the voxels are complex ({pixel_type}); voxlm reads real values only")
    components = reader.GetNumberOfComponents()
    size = reader.GetSize() + ((components,) if components > 1 else ())
    _check_voxels(size, max_voxels, path.name)
    # The pixel type's size, from a one-voxel image of it (SimpleITK reports the type by name only).
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * len(reader.GetSize()), reader.GetPixelID())).itemsize
    voxels = math.prod(reader.GetSize())
    _check_bytes(voxels * (2 * components * itemsize + 4), limits, path.name,
                 f"{pixel_type} data, its numpy copy and a float32 copy")
    with _decoding(path.name, "the image data is truncated or corrupt"):
        image = reader.Execute()
    if image.GetDimension() != 3:
        raise VolumeError(f"{path.name}: a 3D volume is needed, got a {image.GetDimension()}D image")
    data = np.moveaxis(sitk.GetArrayFromImage(image), (0, 1, 2), (2, 1, 0))  # (z, y, x[, c]) -> (x, y, z[, c])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return _select_frame(data, frame, path.name), LPS_TO_RAS @ affine


def _dicom_files(folder: Path, limits: ReadLimits, source: str) -> list[Path]:
    """The regular files inside `folder` (hidden files and links that lead out of it are left out), refused when
    there are more than `limits.max_files`, counted before any is read."""
    root = folder.resolve()
    files = []
    for path in folder.rglob("*"):
        if path.name.startswith(".") or not path.is_file() or not path.resolve().is_relative_to(root):
            continue
        files.append(path)
        _check_files(len(files), limits, source, "the folder holds at least")
    return sorted(files)


def _inflated_size(path: Path, offset: int, cap: int) -> int:
    """How many bytes the raw deflate stream of `path` from `offset` inflates to, counting in bounded steps and
    stopping past `cap` (pydicom inflates a deflated file whole, in memory, even to read its header)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        while (chunk := handle.read(2**16)) and not inflater.eof:
            while chunk and total <= cap:
                total += len(inflater.decompress(chunk, 2**24))
                chunk = inflater.unconsumed_tail
    return total


def _dicom_image_headers(paths, limits: ReadLimits, source: str) -> list[tuple[Path, object]]:
    """`(path, header)` of the DICOM image slices among `paths`: readable headers with position, orientation and
    pixel spacing; other files (a DICOMDIR index, a readme, a dose report) are skipped. Deflated files are measured
    before pydicom inflates them: each within `limits.max_bytes`, all together within `limits.max_unpacked_bytes`."""
    _reader(pydicom, "pydicom", source, "DICOM")

    _check_files(len(paths), limits, source, "there are")
    headers = []
    inflated = 0
    for path in paths:
        try:
            with open(path, "rb") as handle:
                pydicom.filereader.read_preamble(handle, False)
                # pydicom's own reading of the file meta group (private, but what dcmread calls): it leaves the file
                # where dcmread goes on reading, so the stream measured is the one pydicom would inflate.
                meta = pydicom.filereader._read_file_meta_info(handle)
                offset = handle.tell()
            if meta.get("TransferSyntaxUID") == DEFLATED_DICOM:
                cap = min(limits.max_bytes, limits.max_unpacked_bytes - inflated)
                size = _inflated_size(path, offset, cap)
                if size > cap:
                    raise VolumeError(
                        f"{source}: the deflated DICOM file {path.name} inflates to more than {_mib(cap)}; "
                        "raise ReadLimits.max_bytes or max_unpacked_bytes if it is genuine"
                    )
                inflated += size
            # Large values (a private blob before the pixels) stay on disk until asked for.
            header = pydicom.dcmread(path, stop_before_pixels=True, defer_size="64 KB")
        except (MemoryError, VolumeError):
            raise
        except Exception:  # not DICOM: skip it
            continue
        if "ImagePositionPatient" in header and "ImageOrientationPatient" in header and "PixelSpacing" in header:
            headers.append((path, header))
    return headers


def _group_series(headers) -> dict[str, list]:
    """Slices grouped by `SeriesInstanceUID`, in the order the headers came."""
    series: dict[str, list] = {}
    for path, header in headers:
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))
    return series


def _read_dicom_series(folder: Path, source: str, max_voxels: int, limits: ReadLimits):
    """Read one DICOM series: the largest one (ties broken by UID) when several are present, sorted by position."""
    headers = _dicom_image_headers(_dicom_files(folder, limits, source), limits, source)
    if not headers:
        raise VolumeError(f"{source}: no DICOM image slices with position, orientation and pixel spacing were found")
    series = _group_series(headers)
    uid = sorted(series, key=lambda key: (-len(series[key]), key))[0]
    return _stack_dicom_slices(series[uid], source, max_voxels, limits)


def _dicom_numbers(header, keyword: str, count: int, source: str, path: Path, default=None) -> np.ndarray:
    """`count` finite numbers from a DICOM attribute (`default` when it is absent), or a `VolumeError` naming the
    file and the attribute."""
    value = header.get(keyword, default)
    if value is None:
        raise VolumeError(f"{source}: {path.name} has no {keyword}")
    values = value if isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes)) else [value]
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise VolumeError(f"{source}: {path.name} has a non-numeric {keyword} ({value!r})") from error
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        raise VolumeError(f"{source}: {path.name}: {keyword} must be {count} finite number(s), got {value!r}")
    return numbers


def _slice_geometry(path: Path, header, source: str) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """`((rows, columns), orientation (6,), position (3,), pixel spacing (2,))` of one slice, each checked."""
    rows, columns = header.get("Rows"), header.get("Columns")
    if not isinstance(rows, int) or not isinstance(columns, int) or rows < 1 or columns < 1:
        raise VolumeError(f"{source}: {path.name} needs Rows and Columns of at least 1, got {rows!r} x {columns!r}")
    frames, samples = header.get("NumberOfFrames", 1) or 1, header.get("SamplesPerPixel", 1) or 1
    if str(frames).strip() != "1" or samples != 1:
        raise VolumeError(
            f"{source}: {path.name} holds {frames} frame(s) of {samples} sample(s) per pixel; voxlm reads series of "
            "one grey-level slice per file"
        )
    spacing = _dicom_numbers(header, "PixelSpacing", 2, source, path)
    if spacing.min() <= 0:
        raise VolumeError(f"{source}: {path.name}: PixelSpacing must be positive, got {spacing.tolist()}")
    orientation = _dicom_numbers(header, "ImageOrientationPatient", 6, source, path)
    position = _dicom_numbers(header, "ImagePositionPatient", 3, source, path)
    return (rows, columns), orientation, position, spacing


def _stack_dicom_slices(slices, source: str, max_voxels: int, limits: ReadLimits) -> dict:
    """Stack the `(path, header)` slices of one series: `_canonical`'s keyword arguments (source-axis data in HU,
    its RAS affine, the declared modality and the slices' datasets without pixel data, in stacking order)."""
    if len(slices) < 2:
        raise VolumeError(f"{source}: the series has a single slice; a volume needs at least 2")
    geometry = [_slice_geometry(path, header, source) for path, header in slices]
    shapes = {shape for shape, *_ in geometry}
    orientations = {tuple(np.round(orientation, 4)) for _, orientation, *_ in geometry}
    if len(shapes) > 1 or len(orientations) > 1:
        raise VolumeError(f"{source}: the series mixes slice sizes {sorted(shapes)} or orientations; cannot stack it")
    _, orientation, _, (row_spacing, column_spacing) = geometry[0]
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([position @ normal for _, _, position, _ in geometry])
    order = np.argsort(positions)
    slices = [slices[i] for i in order]
    gaps = np.diff(positions[order])
    if np.any(gaps < 1e-3):
        raise VolumeError(f"{source}: two slices share a position; the series holds duplicates or mixed acquisitions")
    if gaps.max() > 1.5 * np.median(gaps):
        raise VolumeError(
            f"{source}: slices are missing (gap of {gaps.max():.2f} mm where the spacing is {np.median(gaps):.2f} mm)"
        )
    rows, columns = shapes.pop()
    _check_voxels((rows, columns, len(slices)), max_voxels, source)
    _check_bytes(rows * columns * len(slices) * 8, limits, source, "the float32 slices and their canonical copy")
    data = np.empty((len(slices), rows, columns), dtype=np.float32)  # (k, i, j) slices x rows x columns
    datasets = []
    for plane, (path, _) in zip(data, slices):
        with _decoding(source, f"the pixel data of {path.name} cannot be decoded"):
            dataset = pydicom.dcmread(path)
            pixels = dataset.pixel_array
        if pixels.shape != (rows, columns):
            raise VolumeError(f"{source}: the pixels of {path.name} have shape {pixels.shape}, not {(rows, columns)}")
        slope = _dicom_numbers(dataset, "RescaleSlope", 1, source, path, default=1.0)[0]
        intercept = _dicom_numbers(dataset, "RescaleIntercept", 1, source, path, default=0.0)[0]
        plane[...] = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        del dataset.PixelData  # the header is kept (for DICOM outputs); the voxels are in `data`
        datasets.append(dataset)
    # (k, i, j) -> (j, i, k), the NIfTI-like voxel order of the affine below.
    data = np.transpose(data, (2, 1, 0))
    first_position = geometry[order[0]][2]
    step = (geometry[order[-1]][2] - first_position) / (len(slices) - 1)
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing  # column index j moves along the row direction
    affine[:3, 1] = column_cosine * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = first_position
    return dict(data=data, affine=LPS_TO_RAS @ affine, modality=getattr(slices[0][1], "Modality", None),
                dicom_slices=datasets)


def safe_extract_zip(path: Path, destination: Path, *, max_bytes: int, max_entries: int) -> None:
    """Extract a zip archive, refusing (before writing anything) entries that would leave `destination`, links,
    encrypted entries, more than `max_entries` entries and more than `max_bytes` of content; entries that fail to
    extract (a bad CRC, an unknown compression) are refused by name."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise VolumeError(f"{path.name}: not a readable zip archive ({error})") from error
    with archive:
        members = archive.infolist()
        if len(members) > max_entries:
            raise VolumeError(
                f"{path.name}: the archive holds {len(members):,} entries, more than {max_entries:,}; raise "
                "ReadLimits.max_files if it is genuine"
            )
        total = 0
        root = destination.resolve()
        for member in members:
            target = (destination / member.filename).resolve()
            if not target.is_relative_to(root) or member.filename.startswith(("/", "\\")):
                raise VolumeError(f"{path.name}: the entry {member.filename!r} tries to leave the extraction folder")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise VolumeError(f"{path.name}: the entry {member.filename!r} is a symbolic link")
            if member.flag_bits & 0x1:
                raise VolumeError(f"{path.name}: the entry {member.filename!r} is encrypted; give an unencrypted zip")
            total += member.file_size
            if total > max_bytes:
                raise VolumeError(
                    f"{path.name}: the archive unpacks to more than {_mib(max_bytes)}; raise "
                    "ReadLimits.max_unpacked_bytes if it is genuine"
                )
        for member in members:
            try:  # zipfile stops each entry at its declared size and checks its CRC
                archive.extract(member, destination)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error) as error:
                raise VolumeError(f"{path.name}: the entry {member.filename!r} cannot be extracted ({error})") \
                    from error


@contextlib.contextmanager
def _extracted(path: Path, limits: ReadLimits):
    """A temporary folder holding the zip's entries, removed afterwards whatever happens."""
    with tempfile.TemporaryDirectory(prefix="voxlm-zip-") as folder:
        safe_extract_zip(path, Path(folder), max_bytes=limits.max_unpacked_bytes, max_entries=limits.max_files)
        yield Path(folder)


def read_volume(
    source,
    *,
    frame: int | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    limits: ReadLimits | None = None,
    nan_policy: str = "error",
    allow_constant: bool = False,
) -> Volume:
    """Read a volume into the canonical `(D, H, W)` layout.

    Args:
        source: a path (`.nii`, `.nii.gz`, `.npy`, `.nrrd`, `.nhdr`, `.mha`, `.mhd`, a DICOM series folder or `.zip`),
            a nibabel NIfTI image (`nib.load(...)` or built in memory, read with its affine), a numpy array or a
            torch tensor (arrays are taken as canonical `(D, H, W)`), or a `Volume` (returned as is). A path must be
            a regular file or a folder; detached NRRD / MetaImage data files must be regular files beside their
            header.
        frame (`int`, *optional*): which frame or channel of 4D data to take; 4D data without it is an error.
        max_voxels (`int`, defaults to 1024**3): refuse headers that claim more voxels, before allocating them.
        limits (`ReadLimits`, *optional*, defaults to `ReadLimits()`): the bytes and files the read may take.
        nan_policy (`str`, defaults to `"error"`): `"error"` refuses NaN or Inf voxels; `"zero"` replaces them with 0.
        allow_constant (`bool`, defaults to `False`): accept a constant volume (an empty mask is one).

    Raises:
        `VolumeError`: naming the source and the problem, including a volume that does not fit in memory.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if isinstance(source, Volume):
        return source
    limits = limits or ReadLimits()
    name = Path(source).name if isinstance(source, (str, Path)) else "array input"
    try:
        if isinstance(source, (str, Path)):
            volume = _read_path(Path(source), frame, max_voxels, limits)
        elif isinstance(source, (nib.Nifti1Image, nib.Nifti2Image)):
            name = Path(source.get_filename()).name if source.get_filename() else "NIfTI image"
            data, affine = _image_data(source, name, frame, max_voxels, limits)
            volume = _canonical(np.asarray(data), affine, name)
        else:
            volume = _read_array(source, frame, max_voxels, limits)
        return _check_values(volume, nan_policy, allow_constant)
    except MemoryError as error:
        raise _out_of_memory(name, limits) from error


def _read_path(path: Path, frame, max_voxels, limits: ReadLimits) -> Volume:
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    name = path.name.lower()
    if path.is_dir():
        return _canonical(source=path.name, **_read_dicom_series(path, path.name, max_voxels, limits))
    _check_regular_file(path, path.name, "the path")
    if name.endswith(".zip"):
        with _extracted(path, limits) as folder:
            return _canonical(source=path.name, **_read_dicom_series(folder, path.name, max_voxels, limits))
    if name.endswith((".nii", ".nii.gz")):
        data, affine = _read_nifti(path, frame, max_voxels, limits)
    elif name.endswith(".npy"):
        return _read_array(_read_npy(path, max_voxels, limits), frame, max_voxels, limits, source=path.name)
    elif name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        data, affine = _read_itk(path, frame, max_voxels, limits)
    elif name.endswith(".dcm"):
        raise VolumeError(
            f"{path.name}: a single DICOM file is one 2D slice; give the folder of its series or a .zip of it"
        )
    else:
        raise VolumeError(f"{path.name}: unknown volume format; use NIfTI, DICOM (folder or .zip), NRRD, MHA or .npy")
    return _canonical(np.asarray(data), affine, path.name)


def _read_array(array, frame, max_voxels, limits: ReadLimits, source: str = "array input") -> Volume:
    """Arrays carry no geometry: they are taken as canonical `(D, H, W)` (4D: `(T, D, H, W)`) with unit spacing."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    _check_voxels(array.shape, max_voxels, source)
    _check_dtype(array.dtype, source)
    if array.ndim == 4:
        if frame is None:
            raise VolumeError(f"{source}: 4D data of shape {array.shape}; pick one frame or channel with frame=N")
        if not -array.shape[0] <= frame < array.shape[0]:
            raise VolumeError(f"{source}: frame {frame} does not exist, the data has {array.shape[0]} frames")
        array = array[frame]
    if array.ndim != 3 or min(array.shape) < 2:
        raise VolumeError(f"{source}: a 3D volume (D, H, W) is needed, got shape {array.shape}")
    _check_bytes(array.size * 4, limits, source, "a float32 copy")
    canonical = np.ascontiguousarray(array, dtype=np.float32)
    return Volume(
        array=canonical,
        affine=np.eye(4),
        spacing=(1.0, 1.0, 1.0),
        source=source,
        orientation=nib.orientations.axcodes2ornt(("S", "A", "R")),
        source_shape=canonical.shape,
    )


def _check_values(volume: Volume, nan_policy: str, allow_constant: bool) -> Volume:
    finite = np.isfinite(volume.array)
    if not finite.all():
        if nan_policy == "error":
            raise VolumeError(
                f"{volume.source}: {int((~finite).sum()):,} voxels are NaN or Inf; fix the file or pass "
                "nan_policy='zero'"
            )
        volume.array[~finite] = 0.0
    if not allow_constant and volume.array.min() == volume.array.max():
        raise VolumeError(f"{volume.source}: the volume is constant ({volume.array.flat[0]}); there is nothing to see")
    return volume


@dataclass
class Study:
    """The series of one study, each a `Volume` in the canonical layout, in reading order.

    Args:
        volumes (`list[Volume]`): one per series.
        descriptions (`list[str]`): what each series is (DICOM `SeriesDescription`, else its number; a file's name).
        source (`str`): the folder, archive or file names the study came from.
        skipped (`list[str]`): DICOM series found but not usable as volumes (a one-slice localiser, a series with
            missing slices, ...), each as `"description: reason"`.
    """

    volumes: list[Volume]
    descriptions: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.volumes)


def _series_description(header, uid: str) -> str:
    description = str(header.get("SeriesDescription", "") or "").strip()
    if description:
        return description
    number = header.get("SeriesNumber")
    return f"series {number}" if number not in (None, "") else f"series {uid}"


def _left_after(limits: ReadLimits, volumes) -> ReadLimits:
    """The limits for the next series of a study: the series already read hold part of `max_bytes`."""
    return dataclasses.replace(limits, max_bytes=limits.max_bytes - sum(volume.array.nbytes for volume in volumes))


def _dicom_study(paths, source: str, max_voxels: int, nan_policy: str, limits: ReadLimits) -> Study:
    """Every usable series among DICOM files, ordered by `SeriesNumber` (then UID); unusable series are skipped."""
    headers = _dicom_image_headers(paths, limits, source)
    if not headers:
        raise VolumeError(f"{source}: no DICOM image slices with position, orientation and pixel spacing were found")
    series = _group_series(headers)

    def order(uid):
        number = series[uid][0][1].get("SeriesNumber")
        return (0, int(number), uid) if str(number or "").strip().lstrip("-").isdigit() else (1, 0, uid)

    study = Study(volumes=[], descriptions=[], source=source)
    for uid in sorted(series, key=order):
        description = _series_description(series[uid][0][1], uid)
        name = f"{source} [{description}]"
        try:
            stacked = _stack_dicom_slices(series[uid], name, max_voxels, _left_after(limits, study.volumes))
            volume = _check_values(_canonical(source=name, **stacked), nan_policy, allow_constant=False)
        except VolumeError as error:
            study.skipped.append(f"{description}: {str(error).removeprefix(name + ': ')}")
            continue
        study.volumes.append(volume)
        study.descriptions.append(description)
    if study.skipped:
        logger.warning("%s: skipped series that are not volumes: %s", source, "; ".join(study.skipped))
    if not study.volumes:
        raise VolumeError(f"{source}: no DICOM series could be read as a volume ({'; '.join(study.skipped)})")
    return study


def _is_loose_dicom(item) -> bool:
    """A path to one DICOM file (a slice), rather than a volume file or a folder / archive of a series."""
    if not isinstance(item, (str, Path)) or not Path(item).is_file():
        return False
    name = Path(item).name.lower()
    if name.endswith(".dcm"):
        return True
    if name.endswith(VOLUME_SUFFIXES):
        return False
    return _reader(pydicom, "pydicom", name, "a file without a volume suffix (DICOM)").misc.is_dicom(item)


def _read_study_item(source, max_voxels: int, nan_policy: str, limits: ReadLimits) -> Study:
    """One source as a study: a DICOM folder or `.zip` gives all its series, anything else is one series."""
    if isinstance(source, Study):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return _dicom_study(_dicom_files(path, limits, path.name), path.name, max_voxels, nan_policy, limits)
        if path.name.lower().endswith(".zip") and path.is_file():
            with _extracted(path, limits) as folder:
                return _dicom_study(_dicom_files(folder, limits, path.name), path.name, max_voxels, nan_policy, limits)
    volume = read_volume(source, max_voxels=max_voxels, limits=limits, nan_policy=nan_policy)
    return Study(volumes=[volume], descriptions=[volume.source], source=volume.source)


def read_study(
    source,
    *,
    max_series: int | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    limits: ReadLimits | None = None,
    nan_policy: str = "error",
) -> Study:
    """Read the series of one study, each into the canonical `(D, H, W)` layout.

    Args:
        source: a folder or `.zip` of DICOM files (grouped by `SeriesInstanceUID`, ordered by `SeriesNumber`); a list
            of sources (volume files, arrays, `Volume`s, DICOM folders or archives, in the order given; loose DICOM
            slice files are grouped by series and take the place of the first one); a single volume file or array (a
            one-series study); or a `Study` (returned after the checks).
        max_series (`int`, *optional*): refuse studies with more usable series (the model's `max_study_scans`).
        max_voxels (`int`, defaults to 1024**3): per series, refuse headers that claim more voxels.
        limits (`ReadLimits`, *optional*, defaults to `ReadLimits()`): the bytes and files the read may take; the
            series of the study share `max_bytes`.
        nan_policy (`str`, defaults to `"error"`): as in [`read_volume`].

    Returns:
        `Study`. DICOM series that cannot be read as volumes are left out and listed in `Study.skipped`; files given
        one by one must each be readable.

    Raises:
        `VolumeError`: no usable series, too many series or files, or a file that cannot be read (or does not fit in
        memory), naming the source.
    """
    limits = limits or ReadLimits()
    try:
        study = _read_study_source(source, max_voxels, nan_policy, limits)
    except MemoryError as error:
        raise _out_of_memory(_source_name(source), limits) from error
    if max_series is not None and len(study) > max_series:
        raise VolumeError(
            f"{study.source}: the study holds {len(study)} series ({'; '.join(study.descriptions)}), more than the "
            f"{max_series} this model reads at once; give it at most {max_series}"
        )
    return study


def _source_name(source) -> str:
    if isinstance(source, (str, Path)):
        return Path(source).name
    return f"{len(source)} files" if isinstance(source, (list, tuple)) else "array input"


def _read_study_source(source, max_voxels: int, nan_policy: str, limits: ReadLimits) -> Study:
    if not isinstance(source, (list, tuple)):
        return _read_study_item(source, max_voxels, nan_policy, limits)
    if not source:
        raise VolumeError("an empty list of files holds no study")
    _check_files(len(source), limits, f"{len(source)} files", "the list holds")
    is_loose = [_is_loose_dicom(item) for item in source]
    loose = [Path(item) for item, flag in zip(source, is_loose) if flag]
    parts = []
    for index, (item, flag) in enumerate(zip(source, is_loose)):
        left = _left_after(limits, [volume for part in parts for volume in part.volumes])
        if not flag:
            parts.append(_read_study_item(item, max_voxels, nan_policy, left))
        elif index == is_loose.index(True):  # the loose slices' series, once, where the first one was
            names = f"{len(loose)} DICOM file{'s' * (len(loose) > 1)}"
            parts.append(_dicom_study(loose, names, max_voxels, nan_policy, left))
    return Study(
        volumes=[v for part in parts for v in part.volumes],
        descriptions=[d for part in parts for d in part.descriptions],
        source=", ".join(part.source for part in parts),
        skipped=[s for part in parts for s in part.skipped],
    )
