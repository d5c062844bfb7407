"""The Space (`spaces/app.py`): its handlers without a browser, then the real app on 127.0.0.1 driven by headless
Chromium (Debian's `chromium`, through Playwright's `executable_path`): upload a phantom, ask, see the answer and the
mask overlay, retrieve reports, upload an MRI and see its slices; a corrupt file and an upload above the size limit
each give a message in the page.
The browser test saves screenshots under `test-artifacts/` (or `$VOXLM_TEST_ARTIFACTS`)."""

import ast
import importlib.util
import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tiny_models import DEMO_SEG_QUESTION

from voxlm import viewer
from voxlm.data import generate_case

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "spaces" / "app.py"
CHROMIUM = Path(os.environ.get("VOXLM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("VOXLM_TEST_ARTIFACTS", REPO / "test-artifacts"))
UPLOAD_LIMIT_MB = 0.05  # stands in for a multi-GB upload: the small phantom passes, a 650 KB array does not
SEG_NOTE = "(the mask shown in red on the slices)"  # what the page shows in place of the answer's [SEG]


def gradio_env(voxlm_dir, clip_dir, **extra) -> dict:
    return {"VOXLM_MODEL": str(voxlm_dir), "VOXLM_CLIP_MODEL": str(clip_dir), "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1", "VOXLM_MAX_NEW_TOKENS": "8", **extra}


@pytest.fixture()
def app(monkeypatch, demo_model_dirs):
    """The app module, imported fresh with the tiny demo models (its model caches start empty)."""
    for key, value in gradio_env(*demo_model_dirs).items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("voxlm_space_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_phantom(path: Path, seed: int = 900009, shape=(16, 48, 48)) -> Path:
    """A phantom head CT as NIfTI: (D, H, W) = (S, A, R) stored on (R, A, S) voxel axes."""
    case = generate_case(seed, shape=shape)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(case.volume.transpose(2, 1, 0)), np.diag([4.8, 4.8, 10.0, 1.0])),
             path)
    return path


@pytest.fixture(scope="module")
def small_mni(tmp_path_factory):
    """nilearn's MNI152 T1 at 4 mm (50 x 59 x 48 voxels of 0 to 1, 31 KB): an MRI within the browser test's upload
    limit."""
    from nilearn.datasets import load_mni152_template

    path = tmp_path_factory.mktemp("mni") / "mni152_4mm.nii.gz"
    nib.save(load_mni152_template(resolution=4), path)
    return path


def centre_brightness(image: np.ndarray) -> float:
    """Mean grey level of the middle third of a slice image, away from the orientation letters on its edges."""
    rows, cols = image.shape[0] // 3, image.shape[1] // 3
    return float(np.asarray(image)[rows : 2 * rows, cols : 2 * cols].mean())


def red_pixels(image: np.ndarray) -> int:
    """Pixels tinted by the mask overlay (grey slices have R == G == B)."""
    image = np.asarray(image, dtype=int)
    return int(((image[..., 0] - image[..., 1]) > 40).sum())


def test_app_is_thin_with_per_visitor_state_and_a_queue():
    source = APP.read_text()
    tree = ast.parse(source)
    assert not any(isinstance(node, ast.Global) for node in ast.walk(tree)), "per-visitor data belongs in gr.State"
    assert "gr.State(" in source and "share=True" not in source
    last = ast.unparse(tree.body[-1])
    assert last.startswith("if __name__ == '__main__':") and "demo.queue(" in last and ".launch(" in last
    assert len(source.splitlines()) <= 205


def test_bundled_case_loads_and_answers_with_a_mask_on_its_grid(app, tmp_path):
    name = next(iter(app.BUNDLED))
    view, menu, window, axial, coronal, sagittal, status = app.load(str(app.BUNDLED[name]), "brain")
    assert status.startswith(f"Loaded {name}: 32 x 96 x 96 voxels") and menu.choices == [(f"0. {name}", 0)]
    assert re.search(r"Modality CT: the processor's modality, and \d+\.\d% of voxels lie below -200 as air", status)
    assert status.endswith("Shown with the brain window.")
    assert window.value == "brain" and view["modality"] == "CT"
    assert (axial.value, coronal.value, sagittal.value) == (16, 48, 48)
    before = app.render(view, 16, 48, 48)
    assert len(before) == 3 and all(red_pixels(image) == 0 for image in before)
    view, answer, boxes, mask_file = app.ask(view, DEMO_SEG_QUESTION, "brain", progress=lambda *a, **k: None)
    assert answer.startswith("It is ") and SEG_NOTE in answer and "[SEG]" not in answer and boxes == ""
    source, mask = nib.load(app.BUNDLED[name]), nib.load(mask_file)
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert any(red_pixels(image) > 0 for image in app.render(view, 16, 48, 48))
    reports = app.closest_reports(view)
    assert reports.startswith("1. (") and len(reports.splitlines()) == 3 and "phantom-9000" in reports


def test_study_of_several_files_answers_and_draws_the_mask_on_the_series_shown(app, tmp_path):
    bundled = next(iter(app.BUNDLED.values()))  # 32 x 96 x 96
    small = write_phantom(tmp_path / "small.nii.gz", shape=(16, 48, 48))
    view, menu, _, *sliders, status = app.load([str(small), str(bundled)], "brain")
    assert menu.choices == [("0. small.nii.gz", 0), (f"1. {bundled.name}", 1)] and menu.value == 0
    assert status.startswith("Loaded 2 files: series 0. small.nii.gz of 2: 16 x 48 x 48 voxels")
    assert [slider.maximum for slider in sliders] == [15, 47, 47]
    for series, source in ((0, small), (1, bundled)):
        if series:
            view, _, *sliders, status = app.show(view["study"], series, "brain", view["path"])
            assert status.startswith(f"series 1. {bundled.name} of 2: 32 x 96 x 96") and sliders[0].maximum == 31
        view, answer, boxes, mask_file = app.ask(view, DEMO_SEG_QUESTION, "brain", progress=lambda *a, **k: None)
        assert SEG_NOTE in answer and mask_file.endswith(f"small_series{series}_mask.nii.gz")
        mask, image = nib.load(mask_file), nib.load(source)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert view["mask"].shape == view["volume"].array.shape and view["mask"].any()
        assert any(red_pixels(plane) > 0 for plane in app.render(view, *(n // 2 for n in view["mask"].shape)))


def test_dicom_study_zip_lists_its_series_and_what_was_skipped(app, tmp_path):
    from study_files import LOCALISER, SECOND_SERIES, write_dicom_study, zip_folder

    archive = zip_folder(write_dicom_study(tmp_path / "study"), tmp_path / "study.zip")
    view, menu, *_, status = app.load([str(archive)], "bone")
    assert [label for label, _ in menu.choices] == ["0. SmartScore - Gated 0.5 sec", f"1. {SECOND_SERIES}"]
    assert status.startswith("Loaded study.zip: series 0. SmartScore - Gated 0.5 sec of 2: 5 x 16 x 16 voxels")
    assert f"skipped {LOCALISER}: the series has a single slice" in status
    _, answer, _, mask_file = app.ask(view, DEMO_SEG_QUESTION, "brain", progress=lambda *a, **k: None)
    assert SEG_NOTE in answer and nib.load(mask_file).shape == (16, 16, 5)
    assert "Modality CT: the file's DICOM Modality tag. Shown with the bone window." in status


def test_an_mri_is_shown_and_answered_as_mr_and_the_page_says_so(app, small_mni):
    """The MRI that showed three black slices through the brain window: the menu switches to the MRI window, the
    status line says why, the slices hold the brain, and the model reads it as MR unless the visitor overrides."""
    view, menu, window, *sliders, status = app.load(str(small_mni), "brain")
    assert window.value == viewer.MRI_WINDOW and view["modality"] == "MR"
    assert ("Modality MR: no voxel below -200 (the lowest is 0), so not CT in Hounsfield units, where air is -1000; "
            "pick a CT window to have the model read it as CT. Shown with the MRI (percentiles) window.") in status
    centre = [slider.value for slider in sliders]
    assert all(centre_brightness(image) > 60 for image in app.render(view, *centre))
    rewindowed, status = app.rewindow(view, "brain")
    assert centre_brightness(app.render(rewindowed, *centre)[0]) < 5  # what the page showed before
    # The status line follows the menu: it names the window, and that the model now reads the volume as CT.
    assert status.endswith("Shown with the brain window. The model reads it as CT, as the window asks.")
    assert app.rewindow(view, viewer.MRI_WINDOW)[1].endswith("Shown with the MRI (percentiles) window.")
    # The menu follows the shown series; a visitor's switch between CT and MRI windows tells the model too.
    assert viewer.modality_override(viewer.MRI_WINDOW, "MR") is None and viewer.modality_override("bone", "CT") is None
    assert viewer.modality_override("brain", "MR") == "CT" and viewer.modality_override(viewer.MRI_WINDOW, "CT") == "MR"
    # A study of the MRI and a CT: showing the CT puts the menu back on the model's CT preset.
    study = app.load([str(small_mni), str(next(iter(app.BUNDLED.values())))], "brain")[0]["study"]
    view, window, *_, status = app.show(study, 1, viewer.MRI_WINDOW, "ct.nii.gz")
    assert window.value == "brain" and "Modality CT" in status and view["modality"] == "CT"


def test_answers_show_a_note_in_place_of_the_seg_token():
    mask = np.zeros((2, 3, 4), np.uint8)
    assert viewer.answer_for_display("It is [SEG].", None) == "It is (no mask: this model has no mask head)."
    assert viewer.answer_for_display("It is [SEG].", mask) == "It is (the predicted mask is empty)."
    mask[1, 2, 3] = 1
    assert viewer.answer_for_display("It is [SEG].", mask) == f"It is {SEG_NOTE}."
    assert viewer.answer_for_display("No hemorrhage.", None) == "No hemorrhage."


def test_oversize_and_corrupt_files_give_messages(app, monkeypatch, tmp_path):
    from voxlm.processing import ReadLimits

    phantom = write_phantom(tmp_path / "phantom.nii.gz")
    monkeypatch.setattr(app, "READ_LIMITS", ReadLimits(max_bytes=2**16))
    view, *_, status = app.load(str(phantom), "brain")
    assert view is None and status.startswith("**Cannot use this file:** phantom.nii.gz: reading it takes about 0.2")
    assert "ReadLimits.max_bytes" in status and str(tmp_path) not in status
    monkeypatch.setattr(app, "READ_LIMITS", ReadLimits())
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + bytes(range(256)) * 8)
    view, *_, status = app.load(str(tmp_path / "corrupt.nii.gz"), "brain")
    assert view is None and status.startswith("**Cannot use this file:** corrupt.nii.gz: not a readable NIfTI")
    view, *_, status = app.load([str(phantom), str(phantom), str(phantom)], "brain")  # the demo model reads 2
    _, answer, *_ = app.ask(view, DEMO_SEG_QUESTION, "brain", progress=lambda *a, **k: None)
    assert answer.startswith("**phantom.nii.gz, phantom.nii.gz, phantom.nii.gz: the study holds 3 series")
    # The series of a study share the memory limit: reading one takes its data and a float32 copy, keeping it the copy.
    voxels, itemsize = 16 * 48 * 48, nib.load(phantom).get_data_dtype().itemsize
    monkeypatch.setattr(app, "READ_LIMITS", ReadLimits(max_bytes=voxels * (itemsize + 4) + voxels * 4))
    assert app.load([str(phantom)] * 2, "brain")[0] is not None
    view, *_, status = app.load([str(phantom)] * 3, "brain")
    assert view is None and status.startswith("**Cannot use this file:** phantom.nii.gz: reading it takes")
    assert str(tmp_path) not in status


def test_detached_headers_that_point_elsewhere_are_refused(app, tmp_path):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"SECRET" * 100)
    upload = tmp_path / "upload"
    upload.mkdir()
    for header, field in (("volume.nhdr", "data file: ../secret.raw"), ("volume.mhd", f"ElementDataFile = {secret}")):
        text = ("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n" if header.endswith(".nhdr")
                else "ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\n")
        (upload / header).write_text(f"{text}{field}\n")
        view, *_, status = app.load(str(upload / header), "brain")
        assert view is None and status.startswith(f"**Cannot use this file:** {header}: the header's data file")
        assert "is not beside it" in status and "SECRET" not in status and str(upload) not in status
    assert "Load a volume first" in app.ask(None, "Is there a hemorrhage?", "brain", progress=lambda *a, **k: None)[1]


def test_without_a_model_the_page_says_how_to_get_one(app, monkeypatch, tmp_path):
    monkeypatch.setenv("VOXLM_MODEL", str(tmp_path / "no-model-here"))
    monkeypatch.setenv("VOXLM_CLIP_MODEL", str(tmp_path / "no-clip-here"))
    view, *_, status = app.load(str(next(iter(app.BUNDLED.values()))), "bone")
    assert status.startswith("Loaded")  # volumes are still shown, with the default processor's windows
    _, answer, _, mask_file = app.ask(view, "Is there a hemorrhage?", "brain", progress=lambda *a, **k: None)
    assert "voxlm quickstart" in answer and "VOXLM_MODEL" in answer and mask_file is None
    assert "voxlm quickstart" in app.closest_reports(view)


def test_space_metadata_names_the_app_and_the_sdk():
    import yaml

    header = (REPO / "spaces" / "README.md").read_text().split("---")[1]
    metadata = yaml.safe_load(header)
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py"
    requirements = (REPO / "spaces" / "requirements.txt").read_text()
    assert "gradio>=6" in requirements and "voxlm" in requirements
    assert all(path.stat().st_size < 100_000 for path in (REPO / "spaces" / "examples").iterdir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def server(demo_model_dirs, tmp_path):
    """`python spaces/app.py` on 127.0.0.1 with the demo models and a low upload limit; yields its URL."""
    port = free_port()
    env = dict(os.environ, **gradio_env(*demo_model_dirs, VOXLM_MAX_UPLOAD_MB=str(UPLOAD_LIMIT_MB),
                                        GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port)))
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([sys.executable, str(APP)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the app did not answer in 300 s:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
            time.sleep(1)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian's chromium is not installed at {CHROMIUM}; "
                    "`apt-get install chromium` (.ci/install does) to run the browser test")
def test_browser_upload_ask_overlay_retrieval_and_error_messages(server, small_mni, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    phantom = write_phantom(tmp_path / "phantom.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 8)
    big = tmp_path / "big.npy"
    np.save(big, np.random.default_rng(0).normal(size=(40, 64, 64)).astype(np.float32))
    assert phantom.stat().st_size < UPLOAD_LIMIT_MB * 2**20 < big.stat().st_size
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(120_000)
        expect.set_options(timeout=120_000)  # a loaded CI machine may take a while to generate
        page.goto(server)
        axial = page.locator("#view-axial img")

        def axial_pixels() -> np.ndarray:
            png = page.request.get(axial.get_attribute("src")).body()  # the slice as the browser shows it
            return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

        page.locator("#upload input[type=file]").set_input_files(str(phantom))
        expect(page.locator("#status")).to_contain_text("Loaded phantom.nii.gz: 16 x 48 x 48 voxels")
        expect(axial).to_have_count(1)
        grey_src = axial.get_attribute("src")
        assert red_pixels(axial_pixels()) == 0

        page.locator("#question textarea").fill(DEMO_SEG_QUESTION)
        page.locator("#ask").click()
        expect(page.locator("#answer textarea")).to_have_value(re.compile(r"^It is " + re.escape(SEG_NOTE)))
        expect(axial).not_to_have_attribute("src", grey_src)
        assert red_pixels(axial_pixels()) > 0, "the mask overlay is not on the axial slice"
        expect(page.locator("#mask-file a[href$='/phantom_mask.nii.gz']")).to_have_count(1)
        page.get_by_role("button", name="Closest reports in the gallery").click()
        expect(page.locator("#reports")).to_contain_text("phantom-9000")
        page.screenshot(path=str(ARTIFACTS / "space_answer_overlay.png"), full_page=True)

        overlay_src = axial.get_attribute("src")
        page.locator("#upload button[aria-label=Clear]").click()
        page.locator("#upload input[type=file]").set_input_files(str(small_mni))
        expect(page.locator("#status")).to_contain_text("Loaded mni152_4mm.nii.gz: 48 x 59 x 50 voxels")
        expect(page.locator("#status")).to_contain_text("Modality MR: no voxel below -200")
        expect(page.locator("#window input")).to_have_value(viewer.MRI_WINDOW)
        expect(axial).not_to_have_attribute("src", overlay_src)
        assert centre_brightness(axial_pixels()) > 60, "the MRI's axial slice is black"
        page.screenshot(path=str(ARTIFACTS / "space_mri.png"), full_page=True)

        page.locator("#upload button[aria-label=Clear]").click()
        page.locator("#upload input[type=file]").set_input_files(str(corrupt))
        expect(page.locator("#status")).to_contain_text("Cannot use this file: corrupt.nii.gz: not a readable NIfTI")
        expect(page.locator("#answer textarea")).to_have_value("")  # the previous volume's answer is gone
        assert "/corrupt.nii.gz" not in page.locator("#status").inner_text()  # no server paths in the page
        page.screenshot(path=str(ARTIFACTS / "space_corrupt_file.png"), full_page=True)
        page.locator("#upload button[aria-label=Clear]").click()
        page.locator("#upload input[type=file]").set_input_files(str(big))
        expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible()
        page.wait_for_timeout(500)  # the error toast slides in
        page.screenshot(path=str(ARTIFACTS / "space_upload_too_large.png"))
        assert "Traceback" not in page.locator("body").inner_text()
        browser.close()
