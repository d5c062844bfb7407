"""`voxlm predict --dicomweb` against a real Orthanc on 127.0.0.1 holding pydicom's CT5N series and a two-series
study built from it: studies in over QIDO-RS and WADO-RS, the SEG and SR back over STOW-RS exactly once, a batch of
studies that resumes, and a clear message for each way a server or a study can fail."""

import json
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from orthanc_server import DICOMWEB_PLUGIN, ORTHANC, running_orthanc
from pydicom.uid import generate_uid
from study_files import CT5N, copy_series
from tiny_models import DEMO_SEG_QUESTION

from voxlm import cli, dicomweb

pytestmark = pytest.mark.skipif(
    ORTHANC is None or not DICOMWEB_PLUGIN.exists(),
    reason="Orthanc and its DICOMweb plugin are not installed (Debian: apt-get install orthanc orthanc-dicomweb; "
    ".ci/install does)",
)


def upload(client, folder) -> str:
    """STOW the DICOM files under `folder`; their StudyInstanceUID."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.rglob("*")) if path.is_file()]
    client.store_instances(datasets)
    return datasets[0].StudyInstanceUID


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """`(url, studies)`: Orthanc holding CT5N (`studies["ct5n"]`), a study of two CT series (`"two_series"`), a study
    whose only series is not CT or MR (`"not_a_volume"`), one of CT headers without pixel data (`"no_pixels"`) and
    one to be answered in a batch (`"batch"`)."""
    root = tmp_path_factory.mktemp("pacs")
    with running_orthanc(root / "orthanc") as url:
        client = dicomweb.connect(url)
        studies = {"ct5n": upload(client, CT5N)}
        for name, series in (("two_series", [(3, "AXIAL"), (4, "AXIAL BRIGHTER")]), ("batch", [(2, "AXIAL")]),
                             ("not_a_volume", [(8, "SCREEN CAPTURE")]), ("no_pixels", [(9, "HEADERS ONLY")])):
            study_uid = generate_uid()
            for number, description in series:
                copy_series(root / name / description, number, description, offset=50 * number, study_uid=study_uid)
            for path in filter(Path.is_file, (root / name).rglob("*")):
                dataset = pydicom.dcmread(path)
                if name == "not_a_volume":
                    dataset.Modality = "OT"
                elif name == "no_pixels":
                    del dataset.PixelData
                dataset.save_as(path)
            studies[name] = upload(client, root / name)
        yield url, studies


def instances(url, study_uid) -> dict[str, int]:
    """Instances per modality in the study."""
    client = dicomweb.connect(url)
    counts = {}
    for series in client.search_for_series(study_instance_uid=study_uid):
        modality = series["00080060"]["Value"][0]
        counts[modality] = counts.get(modality, 0) + int(series["00201209"]["Value"][0])
    return counts


def predict_on(url, model, *options, capsys):
    assert cli.main(["predict", "--dicomweb", url, "--question", DEMO_SEG_QUESTION, "--model", str(model),
                     "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def test_store_adds_one_seg_and_one_sr_once(pacs, demo_model_dirs, tmp_path, capsys):
    url, studies = pacs
    study_uid = studies["ct5n"]
    assert instances(url, study_uid) == {"CT": 5}
    row = predict_on(url, demo_model_dirs[0], "--study-uid", study_uid, "--store", "--segment-label", "whole brain",
                     "--dicom-seg-out", str(tmp_path / "seg.dcm"), capsys=capsys)
    assert row["status"] == "answered" and row["has_seg"] and row["stored"]
    assert instances(url, study_uid) == {"CT": 5, "SEG": 1, "SR": 1}
    client = dicomweb.connect(url)
    stored_seg = client.search_for_instances(study_instance_uid=study_uid, search_filters={"Modality": "SEG"})
    written = pydicom.dcmread(tmp_path / "seg.dcm")
    assert stored_seg[0]["00080018"]["Value"][0] == row["seg_uid"] == written.SOPInstanceUID
    assert written.SegmentSequence[0].SegmentLabel == "whole brain"
    assert dicomweb.stored_report(client, study_uid, str(demo_model_dirs[0])) == row["sr_uid"]
    again = predict_on(url, demo_model_dirs[0], "--study-uid", study_uid, "--store", capsys=capsys)
    assert again == {"study_uid": study_uid, "status": "skipped", "sr_uid": row["sr_uid"], "stored": False}
    assert instances(url, study_uid) == {"CT": 5, "SEG": 1, "SR": 1}


def test_a_study_of_two_series_goes_through_the_study_path(pacs, demo_model_dirs, capsys):
    url, studies = pacs
    row = predict_on(url, demo_model_dirs[0], "--study-uid", studies["two_series"], "--mask-series", "1",
                     capsys=capsys)
    assert row["status"] == "answered" and not row["stored"]
    assert row["series"] == ["AXIAL", "AXIAL BRIGHTER"] and row["mask_series"] == 1
    assert instances(url, studies["two_series"]) == {"CT": 10}  # nothing stored without --store


def test_many_studies_resume_and_write_one_row_each(pacs, demo_model_dirs, tmp_path, capsys):
    url, studies = pacs
    missing = generate_uid()
    uids = tmp_path / "studies.txt"
    uids.write_text(f"# tonight's worklist\n{studies['batch']}\n{missing}\n\n{studies['not_a_volume']}\n")
    summary = tmp_path / "summary.parquet"
    argv = ["predict", "--dicomweb", url, "--study-uids", str(uids), "--summary-out", str(summary), "--store",
            "--question", DEMO_SEG_QUESTION, "--model", str(demo_model_dirs[0])]
    with pytest.raises(SystemExit, match="2 studies failed"):
        cli.main(argv)
    assert "3 studies: 1 answered, 0 skipped" in capsys.readouterr().out
    rows = pq.read_table(summary).to_pylist()
    assert [(row["study_uid"], row["status"]) for row in rows] == [
        (studies["batch"], "answered"), (missing, "failed"), (studies["not_a_volume"], "failed")]
    assert f"study {missing} was not found" in rows[1]["error"]
    assert "holds no CT or MR series" in rows[2]["error"] and "modality OT" in rows[2]["error"]
    assert instances(url, studies["batch"]) == {"CT": 5, "SEG": 1, "SR": 1}
    with pytest.raises(SystemExit):
        cli.main(argv[:6] + [str(tmp_path / "again.jsonl")] + argv[7:])
    rows = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [row["status"] for row in rows] == ["skipped", "failed", "failed"]
    assert instances(url, studies["batch"]) == {"CT": 5, "SEG": 1, "SR": 1}
    assert instances(url, studies["not_a_volume"]) == {"OT": 5}


def test_an_unknown_study_fails_naming_it(pacs, demo_model_dirs):
    url, _ = pacs
    unknown = generate_uid()
    with pytest.raises(SystemExit, match=f"study {unknown} was not found on {url}"):
        cli.main(["predict", "--dicomweb", url, "--study-uid", unknown, "--question", DEMO_SEG_QUESTION,
                  "--model", str(demo_model_dirs[0])])


def test_a_series_without_pixel_data_is_named(pacs, tmp_path):
    url, studies = pacs
    with pytest.raises(dicomweb.DicomWebError, match="holds no CT or MR series with pixel data.*HEADERS ONLY: holds no "
                       "pixel data"):
        dicomweb.download_study(dicomweb.connect(url), studies["no_pixels"], tmp_path / "study")
    assert not (tmp_path / "study").exists()


def test_a_rejected_stow_is_an_error_and_changes_nothing(pacs):
    url, studies = pacs
    client = dicomweb.connect(url)
    before = instances(url, studies["two_series"])
    stranger = pydicom.dcmread(next(CT5N.iterdir()))
    stranger.StudyInstanceUID, stranger.SOPInstanceUID = generate_uid(), generate_uid()
    with pytest.raises(dicomweb.DicomWebError, match="storing 1 instance.* answered 409"):
        dicomweb.store_results(client, studies["two_series"], [stranger])
    assert instances(url, studies["two_series"]) == before


def test_a_server_that_refuses_or_does_not_answer():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}/dicom-web"
    with pytest.raises(dicomweb.DicomWebError, match="cannot connect to"):
        dicomweb.study_series(dicomweb.connect(refused, attempts=1), "1.2.3")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = dicomweb.connect(f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web", timeout=0.5, attempts=2)
        with pytest.raises(dicomweb.DicomWebError, match="did not answer in time"):
            dicomweb.study_series(client, "1.2.3")


@pytest.mark.parametrize("argv, message", [
    (["--dicomweb", "http://x/dicom-web"], "needs --study-uid UID or --study-uids FILE"),
    (["--dicomweb", "http://x/dicom-web", "--study-uids", "u.txt"], "--study-uids needs --summary-out"),
    (["ct.nii.gz", "--store"], "--store works with --dicomweb URL only"),
    (["--dicomweb", "pacs:8042", "--study-uid", "1.2"], "is not a DICOMweb URL"),
])
def test_options_that_cannot_work_are_refused(argv, message, demo_model_dirs):
    with pytest.raises(SystemExit, match=message):
        cli.main(["predict", *argv, "--question", "Q", "--model", str(demo_model_dirs[0])])
