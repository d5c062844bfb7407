"""Read CT and MRI volumes from files or arrays into one canonical layout, or fail with a clear `VolumeError`.

Canonical layout: the array is reoriented to RAS (nibabel's orientation tools), then its axes are reversed so that depth
(the superior-inferior axis, axial slices) comes first: `(D, H, W) = (S, A, R)`. The original affine and the
orientation transform are kept, so a mask predicted in the canonical layout maps back onto the file's own grid.

Readers are the field's: nibabel (NIfTI), pydicom (DICOM series, folder or `.zip`), SimpleITK (NRRD, MHA/MHD), numpy
(`.npy`, never unpickled). Every reader checks the voxel count in the header before it allocates the data.

A study is several series of one examination: `read_study` reads a folder or `.zip` of DICOM files grouped by
`SeriesInstanceUID`, or a list of files (each NIfTI / NRRD / `.npy` file one series, loose DICOM slices grouped by
series), into a `Study` of canonical volumes in reading order.
"""

from __future__ import annotations

import logging
import math
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

DEFAULT_MAX_VOXELS = 1024**3  # a 1024^3 volume: far above any CT, small enough to refuse hostile headers
NAN_POLICIES = ("error", "zero")
# RAS voxel axes -> canonical (S, A, R): reverse them.
CANONICAL_AXES = (2, 1, 0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip")

logger = logging.getLogger(__name__)


class VolumeError(ValueError):
    """A volume that voxlm cannot use; the message names the source and the problem."""


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
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    orientation: np.ndarray = field(default_factory=lambda: np.array([[0, 1], [1, 1], [2, 1]], dtype=float))
    source_shape: tuple[int, int, int] = ()
    modality: str | None = None

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


def _canonical(data: np.ndarray, affine: np.ndarray, source: str, modality: str | None = None) -> Volume:
    """Reorient source-axis data to RAS and put depth first."""
    orientation = nib.orientations.io_orientation(affine)
    to_ras = nib.orientations.ornt_transform(orientation, nib.orientations.axcodes2ornt(("R", "A", "S")))
    ras = nib.orientations.apply_orientation(data, to_ras)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # spacing along the source axes
    ras_zooms = np.empty(3)
    ras_zooms[to_ras[:, 0].astype(int)] = zooms
    canonical = np.ascontiguousarray(np.transpose(ras, CANONICAL_AXES), dtype=np.float32)
    return Volume(
        array=canonical,
        affine=np.asarray(affine, dtype=np.float64),
        spacing=tuple(float(z) for z in ras_zooms[list(CANONICAL_AXES)]),
        source=source,
        orientation=orientation,
        source_shape=tuple(data.shape),
        modality=modality,
    )


def _read_nifti(path: Path, frame, max_voxels) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(path)
        shape = image.header.get_data_shape()
    except Exception as error:  # nibabel raises several types for files that are not NIfTI
        raise VolumeError(f"{path.name}: not a readable NIfTI file ({error})") from error
    _check_voxels(shape, max_voxels, path.name)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # truncated or corrupt compressed data surfaces only when read
        raise VolumeError(f"{path.name}: the NIfTI data is truncated or corrupt ({error})") from error
    return _select_frame(data, frame, path.name), image.affine


def _read_npy(path: Path, max_voxels) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, _, _ = read_header[version](handle)
    except Exception as error:
        raise VolumeError(f"{path.name}: not a readable .npy file ({error})") from error
    _check_voxels(shape, max_voxels, path.name)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:
        raise VolumeError(f"{path.name}: the .npy data is truncated, corrupt or pickled ({error})") from error


def _read_itk(path: Path, frame, max_voxels) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise VolumeError(f"{path.name}: not a readable NRRD/MHA file ({str(error).strip().splitlines()[-1]})") from error
    size = reader.GetSize() + ((reader.GetNumberOfComponents(),) if reader.GetNumberOfComponents() > 1 else ())
    _check_voxels(size, max_voxels, path.name)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise VolumeError(f"{path.name}: the image data is truncated or corrupt") from error
    if image.GetDimension() != 3:
        raise VolumeError(f"{path.name}: a 3D volume is needed, got a {image.GetDimension()}D image")
    data = np.moveaxis(sitk.GetArrayFromImage(image), (0, 1, 2), (2, 1, 0))  # (z, y, x[, c]) -> (x, y, z[, c])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return _select_frame(data, frame, path.name), LPS_TO_RAS @ affine


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _dicom_image_headers(paths) -> list[tuple[Path, object]]:
    """`(path, header)` of the DICOM image slices among `paths`: readable headers with position, orientation and
    pixel spacing; other files (a DICOMDIR index, a readme, a dose report) are skipped."""
    import pydicom

    headers = []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
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


def _read_dicom_series(folder: Path, source: str, max_voxels: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Read one DICOM series: the largest one (ties broken by UID) when several are present, sorted by position."""
    headers = _dicom_image_headers(_dicom_files(folder))
    if not headers:
        raise VolumeError(f"{source}: no DICOM image slices with position, orientation and pixel spacing were found")
    series = _group_series(headers)
    uid = sorted(series, key=lambda key: (-len(series[key]), key))[0]
    return _stack_dicom_slices(series[uid], source, max_voxels)


def _stack_dicom_slices(slices, source: str, max_voxels: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Stack the `(path, header)` slices of one series into source-axis data and its RAS affine, in HU."""
    import pydicom

    if len(slices) < 2:
        raise VolumeError(f"{source}: the series has a single slice; a volume needs at least 2")
    first = slices[0][1]
    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    shapes = {(int(h.Rows), int(h.Columns)) for _, h in slices}
    orientations = {tuple(np.round(np.array(h.ImageOrientationPatient, dtype=float), 4)) for _, h in slices}
    if len(shapes) > 1 or len(orientations) > 1:
        raise VolumeError(f"{source}: the series mixes slice sizes {sorted(shapes)} or orientations; cannot stack it")
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([np.array(h.ImagePositionPatient, dtype=float) @ normal for _, h in slices])
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
    planes = []
    for path, _ in slices:
        dataset = pydicom.dcmread(path)
        try:
            pixels = dataset.pixel_array.astype(np.float32)
        except Exception as error:
            raise VolumeError(f"{source}: the pixel data of {path.name} cannot be decoded ({error})") from error
        slope = float(getattr(dataset, "RescaleSlope", 1.0))
        intercept = float(getattr(dataset, "RescaleIntercept", 0.0))
        planes.append(pixels * slope + intercept)
    # (k, i, j) slices x rows x columns -> (j, i, k), the NIfTI-like voxel order of the affine below.
    data = np.transpose(np.stack(planes), (2, 1, 0))
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    first_position = np.array(slices[0][1].ImagePositionPatient, dtype=float)
    step = (np.array(slices[-1][1].ImagePositionPatient, dtype=float) - first_position) / (len(slices) - 1)
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing  # column index j moves along the row direction
    affine[:3, 1] = column_cosine * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = first_position
    return data, LPS_TO_RAS @ affine, getattr(first, "Modality", None)


def safe_extract_zip(path: Path, destination: Path, max_bytes: int) -> None:
    """Extract a zip archive, refusing entries that would leave `destination`, links, and oversized content."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise VolumeError(f"{path.name}: not a readable zip archive") from error
    with archive:
        total = 0
        root = destination.resolve()
        for member in archive.infolist():
            target = (destination / member.filename).resolve()
            if not target.is_relative_to(root) or member.filename.startswith(("/", "\\")):
                raise VolumeError(f"{path.name}: the entry {member.filename!r} tries to leave the extraction folder")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise VolumeError(f"{path.name}: the entry {member.filename!r} is a symbolic link")
            total += member.file_size
            if total > max_bytes:
                raise VolumeError(f"{path.name}: the archive unpacks to more than {max_bytes:,} bytes")
        archive.extractall(destination)


def read_volume(
    source,
    *,
    frame: int | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    nan_policy: str = "error",
    allow_constant: bool = False,
) -> Volume:
    """Read a volume into the canonical `(D, H, W)` layout.

    Args:
        source: a path (`.nii`, `.nii.gz`, `.npy`, `.nrrd`, `.mha`, `.mhd`, a DICOM series folder or `.zip`), a numpy
            array or a torch tensor (arrays are taken as canonical `(D, H, W)`), or a `Volume` (returned as is).
        frame (`int`, *optional*): which frame or channel of 4D data to take; 4D data without it is an error.
        max_voxels (`int`, defaults to 1024**3): refuse headers that claim more voxels, before allocating them.
        nan_policy (`str`, defaults to `"error"`): `"error"` refuses NaN or Inf voxels; `"zero"` replaces them with 0.
        allow_constant (`bool`, defaults to `False`): accept a constant volume (an empty mask is one).

    Raises:
        `VolumeError`: naming the source and the problem.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if isinstance(source, Volume):
        return source
    if isinstance(source, (str, Path)):
        volume = _read_path(Path(source), frame, max_voxels)
    else:
        volume = _read_array(source, frame, max_voxels)
    return _check_values(volume, nan_policy, allow_constant)


def _read_path(path: Path, frame, max_voxels) -> Volume:
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    name = path.name.lower()
    if path.is_dir():
        data, affine, modality = _read_dicom_series(path, path.name, max_voxels)
        return _canonical(data, affine, path.name, modality)
    if name.endswith(".zip"):
        with tempfile.TemporaryDirectory() as folder:
            safe_extract_zip(path, Path(folder), max_bytes=max_voxels * 8)
            data, affine, modality = _read_dicom_series(Path(folder), path.name, max_voxels)
        return _canonical(data, affine, path.name, modality)
    if name.endswith((".nii", ".nii.gz")):
        data, affine = _read_nifti(path, frame, max_voxels)
    elif name.endswith(".npy"):
        return _read_array(_read_npy(path, max_voxels), frame, max_voxels, source=path.name)
    elif name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        data, affine = _read_itk(path, frame, max_voxels)
    elif name.endswith(".dcm"):
        raise VolumeError(
            f"{path.name}: a single DICOM file is one 2D slice; give the folder of its series or a .zip of it"
        )
    else:
        raise VolumeError(f"{path.name}: unknown volume format; use NIfTI, DICOM (folder or .zip), NRRD, MHA or .npy")
    return _canonical(np.asarray(data), affine, path.name)


def _read_array(array, frame, max_voxels, source: str = "array input") -> Volume:
    """Arrays carry no geometry: they are taken as canonical `(D, H, W)` (4D: `(T, D, H, W)`) with unit spacing."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    _check_voxels(array.shape, max_voxels, source)
    if array.dtype.kind not in "biuf":
        raise VolumeError(f"{source}: voxels must be numbers, got dtype {array.dtype}")
    if array.ndim == 4:
        if frame is None:
            raise VolumeError(f"{source}: 4D data of shape {array.shape}; pick one frame or channel with frame=N")
        if not -array.shape[0] <= frame < array.shape[0]:
            raise VolumeError(f"{source}: frame {frame} does not exist, the data has {array.shape[0]} frames")
        array = array[frame]
    if array.ndim != 3 or min(array.shape) < 2:
        raise VolumeError(f"{source}: a 3D volume (D, H, W) is needed, got shape {array.shape}")
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
                f"{volume.source}: {int((~finite).sum()):,} voxels are NaN or Inf; fix the file or pass nan_policy='zero'"
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


def _dicom_study(paths, source: str, max_voxels: int, nan_policy: str) -> Study:
    """Every usable series among DICOM files, ordered by `SeriesNumber` (then UID); unusable series are skipped."""
    headers = _dicom_image_headers(paths)
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
            data, affine, modality = _stack_dicom_slices(series[uid], name, max_voxels)
            volume = _check_values(_canonical(data, affine, name, modality), nan_policy, allow_constant=False)
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
    import pydicom

    return pydicom.misc.is_dicom(item)


def _read_study_item(source, max_voxels: int, nan_policy: str) -> Study:
    """One source as a study: a DICOM folder or `.zip` gives all its series, anything else is one series."""
    if isinstance(source, Study):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return _dicom_study(_dicom_files(path), path.name, max_voxels, nan_policy)
        if path.name.lower().endswith(".zip") and path.is_file():
            with tempfile.TemporaryDirectory() as folder:
                safe_extract_zip(path, Path(folder), max_bytes=max_voxels * 8)
                return _dicom_study(_dicom_files(Path(folder)), path.name, max_voxels, nan_policy)
    volume = read_volume(source, max_voxels=max_voxels, nan_policy=nan_policy)
    return Study(volumes=[volume], descriptions=[volume.source], source=volume.source)


def read_study(
    source,
    *,
    max_series: int | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
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
        nan_policy (`str`, defaults to `"error"`): as in [`read_volume`].

    Returns:
        `Study`. DICOM series that cannot be read as volumes are left out and listed in `Study.skipped`; files given
        one by one must each be readable.

    Raises:
        `VolumeError`: no usable series, too many series, or a file that cannot be read, naming the source.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise VolumeError("an empty list of files holds no study")
        is_loose = [_is_loose_dicom(item) for item in source]
        loose = [Path(item) for item, flag in zip(source, is_loose) if flag]
        parts = []
        for index, (item, flag) in enumerate(zip(source, is_loose)):
            if not flag:
                parts.append(_read_study_item(item, max_voxels, nan_policy))
            elif index == is_loose.index(True):  # the loose slices' series, once, where the first one was
                names = f"{len(loose)} DICOM file{'s' * (len(loose) > 1)}"
                parts.append(_dicom_study(loose, names, max_voxels, nan_policy))
        study = Study(
            volumes=[v for part in parts for v in part.volumes],
            descriptions=[d for part in parts for d in part.descriptions],
            source=", ".join(part.source for part in parts),
            skipped=[s for part in parts for s in part.skipped],
        )
    else:
        study = _read_study_item(source, max_voxels, nan_policy)
    if max_series is not None and len(study) > max_series:
        raise VolumeError(
            f"{study.source}: the study holds {len(study)} series ({'; '.join(study.descriptions)}), more than the "
            f"{max_series} this model reads at once; give it at most {max_series}"
        )
    return study
