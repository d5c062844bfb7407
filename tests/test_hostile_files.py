"""Hostile files against the readers and the viewer: header tricks that point at other files, memory, disk and time
bombs, and malformed geometry, generated small on disk at test time.

Every case runs in its own process, forked from one server that imported voxlm once (importing torch takes seconds,
a fork milliseconds), under a wall-clock timeout and an address-space limit (a safety net: a reader that allocates what
a header claims gets a MemoryError instead of the machine's memory). A case passes when the read either succeeds as
expected or raises a `VolumeError` whose message names the file and matches the case's phrase; the process's peak
RSS stays under 2 GB, a secret file beside the case folder never shows up, and the case's temporary folder is left
empty (archives are extracted there and removed).
"""

import copy
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

CASE_TIMEOUT_S = 60
MAX_RSS_BYTES = 2 * 10**9
# Address space a case may add to the server's (torch and friends map ~1 GB): enough for every legitimate case here.
ADDRESS_HEADROOM = 3 * 2**30
SECRET = b"VOXLM-SECRET-" + bytes(range(48, 58)) * 4  # 53 bytes no reader may show

# The server: imports voxlm once, then forks one child per case (two at a time), waits for it with a timeout and
# reports the child's result and its rusage. Plain python3 -c, so it sees the same voxlm as pytest (PYTHONPATH).
SERVER = r"""
import json, logging, os, resource, signal, sys, tempfile, time, traceback
import numpy, nibabel, pydicom, SimpleITK
from voxlm import viewer
from voxlm.processing import ReadLimits, VolumeError, VoxVolumeProcessor, read_study, read_volume

def address_space():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

def run(case):
    limits = ReadLimits(**case["limits"]) if case["limits"] else None
    if case["op"] == "study":
        study = read_study(case["input"], limits=limits)
        return {"shapes": [list(v.array.shape) for v in study.volumes]}
    volume = read_volume(case["input"], limits=limits)
    result = {"shapes": [list(volume.array.shape)], "spacing": list(volume.spacing)}
    if case["op"] == "render":
        display = viewer.display_volume(volume, VoxVolumeProcessor(), "brain")  # a fixed window
        images = viewer.render_planes(display, [n // 2 for n in display.shape], volume.spacing)
        result["images"] = [list(image.shape) for image in images]
    return result

def child(case, headroom):
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + headroom,) * 2)
    tempfile.tempdir = case["tmp"]
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("voxlm").addHandler(handler)
    try:
        outcome = {"result": run(case)}
    except BaseException as error:
        outcome = {"error": type(error).__name__, "message": str(error),
                   "value_error": isinstance(error, ValueError), "volume_error": isinstance(error, VolumeError),
                   "traceback": traceback.format_exc()}
    outcome["warnings"] = warnings
    with open(case["out"], "w") as handle:
        json.dump(outcome, handle)

cases = json.load(open(sys.argv[1]))
headroom, timeout = int(sys.argv[2]), float(sys.argv[3])
pending, running, reports = list(cases), {}, {}
while pending or running:
    while pending and len(running) < 2:
        case = pending.pop(0)
        pid = os.fork()
        if pid == 0:
            try:
                child(case, case.get("headroom") or headroom)
            finally:
                os._exit(0)
        running[pid] = (case, time.monotonic())
    pid, status, usage = os.wait4(-1, os.WNOHANG)
    if pid == 0:
        for pid, (case, start) in list(running.items()):
            if time.monotonic() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                reports[case["name"]] = {"timed_out": True}
        time.sleep(0.01)
        continue
    case, start = running.pop(pid)
    report = reports.setdefault(case["name"], {"timed_out": False})
    report.update(wall_s=time.monotonic() - start, max_rss_kb=usage.ru_maxrss, status=status)
print(json.dumps(reports))
"""


@dataclass
class Case:
    """One hostile input. `build(folder)` writes it inside its own folder and returns the path (or list of paths)
    to read; `expect` is a regex the error must match, or `None` when the read must succeed."""

    name: str
    build: object
    expect: str | None
    op: str = "volume"  # "volume", "study" or "render"
    limits: dict = field(default_factory=dict)
    headroom: int | None = None
    check: object = None  # check(result dict) for successful reads


# ---------------------------------------------------------------- builders: NRRD / MetaImage headers
def secret_beside(folder: Path, name="secret.raw", size=8 * 8 * 8) -> Path:
    """A secret file outside the case folder, sized so that a reader that follows the header would read it whole."""
    path = folder.parent / f"{folder.name}-{name}"
    path.write_bytes((SECRET * (size // len(SECRET) + 1))[:size])
    return path


def nhdr(folder: Path, data_file: str, extra="") -> Path:
    path = folder / "volume.nhdr"
    path.write_text(f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n{extra}"
                    f"data file: {data_file}\n")
    return path


def mhd(folder: Path, data_file: str, suffix=".mhd") -> Path:
    path = folder / f"volume{suffix}"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\n"
                    f"ElementDataFile = {data_file}\n")
    return path


def random_raw(path: Path, size=8 * 8 * 8) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes())
    return path


def nhdr_absolute(folder):
    return nhdr(folder, str(secret_beside(folder)))


def nhdr_parent(folder):
    secret = secret_beside(folder)
    return nhdr(folder, f"../{secret.name}")


def nhdr_symlink(folder):
    (folder / "data.raw").symlink_to(secret_beside(folder))
    return nhdr(folder, "data.raw")


def nhdr_list(folder):
    secret = secret_beside(folder, size=64)
    random_raw(folder / "ok.raw", 8 * 8)
    return nhdr(folder, f"LIST 2\nok.raw\n../{secret.name}\n" + "ok.raw\n" * 6)


def nhdr_pattern(folder):
    secret_beside(folder, name="secret1.raw", size=64)
    return nhdr(folder, f"../{folder.name}-secret%d.raw 1 8 1 2")


def nhdr_fifo(folder):
    os.mkfifo(folder / "data.raw")
    return nhdr(folder, "data.raw")


def nhdr_device(folder):
    return nhdr(folder, "/dev/urandom")


def nhdr_beside(folder):
    random_raw(folder / "data.raw")
    return nhdr(folder, "data.raw", extra="space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,2)\n")


def mhd_absolute(folder):
    return mhd(folder, str(secret_beside(folder)))


def mhd_parent(folder):
    return mhd(folder, f"../{secret_beside(folder).name}")


def mha_external(folder):
    return mhd(folder, f"../{secret_beside(folder).name}", suffix=".mha")


def mhd_beside(folder):
    random_raw(folder / "data.raw")
    return mhd(folder, "data.raw")


def nrrd_disguised(folder):
    """MetaImage text named .nrrd: SimpleITK would probe the content and follow its ElementDataFile."""
    path = mhd(folder, str(secret_beside(folder)))
    return path.rename(folder / "volume.nrrd")


# ---------------------------------------------------------------- builders: paths that are not files
def input_device(folder):
    (folder / "volume.nii.gz").symlink_to("/dev/urandom")
    return folder / "volume.nii.gz"


def input_fifo(folder):
    os.mkfifo(folder / "volume.nii")
    return folder / "volume.nii"


# ---------------------------------------------------------------- builders: memory bombs
def gzip_of_zeros(size: int) -> bytes:
    return gzip.compress(bytes(size), compresslevel=1)


def nifti_claiming(folder, shape, dtype, slope=None, data_bytes=2**20, name="bomb.nii.gz") -> Path:
    """A NIfTI header that claims `shape` with only `data_bytes` of zeros behind it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    if slope is not None:
        header.set_slope_inter(slope, 0.0)
    raw = header.binaryblock + b"\0" * 4 + bytes(data_bytes)
    path = folder / name
    path.write_bytes(gzip.compress(raw, compresslevel=1) if name.endswith(".gz") else raw)
    return path


def nifti_bytes_bomb(folder):  # 1.05 G voxels (within max_voxels): 1 GB of uint8 and a 4 GB float32 copy
    return nifti_claiming(folder, (1024, 1024, 1000), np.uint8)


def nifti_scaled_bomb(folder):  # 512 M voxels of int8, rescaled: float64 is the larger part
    return nifti_claiming(folder, (800, 800, 800), np.int8, slope=2.0)


def nifti_real_data(folder, shape=(384, 384, 384)) -> Path:
    """A genuine (all-zero but one voxel) 57 MB uint8 volume, 60 KB gzipped."""
    data = np.zeros(shape, dtype=np.uint8)
    data[1, 2, 3] = 9
    path = folder / "big.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def npy_bytes_bomb(folder):
    path = folder / "bomb.npy"
    with open(path, "wb") as handle:
        header = {"descr": "<f4", "fortran_order": False, "shape": (1024, 1024, 1000)}
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(bytes(4096))
    return path


def nrrd_gzip_bomb(folder):
    path = folder / "bomb.nrrd"
    path.write_bytes(b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1024 1024 1000\nencoding: gzip\n\n"
                     + gzip_of_zeros(8 * 2**20))
    return path


def mha_bomb(folder):
    path = folder / "bomb.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 1024 1024 1000\nElementType = MET_FLOAT\n"
                     b"ElementDataFile = LOCAL\n" + bytes(4096))
    return path


def nrrd_of_zeros(folder, sizes=(256, 256, 256)) -> Path:
    """A genuine gzip-encoded NRRD of zeros but one voxel: 16 MB (default sizes) in 16 KB."""
    data = bytearray(int(np.prod(sizes)))
    data[12345] = 7
    path = folder / "big.nrrd"
    path.write_bytes(f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: {' '.join(map(str, sizes))}\nencoding: gzip\n\n"
                     .encode() + gzip.compress(bytes(data), compresslevel=1))
    return path


def nrrd_large_grid(folder):  # 4096 x 4096 x 2: an axial plane of 16.7 M pixels at 1 mm
    return nrrd_of_zeros(folder, sizes=(4096, 4096, 2))


# ---------------------------------------------------------------- builders: DICOM
def dicom_series(folder: Path, count=3, edit=None, name="series") -> Path:
    """`count` slices of pydicom's CT_small (128 x 128), 5 mm apart; `edit(dataset, index)` spoils them."""
    series = folder / name
    series.mkdir()
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for index in range(count):
        dataset = copy.deepcopy(template)
        dataset.ImagePositionPatient = [0.0, 0.0, 5.0 * index]
        dataset.SOPInstanceUID = f"{template.SOPInstanceUID}.{index}"
        dataset.InstanceNumber = index + 1
        if edit is not None:
            edit(dataset, index)
        dataset.save_as(series / f"slice{index:03d}.dcm")
    return series


def raw_value(keyword: str, text: bytes):
    """A DICOM element written as raw bytes, bypassing pydicom's validation (a file from a careless writer)."""
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
    text = text + b" " * (len(text) % 2)
    return tag, RawDataElement(tag, pydicom.datadict.dictionary_VR(tag), len(text), text, 0, False, True)


def spoil(keyword: str, text: bytes):
    def edit(dataset, index):
        tag, element = raw_value(keyword, text)
        dataset[tag] = element
    return lambda folder: dicom_series(folder, edit=edit)


def dicom_missing_rows(folder):
    return dicom_series(folder, edit=lambda dataset, index: dataset.pop(Tag(0x00280010)))


def dicom_same_position(folder):
    return dicom_series(folder, edit=lambda dataset, index: setattr(dataset, "ImagePositionPatient", [0, 0, 0]))


def dicom_huge_grid(folder):  # 3 slices of 16384 x 16384 claimed, 805 M voxels: 6.4 GB of float32, no pixels behind
    def edit(dataset, index):
        dataset.Rows = dataset.Columns = 16384
    return dicom_series(folder, edit=edit)


def deflate_bomb(size: int) -> bytes:
    """A raw deflate stream that inflates to `size` zero bytes, built from one compressed 64 MiB block repeated
    (a full flush resets the compressor, so every block is the same bytes)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(bytes(64 * 2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (size // (64 * 2**20)) + b"\x03\x00"  # an empty final block ends the stream


def deflated_series(folder, count: int):
    """A DICOM series of `count` slices saved with the deflated transfer syntax."""
    series = dicom_series(folder, count=count)
    for path in series.iterdir():
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        dataset.save_as(path, enforce_file_format=True)
    return series


def dicom_deflated_bomb(folder):
    """Two deflated DICOM slices whose data set inflates to 1 GiB each, from 1 MB on disk."""
    series = deflated_series(folder, count=2)
    for path in series.iterdir():
        offset = 132 + 12 + int(pydicom.filereader.read_file_meta_info(path).FileMetaInformationGroupLength)
        path.write_bytes(path.read_bytes()[:offset] + deflate_bomb(2**30))
    return series


def dicom_many_files(folder):
    series = dicom_series(folder, count=3)
    for index in range(60):
        (series / f"readme{index}.txt").write_text("not DICOM")
    return series


def dicom_deflated_ok(folder):
    return deflated_series(folder, count=3)


# ---------------------------------------------------------------- builders: archives
def zip_folder(folder: Path, series: Path) -> Path:
    path = folder / "series.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(series.iterdir()):
            archive.write(file, f"series/{file.name}")
    shutil.rmtree(series)
    return path


def patch_central_directory(path: Path, offset: int, value: bytes, entry=0) -> None:
    """Overwrite bytes of a zip's central directory record `entry` (PK\\1\\2, offsets from its signature)."""
    data = bytearray(path.read_bytes())
    start = -1
    for _ in range(entry + 1):
        start = data.index(b"PK\x01\x02", start + 1)
    data[start + offset : start + offset + len(value)] = value
    path.write_bytes(bytes(data))


def zip_series(folder):
    return zip_folder(folder, dicom_series(folder))


def zip_many_entries(folder):  # 20,000 empty entries, 2 MB: a 100,000-slice zip in small
    path = folder / "many.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(20_000):
            archive.writestr(f"s/{index}.dcm", b"")
    return path


def zip_declared_huge(folder):  # two entries that declare 4 GiB each
    path = zip_series(folder)
    for entry in (0, 1):
        patch_central_directory(path, 24, (2**32 - 2).to_bytes(4, "little"), entry)
    return path


def zip_of_zeros(folder):  # 96 MiB of deflated zeros in 100 KB
    path = folder / "zeros.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", bytes(48 * 2**20))
        archive.writestr("b.dcm", bytes(48 * 2**20))
    return path


def zip_lying_size(folder):  # an entry that declares 1,000 bytes and inflates to 8 MiB
    path = folder / "lying.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", bytes(8 * 2**20))
    patch_central_directory(path, 24, (1000).to_bytes(4, "little"))
    return path


def zip_bad_crc(folder):
    path = zip_series(folder)
    patch_central_directory(path, 16, b"\xde\xad\xbe\xef")
    return path


def zip_encrypted(folder):
    path = zip_series(folder)
    patch_central_directory(path, 8, b"\x01\x00")  # general purpose flag: bit 0, encrypted
    return path


def zip_traversal(folder):
    path = folder / "escape.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ok/slice.dcm", b"x")
        archive.writestr("../escaped.dcm", b"x")
    return path


def zip_symlink(folder):
    path = folder / "link.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("series/slice.dcm")
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, str(secret_beside(folder)))
    return path


# ---------------------------------------------------------------- builders: geometry and voxel types
def nifti(folder, affine, data=None, name="volume.nii.gz") -> Path:
    """A NIfTI file whose sform is `affine` as given (nibabel's `Nifti1Image(data, affine)` refuses NaN affines)."""
    data = np.random.default_rng(0).integers(0, 1000, (8, 8, 8)).astype(np.int16) if data is None else data
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_sform(affine, code=2)
    path = folder / name
    nib.save(nib.Nifti1Image(data, None, header), path)
    return path


def with_affine(**entries):
    def build(folder):
        affine = np.eye(4)
        for key, value in entries.items():
            affine[int(key[1]), int(key[2])] = value
        return nifti(folder, affine)
    return build


def nifti_parallel_axes(folder):
    return nifti(folder, np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))


def nifti_complex(folder):
    data = np.ones((8, 8, 8)) + 1j * np.arange(512).reshape(8, 8, 8)
    return nifti(folder, np.eye(4), data=data.astype(np.complex64))


def nifti_rgb(folder):
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.arange(512).reshape(8, 8, 8) % 255
    return nifti(folder, np.eye(4), data=rgb)


def nifti_qform_disagrees(folder):
    image = nib.Nifti1Image(np.random.default_rng(0).integers(0, 1000, (8, 8, 8)).astype(np.int16), np.eye(4))
    image.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    image.set_sform(np.eye(4), code=2)
    path = folder / "volume.nii.gz"
    nib.save(image, path)
    return path


def npy(folder, array, version=(1, 0), name="volume.npy") -> Path:
    path = folder / name
    with open(path, "wb") as handle:
        np.lib.format.write_array(handle, array, version=version, allow_pickle=True)
    return path


def npy_v3(folder):
    return npy(folder, np.arange(512, dtype=np.int16).reshape(8, 8, 8), version=(3, 0))


def npy_object(folder):
    return npy(folder, np.array([[[{"pickled": 1}]] * 2] * 2, dtype=object))


def npy_complex(folder):
    return npy(folder, np.ones((8, 8, 8), dtype=np.complex128))


def shapes_are(*shapes):
    return lambda result: result["shapes"] == [list(shape) for shape in shapes]


def planes_within(max_pixels):
    def check(result):
        return all(rows * cols <= max_pixels and min(rows, cols) >= 1 for rows, cols, _ in result["images"])
    return check


SMALL = {"max_bytes": 128 * 2**20}
CASES = [
    # Detached headers that name other files, and paths that are not files.
    Case("nhdr_absolute_data_file", nhdr_absolute, "volume.nhdr: the header's data file .* is not beside it"),
    Case("nhdr_parent_data_file", nhdr_parent, "volume.nhdr: the header's data file .* is not beside it"),
    Case("nhdr_symlink_data_file", nhdr_symlink, "volume.nhdr: .*'data.raw' is a link that leads out"),
    Case("nhdr_list_with_parent", nhdr_list, "volume.nhdr: the header's data file '../.*' is not beside it"),
    Case("nhdr_pattern_with_parent", nhdr_pattern, "volume.nhdr: the header's data file '../.*' is not beside it"),
    Case("nhdr_fifo_data_file", nhdr_fifo, "volume.nhdr: the header's data file 'data.raw' is not a regular file"),
    Case("nhdr_device_data_file", nhdr_device, "volume.nhdr: the header's data file '/dev/urandom' is not beside it"),
    Case("nhdr_data_beside", nhdr_beside, None, check=shapes_are((8, 8, 8))),
    Case("mhd_absolute_data_file", mhd_absolute, "volume.mhd: the header's data file .* is not beside it"),
    Case("mhd_parent_data_file", mhd_parent, "volume.mhd: the header's data file .* is not beside it"),
    Case("mha_external_data_file", mha_external, "volume.mha: the header's data file .* is not beside it"),
    Case("mhd_data_beside", mhd_beside, None, check=shapes_are((8, 8, 8))),
    Case("nrrd_holding_a_metaimage", nrrd_disguised, "volume.nrrd: not a NRRD file"),
    Case("input_is_a_device", input_device, "volume.nii.gz: the path is not a regular file"),
    Case("input_is_a_fifo", input_fifo, "volume.nii: the path is not a regular file"),
    # Memory bombs: headers claiming more than the bytes limit, refused before reading.
    Case("nifti_bytes_bomb", nifti_bytes_bomb, r"bomb.nii.gz: reading it takes about 5,000 MiB .*ReadLimits.max_bytes"),
    Case("nifti_rescaled_bomb", nifti_scaled_bomb, r"bomb.nii.gz: .*rescaled to float64"),
    Case("nifti_within_default_limits", nifti_real_data, None, check=shapes_are((384, 384, 384))),
    Case("nifti_above_lowered_limit", nifti_real_data, r"big.nii.gz: reading it takes .* above the 128 MiB",
         limits=SMALL),
    Case("nifti_out_of_memory", nifti_real_data, "big.nii.gz: the volume does not fit in this process's memory",
         headroom=100 * 2**20),
    Case("npy_bytes_bomb", npy_bytes_bomb, r"bomb.npy: reading it takes about 8,\d+ MiB"),
    Case("nrrd_gzip_bomb", nrrd_gzip_bomb, r"bomb.nrrd: reading it takes about"),
    Case("mha_bomb", mha_bomb, r"bomb.mha: reading it takes about"),
    Case("nrrd_above_lowered_limit", nrrd_of_zeros, r"big.nrrd: reading it takes .* above the 64 MiB",
         limits={"max_bytes": 64 * 2**20}),
    Case("nrrd_within_default_limits", nrrd_of_zeros, None, check=shapes_are((256, 256, 256))),
    Case("dicom_huge_grid", dicom_huge_grid, r"series: reading it takes about 6,144 MiB"),
    Case("dicom_deflated_bomb", dicom_deflated_bomb, r"series: the deflated DICOM file .* inflates to more than 512",
         limits={"max_bytes": 512 * 2**20}),
    Case("dicom_deflated_study_bomb", dicom_deflated_bomb, r"series: the deflated DICOM file .* more than 512",
         op="study", limits={"max_bytes": 512 * 2**20}),
    Case("dicom_deflated_within_limits", dicom_deflated_ok, None, check=shapes_are((3, 128, 128))),
    Case("dicom_folder_with_many_files", dicom_many_files, "series: the folder holds at least 51 files, more than 50",
         limits={"max_files": 50}),
    # Archives: disk and time bombs, damaged and hostile entries.
    Case("zip_series", zip_series, None, check=shapes_are((3, 128, 128))),
    Case("zip_many_entries", zip_many_entries, "many.zip: the archive holds 20,000 entries, more than 10,000"),
    Case("zip_many_entries_study", zip_many_entries, "many.zip: the archive holds 20,000 entries", op="study"),
    Case("zip_declared_huge", zip_declared_huge, "series.zip: the archive unpacks to more than 4,096 MiB"),
    Case("zip_of_zeros_lowered_limit", zip_of_zeros, "zeros.zip: the archive unpacks to more than 64 MiB",
         limits={"max_unpacked_bytes": 64 * 2**20}),
    Case("zip_lying_entry_size", zip_lying_size, "lying.zip: the entry 'a.dcm' cannot be extracted .*CRC"),
    Case("zip_bad_crc", zip_bad_crc, "series.zip: the entry .* cannot be extracted .*CRC"),
    Case("zip_encrypted", zip_encrypted, "series.zip: the entry .* is encrypted"),
    Case("zip_traversal", zip_traversal, "escape.zip: the entry '../escaped.dcm' tries to leave", op="study"),
    Case("zip_symlink", zip_symlink, "link.zip: the entry 'series/slice.dcm' is a symbolic link"),
    # The viewer: valid volumes whose spacing asks for giant images.
    Case("viewer_100000_mm_slices", with_affine(a22=100_000.0), None, op="render", check=planes_within(2048**2)),
    Case("viewer_tiny_pixels", with_affine(a00=1e-4), None, op="render", check=planes_within(2048**2)),
    Case("viewer_large_grid", nrrd_large_grid, None, op="render", check=planes_within(2048**2)),
    # Geometry and voxel types that used to fail unclearly or silently.
    Case("affine_nan", with_affine(a00=float("nan")), "volume.nii.gz: the affine .* holds NaN or Inf"),
    Case("affine_inf", with_affine(a13=float("inf")), "volume.nii.gz: the affine .* holds NaN or Inf"),
    Case("affine_zero_column", with_affine(a11=0.0), "volume.nii.gz: the affine .* is singular"),
    Case("affine_parallel_axes", nifti_parallel_axes, "volume.nii.gz: the affine .* is singular"),
    Case("nifti_complex", nifti_complex, "volume.nii.gz: the voxels are complex"),
    Case("nifti_rgb24", nifti_rgb, r"volume.nii.gz: the voxels are RGB colour .*data\['R'\]"),
    Case("nifti_qform_disagrees", nifti_qform_disagrees, None,
         check=lambda result: result["spacing"] == [1.0, 1.0, 1.0]),
    Case("dicom_zero_spacing", spoil("PixelSpacing", b"0\\0.5"), "series: slice000.dcm: PixelSpacing must be positive"),
    Case("dicom_negative_spacing", spoil("PixelSpacing", b"-1\\1"), "series: slice000.dcm: PixelSpacing must be pos"),
    Case("dicom_nan_spacing", spoil("PixelSpacing", b"nan\\1"), "series: slice000.dcm: PixelSpacing must be 2 fin"),
    Case("dicom_one_spacing_value", spoil("PixelSpacing", b"0.5"), "series: slice000.dcm: PixelSpacing must be 2"),
    Case("dicom_text_slope", spoil("RescaleSlope", b"abc"), "series: slice000.dcm has a non-numeric RescaleSlope"),
    Case("dicom_text_intercept", spoil("RescaleIntercept", b"x1"), "series: .* non-numeric RescaleIntercept"),
    Case("dicom_nan_position", spoil("ImagePositionPatient", b"0\\nan\\0"), "series: .*ImagePositionPatient must"),
    Case("dicom_missing_rows", dicom_missing_rows, "series: slice000.dcm needs Rows and Columns"),
    Case("dicom_same_position", dicom_same_position, "series: two slices share a position"),
    Case("npy_version_3", npy_v3, None, check=shapes_are((8, 8, 8))),
    Case("npy_object_dtype", npy_object, "volume.npy: the .npy array holds Python objects"),
    Case("npy_complex", npy_complex, "volume.npy: the voxels are complex"),
]
WARNINGS = {"nifti_qform_disagrees": "volume.nii.gz: the sform and the qform disagree"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Build every case, run them all through the server, and return `{name: (case folder, report, outcome)}`."""
    root = tmp_path_factory.mktemp("hostile")
    specs = []
    for case in CASES:
        folder = root / case.name / "case"
        folder.mkdir(parents=True)
        (root / case.name / "tmp").mkdir()
        source = case.build(folder)
        specs.append({"name": case.name, "input": str(source), "op": case.op, "limits": case.limits,
                      "headroom": case.headroom, "tmp": str(root / case.name / "tmp"),
                      "out": str(root / case.name / "outcome.json")})
    (root / "cases.json").write_text(json.dumps(specs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    server = subprocess.run(
        [sys.executable, "-c", SERVER, str(root / "cases.json"), str(ADDRESS_HEADROOM), str(CASE_TIMEOUT_S)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert server.returncode == 0, server.stderr[-3000:]
    reports = json.loads(server.stdout.strip().splitlines()[-1])
    results = {}
    for spec in specs:
        out = Path(spec["out"])
        results[spec["name"]] = (root / spec["name"], reports[spec["name"]],
                                 json.loads(out.read_text()) if out.exists() else None)
    return results


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_file(outcomes, case):
    folder, report, outcome = outcomes[case.name]
    assert not report["timed_out"], f"{case.name} ran past {CASE_TIMEOUT_S} s"
    assert outcome is not None, f"{case.name}: the child died without a result (status {report['status']})"
    assert report["max_rss_kb"] * 1024 < MAX_RSS_BYTES, f"{case.name}: peak RSS {report['max_rss_kb'] / 2**20:.2f} GB"
    if case.expect is None:
        assert "result" in outcome, outcome.get("traceback")
        assert case.check is None or case.check(outcome["result"]), outcome["result"]
    else:
        assert "error" in outcome, f"{case.name} was read: {outcome['result']}"
        assert outcome["volume_error"], outcome["traceback"]
        assert re.search(case.expect, outcome["message"]), outcome["message"]  # each phrase starts with the file
    assert SECRET.decode() not in json.dumps(outcome)
    assert not any((folder / "tmp").iterdir()), f"{case.name} left files in its temporary folder"
    assert not (folder / "escaped.dcm").exists() and not (folder.parent / "escaped.dcm").exists()
    if case.name in WARNINGS:
        assert any(WARNINGS[case.name] in warning for warning in outcome["warnings"]), outcome["warnings"]
