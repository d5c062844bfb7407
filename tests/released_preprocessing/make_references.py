"""Make `references.safetensors`: what the released encoders' OWN preprocessing code gives on nilearn's MNI152
template (1 mm) and on a Hounsfield-unit copy of it, for `tests/test_released_preprocessing.py`.

    python -m venv --system-site-packages /work/venvs/preproc
    /work/venvs/preproc/bin/pip install --no-deps torchio==1.2.1 jaxtyping humanize deprecated hydra-core==1.3.2 \
        omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 colipri==0.1.3 dynamic-network-architectures "timm<1.0.23" \
        open_clip_torch ftfy
    /work/venvs/preproc/bin/python tests/released_preprocessing/make_references.py SRC OUT

SRC holds the sources' checkouts: `hlip` (Zch0414/hlip at HLIP_COMMIT), `Merlin` (StanfordMIMI/Merlin at
MERLIN_COMMIT) and `Med3DVLM` (mirthAI/Med3DVLM); colipri 0.1.3 comes from PyPI. Each source's pipeline runs as its code runs it:

- COLIPRI: `colipri.get_processor(image_only=True).process_images(path)` (TorchIO, the package's own config);
- HLIP (CT-RATE): `data/ct_rate/process.py` `load_nifti_file` (resampling to 3 x 1 x 1 mm, the volume saved as
  `.pt` as that script saves it), then the dataset of `src/hlip_test/zeroshot_ct_rate.py` `get_data` (window,
  pad / crop, normalisation);
- Merlin: `merlin/data/monai_transforms.py` `ImageTransforms` (MONAI);
- DCFormer-SigLIP (Med3DVLM at MED3DVLM_COMMIT): `src/utils/m3d_cap_data_prepare_128.py` `process_subfolder` on the
  template quantised to 8 bits and written as one PNG per canonical (S, A, R) slice, as M3D-Cap's volumes are stored,
  with the transform its `__main__` block builds (`CropForeground(allow_smaller=True)`, `Resize([128, 256, 256],
  mode="bilinear")`); voxlm reads the same 8-bit values from a NIfTI.

torchvision is never installed: timm, open_clip and HLIP import it, and what they use of it is stubbed below
(`Normalize` is `(x - mean) / std`, as torchvision's; FrozenBatchNorm2d, InterpolationMode and the rest are never
called here). The outputs are stored every STRIDE-th voxel along each axis, with each full array's sum and sum of
squares, to keep the fixture small.
"""

import importlib.abc
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import save_file

HLIP_COMMIT = "fe8d764"
MERLIN_COMMIT = "2489a96"
MED3DVLM_COMMIT = "cbbd633"
STRIDE = 7


class PlaceholderType(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"stub.{name}"  # InterpolationMode.BOX and the like: distinct keys of timm's tables


class Placeholder(metaclass=PlaceholderType):
    """What a stubbed torchvision name stands for: importable, never called by the preprocessing."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("a stubbed torchvision class was called")


class Normalize:
    """torchvision's `Normalize` on a tensor: `(x - mean) / std`."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        return (tensor - self.mean) / self.std


class StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder


class StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Every `torchvision.*` module as a `StubModule` (`transforms.Normalize` the real formula)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        if module.__name__ == "torchvision.transforms":
            module.Normalize = Normalize


def stub_torchvision() -> None:
    """Stub torchvision (after transformers has found none, so that it does not use the stub)."""
    from transformers.utils.import_utils import is_torchvision_available

    assert not is_torchvision_available()
    sys.meta_path.insert(0, StubTorchvision())


def module_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mni_inputs(folder: Path) -> dict[str, Path]:
    """nilearn's MNI152 template as nilearn gives it, and a copy mapped linearly to -1000..2000 (Hounsfield-like)."""
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=1)
    data = image.get_fdata(dtype=np.float32)
    paths = {"mni": folder / "mni.nii.gz", "mni_hu": folder / "mni_hu.nii.gz"}
    nib.save(nib.Nifti1Image(data, image.affine), paths["mni"])
    nib.save(nib.Nifti1Image((data * 3000.0 - 1000.0).astype(np.float32), image.affine), paths["mni_hu"])
    return paths


def quantised_mni(folder: Path) -> tuple[Path, Path]:
    """The template in 8 bits as a NIfTI, and as a folder of PNG slices `0.png, 1.png, ...` of its canonical
    (S, A, R) layout (the file is stored in RAS: canonical = the array's axes reversed)."""
    from nilearn.datasets import load_mni152_template
    from PIL import Image

    image = load_mni152_template(resolution=1)
    data = np.round(image.get_fdata() / image.get_fdata().max() * 255).astype(np.uint8)
    nifti = folder / "mni_8bit.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), image.affine), nifti)
    slices = folder / "case" / "mni_8bit"
    slices.mkdir(parents=True)
    for index, plane in enumerate(np.transpose(data, (2, 1, 0))):
        Image.fromarray(plane).save(slices / f"{index}.png")
    return nifti, slices.parent


def dcformer_reference(case: Path, med3dvlm: Path, work: Path) -> torch.Tensor:
    import monai.transforms as mtf
    import SimpleITK as sitk

    prepare = module_from(med3dvlm / "src" / "utils" / "m3d_cap_data_prepare_128.py", "med3dvlm_prepare_128")
    # The transform of the script's `__main__` block, which `process_subfolder` reads as a module global.
    prepare.transform = mtf.Compose([mtf.CropForeground(allow_smaller=True),
                                     mtf.Resize(spatial_size=[128, 256, 256], mode="bilinear")])
    prepare.process_subfolder(case.name, str(case.parent), str(work))
    return torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(work / case.name / "mni_8bit.nii.gz"))))[None]


def colipri_reference(path: Path) -> torch.Tensor:
    import colipri

    return colipri.get_processor(image_only=True).process_images(str(path))[0].data.float()  # (1, R, A, S)


def hlip_reference(path: Path, hlip: Path, work: Path) -> torch.Tensor:
    """HLIP's CT-RATE pipeline on `path`: the volume resampled and saved by process.py, then read by the zero-shot
    dataset (a one-row metadata CSV and the folder layout that dataset expects)."""
    import pandas as pd

    sys.path[:0] = [str(hlip / "src"), str(hlip / "src" / "hlip_test")]
    process = module_from(hlip / "data" / "ct_rate" / "process.py", "hlip_ct_rate_process")
    zeroshot = module_from(hlip / "src" / "hlip_test" / "zeroshot_ct_rate.py", "hlip_zeroshot_ct_rate")
    name = "valid_1_a_1.nii.gz"  # CT-RATE's naming, which both scripts split into folders
    folder = work / "hlip" / "valid" / "valid_1" / "valid_1_a"
    folder.mkdir(parents=True)
    (folder / name).write_bytes(path.read_bytes())
    spacing = nib.load(path).header.get_zooms()  # (x, y, z) mm
    row = {"VolumeName": name, "RescaleSlope": 1.0, "RescaleIntercept": 0.0,
           "XYSpacing": str([float(spacing[0]), float(spacing[1])]), "ZSpacing": float(spacing[2])}
    args = process.get_args_parser().parse_args(["--data", "valid", "--root-dir", str(work / "hlip")])
    volume, stem = process.load_nifti_file(row, args)
    torch.save(torch.from_numpy(volume).to(torch.float32), folder / f"{stem}.pt")  # process.py's float32 save
    labels = pd.DataFrame([{"VolumeName": name, **dict.fromkeys(zeroshot.CLASSNAMES, 0)}])
    labels.to_csv(work / "labels.csv", index=False)
    zeroshot_args = zeroshot.get_args_parser().parse_args(["--data-root", str(work / "hlip"),
                                                           "--zeroshot-ct-rate", str(work / "labels.csv"),
                                                           "--workers", "0"])
    _, image, _ = next(iter(zeroshot.get_data(zeroshot_args)))
    return image[0, 0].float()  # (1, 1, 1, D, H, W) -> (1, D, H, W)


def merlin_reference(path: Path, merlin: Path) -> torch.Tensor:
    transforms = module_from(merlin / "merlin" / "data" / "monai_transforms.py", "merlin_monai_transforms")
    return torch.as_tensor(transforms.ImageTransforms({"image": str(path)})["image"]).float()  # (1, R, A, S)


def main(source: Path, output: Path) -> None:
    stub_torchvision()
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for input_name, path in mni_inputs(Path(tmp)).items():
            references = {"colipri": colipri_reference(path),
                          "hlip": hlip_reference(path, source / "hlip", Path(tmp) / input_name),
                          "merlin": merlin_reference(path, source / "Merlin")}
            for model, array in references.items():
                add_reference(tensors, f"{model}.{input_name}", array)
        nifti, case = quantised_mni(Path(tmp))
        add_reference(tensors, "dcformer.mni_8bit", dcformer_reference(case, source / "Med3DVLM", Path(tmp) / "out"))
    save_file(tensors, str(output), metadata={"stride": str(STRIDE), "hlip": HLIP_COMMIT, "merlin": MERLIN_COMMIT,
                                              "med3dvlm": MED3DVLM_COMMIT, "colipri": "0.1.3"})


def add_reference(tensors: dict, key: str, array: torch.Tensor) -> None:
    """`array (1, D, H, W)` every STRIDE-th voxel, with its shape, sum and sum of squares, under `key`."""
    tensors[f"{key}.strided"] = array[0, ::STRIDE, ::STRIDE, ::STRIDE].float().contiguous()
    tensors[f"{key}.shape"] = torch.tensor(array.shape)
    tensors[f"{key}.sum"] = array.double().sum()
    tensors[f"{key}.sum_of_squares"] = array.double().square().sum()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
