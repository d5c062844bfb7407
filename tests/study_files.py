"""A real DICOM study for the study tests, built from the CT series pydicom ships (`dicomdirtests/98892001/CT5N`, five
16 x 16 slices): the series as it is, a second series of the same slices with its own `SeriesInstanceUID` and
brighter voxels, and a one-slice localiser, each series written to a sub-folder."""

import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
SECOND_SERIES = "AXIAL BRIGHTER COPY"
LOCALISER = "LOCALIZER"


def copy_series(folder: Path, number: int, description: str | None, offset: int = 0, slices: int | None = None,
                study_uid: str | None = None) -> Path:
    """The CT5N slices as a new series (new UIDs, `SeriesNumber`, `SeriesDescription`), stored values + `offset`; in
    CT5N's study, or in the study `study_uid`."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for path in sorted(CT5N.iterdir())[:slices]:
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = series_uid
        if study_uid is not None:
            dataset.StudyInstanceUID = study_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.SeriesNumber = number
        if description is None:
            del dataset.SeriesDescription
        else:
            dataset.SeriesDescription = description
        if offset:
            pixels = dataset.pixel_array
            dataset.PixelData = (pixels + np.asarray(offset, pixels.dtype)).astype(pixels.dtype).tobytes()
        dataset.save_as(folder / path.name)
    return folder


def write_dicom_study(folder: Path, localiser: bool = True) -> Path:
    """`folder/` holding CT5N (series 5), a brighter copy (series 7) and, optionally, a one-slice localiser
    (series 1, which a study reader must skip), plus a file that is not DICOM."""
    folder.mkdir(parents=True)
    for path in CT5N.iterdir():
        (folder / "ct5n").mkdir(exist_ok=True)
        (folder / "ct5n" / path.name).write_bytes(path.read_bytes())
    copy_series(folder / "brighter", 7, SECOND_SERIES, offset=100)
    if localiser:
        copy_series(folder / "localiser", 1, LOCALISER, slices=1)
    (folder / "README.txt").write_text("not DICOM")
    return folder


def zip_folder(folder: Path, archive: Path) -> Path:
    """`archive` holding `folder` (its name as the top entry), as a user zips a study."""
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, path.relative_to(folder.parent))
    return archive
