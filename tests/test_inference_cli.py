"""`voxlm predict | retrieve | classify` and the shared inference code, on files that PyPI packages ship (nilearn's
MNI152 T1, pydicom's CT series) and on bad input; box and mask geometry back on the input's grid; studies (several
files, a DICOM folder or .zip of several series) with the mask on a chosen series; the slice viewer."""

import json
import zipfile
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pydicom
import pytest
import torch
from study_files import LOCALISER, SECOND_SERIES, write_dicom_study, zip_folder
from tiny_models import DEMO_SEG_QUESTION

from voxlm import cli, inference, viewer
from voxlm.processing import VolumeMetadata, VoxVolumeProcessor, read_volume

CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
# The MNI152 T1 file that nilearn ships (1 mm, 197 x 233 x 189).
MNI152_T1 = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="module")
def voxlm_pair(demo_model_dirs):
    return inference.load_voxlm(str(demo_model_dirs[0]))


def run_cli(argv, capsys) -> str:
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_predict_on_nilearns_mni152_t1_writes_the_mask_on_its_grid_and_affine(demo_model_dirs, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    printed = run_cli(["predict", str(MNI152_T1), "--question", DEMO_SEG_QUESTION, "--mask-out", str(out),
                       "--model", str(demo_model_dirs[0]), "--modality", "MR", "--json"], capsys)
    result = json.loads(printed)
    assert "[SEG]" in result["answer"] and result["has_seg"] and result["mask_path"] == str(out)
    assert (result["modality"], result["modality_reason"]) == ("MR", "given by the caller")
    source, mask = nib.load(MNI152_T1), nib.load(out)
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine)
    assert 0 < result["mask_voxels"] == int(np.asarray(mask.dataobj).sum()) < np.prod(source.shape)


def test_predict_on_the_pydicom_ct_series_folder_and_zip(demo_model_dirs, tmp_path, capsys):
    archive = tmp_path / "ct5n.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in CT5N.iterdir():
            handle.write(path, f"CT5N/{path.name}")
    source = read_volume(CT5N)
    masks = []
    for volume, out in ((CT5N, tmp_path / "folder.nii.gz"), (archive, tmp_path / "zip.nii.gz")):
        printed = run_cli(["predict", str(volume), "--question", DEMO_SEG_QUESTION, "--mask-out", str(out),
                           "--model", str(demo_model_dirs[0])], capsys)
        assert f"written to {out}" in printed and "\nmodality: CT (the file's DICOM Modality tag)\n" in printed
        mask = nib.load(out)
        assert mask.shape == source.source_shape
        np.testing.assert_allclose(mask.affine, source.affine)
        masks.append(np.asarray(mask.dataobj))
    np.testing.assert_array_equal(masks[0], masks[1])


def test_prediction_mask_reads_back_onto_the_canonical_grid(mni_path, voxlm_pair, tmp_path):
    """The saved NIfTI and the canonical mask the viewer draws are the same voxels, through the file's affine."""
    steps = []
    prediction = inference.predict(mni_path, DEMO_SEG_QUESTION, *voxlm_pair, modality="MR", max_new_tokens=8,
                                   on_step=lambda done, total: steps.append((done, total)))
    assert prediction.has_seg and prediction.canonical_mask.shape == prediction.volume.array.shape
    back = read_volume(prediction.save_mask(tmp_path / "m.nii.gz"), allow_constant=True).array
    np.testing.assert_array_equal(back, prediction.canonical_mask)
    assert steps and [d for d, _ in steps] == list(range(1, len(steps) + 1)) and {t for _, t in steps} == {8}


def test_predict_on_a_study_of_two_files_puts_the_mask_on_the_chosen_series(demo_model_dirs, tmp_path, capsys):
    """nilearn's MNI152 T1 and pydicom's CT series as one study: the answer reads both, the mask is on the grid and
    affine of the series asked for."""
    sources = {0: nib.load(MNI152_T1), 1: read_volume(CT5N)}
    for series, source in sources.items():
        out = tmp_path / f"mask{series}.nii.gz"
        result = json.loads(run_cli(["predict", str(MNI152_T1), str(CT5N), "--question", DEMO_SEG_QUESTION,
                                     "--mask-out", str(out), "--mask-series", str(series),
                                     "--model", str(demo_model_dirs[0]), "--json"], capsys))
        assert result["has_seg"] and result["mask_series"] == series and result["skipped_series"] == []
        assert result["series"] == [MNI152_T1.name, "SmartScore - Gated 0.5 sec"]
        # Without --modality: the MRI by its intensities (no air), the CT by its DICOM tag.
        assert [used["modality"] for used in result["series_modalities"]] == ["MR", "CT"]
        assert result["series_modalities"][0]["reason"].startswith("no voxel below -200 (the lowest is 0)")
        assert result["series_modalities"][1]["reason"] == "the file's DICOM Modality tag"
        mask = nib.load(out)
        assert mask.shape == (source.shape if series == 0 else source.source_shape)
        np.testing.assert_allclose(mask.affine, source.affine)


def test_predict_on_a_dicom_study_folder_and_zip_lists_its_series(demo_model_dirs, tmp_path, capsys):
    folder = write_dicom_study(tmp_path / "study")
    archive = zip_folder(folder, tmp_path / "study.zip")
    printed = [run_cli(["predict", str(source), "--question", DEMO_SEG_QUESTION, "--model", str(demo_model_dirs[0])],
                       capsys) for source in (folder, archive)]
    assert printed[0] == printed[1]
    lines = printed[0].splitlines()
    assert "[SEG]" in lines[0] and lines[1] == "study of 2 series; mask and boxes on series 0:"
    tag = "CT (the file's DICOM Modality tag)"
    assert lines[2:4] == [f"  0. SmartScore - Gated 0.5 sec: {tag}", f"  1. {SECOND_SERIES}: {tag}"]
    assert lines[4].startswith(f"  skipped: {LOCALISER}: the series has a single slice")


def test_one_series_study_answers_like_the_volume(voxlm_pair, mni_path):
    alone = inference.predict(mni_path, DEMO_SEG_QUESTION, *voxlm_pair, modality="MR", max_new_tokens=8)
    listed = inference.predict([mni_path], DEMO_SEG_QUESTION, *voxlm_pair, modality="MR", max_new_tokens=8)
    assert alone.mask is not None and listed.text == alone.text and not listed.series and listed.mask_series is None
    np.testing.assert_array_equal(listed.mask, alone.mask)


def test_study_prediction_returns_the_chosen_series_for_viewers(voxlm_pair, mni_path):
    study = inference.read_study_input([CT5N, mni_path], voxlm_pair[1].image_processor)
    prediction = inference.predict(study, DEMO_SEG_QUESTION, *voxlm_pair, max_new_tokens=8, mask_series=1)
    assert prediction.series == ["SmartScore - Gated 0.5 sec", "mni152_t1.nii.gz"] and prediction.mask_series == 1
    assert prediction.volume is study.volumes[1] and prediction.canonical_mask.shape == study.volumes[1].array.shape
    assert prediction.to_dict()["series"] == prediction.series


def test_answer_without_seg_has_no_mask(voxlm_pair, tmp_path):
    model, processor = voxlm_pair
    volume = torch.rand(16, 48, 48) * 80
    prediction = inference.predict(volume, DEMO_SEG_QUESTION, model, processor, max_new_tokens=1)
    assert not prediction.has_seg and prediction.mask is None  # one token cannot reach "[SEG]"
    with pytest.raises(ValueError, match="no \\[SEG\\]"):
        prediction.save_mask(tmp_path / "none.nii.gz")


def test_boxes_map_to_canonical_voxels_and_world_mm(tmp_path):
    data = np.zeros((12, 10, 8), np.int16) + 5
    data[3, 7, 2] = 100
    affine = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "x.nii.gz")
    volume = read_volume(tmp_path / "x.nii.gz")
    marked = np.argwhere(volume.array == 100)[0]
    np.testing.assert_allclose(volume.canonical_to_world(marked[None])[0], (affine @ [3, 7, 2, 1])[:3])
    metadata = VolumeMetadata(volume=volume, canonical_shape=volume.array.shape, crop=((2, 6), (0, 10), (4, 8)))
    corners = VoxVolumeProcessor(image_size=(4, 8, 8)).box_to_canonical([0, 0, 0, 1, 0.5, 0.25], metadata)
    # The whole crop along D (voxels 2..5), half of H (0..4), a quarter of W (voxel 4): edges at -0.5 / +0.5.
    np.testing.assert_allclose(corners, [[1.5, -0.5, 3.5], [5.5, 4.5, 4.5]])
    assert viewer.box_voxel_ranges(corners, volume.array.shape) == [(2, 5), (0, 4), (4, 4)]


def test_retrieve_ranks_every_report_by_cosine_similarity(demo_model_dirs, tmp_path, capsys):
    from voxlm.data import generate_case

    reports = [generate_case(seed).report for seed in range(5)]
    (tmp_path / "reports.json").write_text(json.dumps([{"id": i, "report": r} for i, r in enumerate(reports)]))
    np.save(tmp_path / "case.npy", generate_case(7, shape=(16, 48, 48)).volume)
    hits = json.loads(run_cli(["retrieve", str(tmp_path / "case.npy"), "--reports", str(tmp_path / "reports.json"),
                               "--model", str(demo_model_dirs[1]), "--top-k", "5", "--json"], capsys))
    clip = inference.load_voxclip(str(demo_model_dirs[1]))
    expected = inference.embed_reports(reports, clip) @ inference.embed_volume(tmp_path / "case.npy", clip)
    assert [h["index"] for h in hits] == expected.argsort(descending=True).tolist()
    assert [h["score"] for h in hits] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-4)
    assert [h["report"] for h in hits] == [reports[h["index"]] for h in hits]


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_reports_files_in_text_and_csv(tmp_path, suffix):
    path = tmp_path / f"reports{suffix}"
    path.write_text("report\nfirst one\n\nsecond one\n" if suffix == ".csv" else "first one\n\nsecond one\n")
    assert inference.read_reports(path) == ["first one", "second one"]


def test_classify_gives_a_distribution_over_the_labels(demo_model_dirs, tmp_path, capsys):
    np.save(tmp_path / "case.npy", (np.random.default_rng(0).random((16, 48, 48)) * 80).astype(np.float32))
    labels = ["intracranial hemorrhage", "skull fracture", "no acute abnormality"]
    result = json.loads(run_cli(["classify", str(tmp_path / "case.npy"), "--labels", ",".join(labels),
                                 "--model", str(demo_model_dirs[1]), "--json"], capsys))
    assert list(result) == labels and sum(result.values()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "{mni}", "--question", "hi", "--model", "{tmp}/nowhere"], "voxlm quickstart"),
        (["predict", "{tmp}/broken.nii.gz", "--question", "hi", "--model", "{voxlm}"], "broken.nii.gz: not a readable"),
        (["predict", "{mni}", "--question", "  ", "--model", "{voxlm}"], "question is empty"),
        (["classify", "{mni}", "--labels", "only one", "--model", "{clip}"], "at least two labels"),
        (["retrieve", "{mni}", "--reports", "{tmp}/missing.json", "--model", "{clip}"], "no such reports file"),
        (["retrieve", "{mni}", "--reports", "{tmp}/empty.json", "--model", "{clip}"], "holds no reports"),
        (["classify", "{mni}", "--labels", "a,b", "--model", "{voxlm}"], "not a VoxCLIP"),
        (["predict", "{mni}", "{mni}", "{mni}", "--question", "hi", "--model", "{voxlm}"],
         "the study holds 3 series (mni152_t1.nii.gz; mni152_t1.nii.gz; mni152_t1.nii.gz), more than the 2"),
        (["predict", "{mni}", "{mni}", "--question", "hi", "--mask-series", "2", "--model", "{voxlm}"],
         "mask_series 2 does not exist: the study holds 2 series (0 to 1)"),
        (["predict", "{tmp}", "--question", "hi", "--model", "{voxlm}"], "no DICOM image slices"),
    ],
)
def test_bad_input_ends_with_a_message_not_a_traceback(argv, message, mni_path, demo_model_dirs, tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "empty.json").write_text("[]")
    names = dict(mni=mni_path, tmp=tmp_path, voxlm=demo_model_dirs[0], clip=demo_model_dirs[1])
    with pytest.raises(SystemExit) as stop:
        cli.main([arg.format(**names) for arg in argv])
    assert message in str(stop.value.code) and str(stop.value.code).startswith(f"voxlm {argv[0]}: ")


@pytest.mark.parametrize("command", ["predict", "retrieve", "classify"])
def test_help_explains_each_option_with_an_example(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert f"Example:\n  voxlm {command} " in text and "--model" in text and "--json" in text


def test_viewer_draws_mask_and_box_in_radiological_orientation():
    display = np.zeros((4, 6, 8), np.float32)
    display[3] = 1.0  # the most superior slice is bright
    mask = np.zeros(display.shape, np.uint8)
    mask[:, 0, 0] = 1  # the most posterior row, the patient's left-most column
    corners = np.array([[0.5, 1.5, 2.5], [2.5, 3.5, 5.5]])  # voxels d 1..2, h 2..3, w 3..5
    axial, coronal, sagittal = viewer.render_planes(display, (1, 2, 4), (1.0, 1.0, 1.0), mask, [corners])
    assert axial.shape[:2] == (256, round(256 * 8 / 6))  # (H, W) = 6 x 8 voxels, shorter side to 256 px
    red = (axial[..., 0] > 100) & (axial[..., 1] < 60)
    # Flipped both ways: canonical (h=0, w=0) lands at the bottom right of the axial image.
    assert red[-1, -1] and not red[0, 0]
    yellow = (axial[..., 0] > 200) & (axial[..., 1] > 180) & (axial[..., 2] < 50)
    rows, cols = np.nonzero(yellow)
    pixel = 256 / 6  # pixels per voxel; the flipped box covers rows 2..3 and columns 2..4
    assert rows.size and rows.min() >= 2 * pixel - 1 and rows.max() < 4 * pixel + 1
    assert cols.min() >= 2 * pixel - 1 and cols.max() < 5 * pixel + 1
    # Superior at the top of the coronal image: its top rows are bright.
    assert coronal[0].mean() > 200 and coronal[-1].mean() < 50
    assert sagittal.shape[0] == coronal.shape[0]
    with pytest.raises(ValueError, match="Unknown window"):
        viewer.window_settings("tissue")


def test_slices_carry_the_patients_directions_on_their_edges(tmp_path):
    """A bright block on the patient's left, anterior and superior, in a file stored with an LPS affine (as DICOM
    converters write): in each plane it lies on the sides labelled with those letters, and the letters are drawn."""
    from PIL import Image

    data = np.zeros((20, 24, 16), np.float32)
    data[14:19, 2:7, 10:15] = 1.0  # x = -i mm: high i is the patient's left; y = -j: low j anterior; high k superior
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "lps.nii.gz")
    volume = read_volume(tmp_path / "lps.nii.gz")
    centre = np.argwhere(volume.array > 0.5).mean(axis=0).round().astype(int)
    expected = {"axial": {"L", "A"}, "coronal": {"L", "S"}, "sagittal": {"A", "S"}}
    for plane, index in zip(viewer.PLANES, centre):
        plain = viewer.render_plane(volume.array, plane, index, letters=False)
        labelled = viewer.render_plane(volume.array, plane, index)
        rows, cols = np.nonzero(plain[..., 0] > 128)
        letters = viewer.orientation_letters(plane)
        vertical = "top" if rows.mean() < plain.shape[0] / 2 else "bottom"
        horizontal = "left" if cols.mean() < plain.shape[1] / 2 else "right"
        assert {letters[vertical], letters[horizontal]} == expected[plane], plane
        blue = (labelled[..., 2].astype(int) - labelled[..., 0]) > 60  # LETTER_COLOUR; grey voxels have R == B
        height, width = blue.shape
        band = 40  # the letters sit within a few pixels of the middle of each edge
        middles = {"top": blue[:band, width // 2 - band : width // 2 + band],
                   "bottom": blue[-band:, width // 2 - band : width // 2 + band],
                   "left": blue[height // 2 - band : height // 2 + band, :band],
                   "right": blue[height // 2 - band : height // 2 + band, -band:]}
        assert all(region.any() for region in middles.values()) and blue.sum() < 0.05 * blue.size, plane
    # The glyph on the axial image's right edge is the L that `orientation_letters` names, not an R.
    def glyph(letter):
        image = Image.new("RGB", (width, height))
        viewer.draw_letters(image, {"right": letter})
        return (np.asarray(image)[..., 2].astype(int) - np.asarray(image)[..., 0]) > 60

    axial = viewer.render_plane(volume.array, "axial", centre[0])
    height, width = axial.shape[:2]
    quarter = slice(width - width // 4, width)  # right of the top and bottom letters
    drawn = ((axial[..., 2].astype(int) - axial[..., 0]) > 60)[:, quarter]
    assert viewer.orientation_letters("axial")["right"] == "L" and drawn.any()
    np.testing.assert_array_equal(drawn, glyph("L")[:, quarter])
    assert not np.array_equal(drawn, glyph("R")[:, quarter])
