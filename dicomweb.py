"""Studies in from, and results back to, a DICOMweb server (a PACS, Orthanc, Google or AWS healthcare imaging):

    client = connect("http://pacs:8042/dicom-web")
    row = answer_study(client, study_uid, "Segment the hemorrhage in this CT.", model, processor, "org/voxlm-ct",
                       store=True)

QIDO-RS lists the study's series, WADO-RS fetches its CT and MR series into a temporary folder that `predict` reads
as a study, and with `store=True` STOW-RS sends the DICOM SEG and SR (`voxlm.dicom_output`) back into the same study.
A study that already holds an SR of this model is skipped, so a stopped run over many studies (`answer_studies`)
resumes where it stopped. voxlm only ever adds new instances; nothing on the server is modified or deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

from voxlm.dicom_output import MANUFACTURER, model_label, write_dicom_results
from voxlm.inference import predict
from voxlm.processing import ReadLimits

logger = logging.getLogger(__name__)

# The series a VoxLM reads; others (SEG, SR, presentation states, dose reports, secondary captures) are skipped.
VOLUME_MODALITIES = ("CT", "MR")
# DICOM JSON tags (PS3.18 F.2) of the attributes read from QIDO-RS and WADO-RS metadata answers.
TAGS = {"Modality": "00080060", "SeriesInstanceUID": "0020000E", "SeriesDescription": "0008103E",
        "NumberOfSeriesRelatedInstances": "00201209", "Manufacturer": "00080070", "ManufacturerModelName": "00081090",
        "SOPInstanceUID": "00080018"}


class DicomWebError(RuntimeError):
    """The DICOMweb server cannot be reached, refuses a request, or does not hold what was asked for."""


def _client_module():
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as error:  # an optional dependency: pip install 'voxlm[dicom]'
        raise ImportError("DICOMweb needs dicomweb-client: pip install 'voxlm[dicom]'") from error
    return DICOMwebClient


def connect(url: str, timeout: float = 60.0, attempts: int = 3):
    """A `DICOMwebClient` for the server's DICOMweb root (e.g. `http://localhost:8042/dicom-web`); each request
    waits at most `timeout` seconds and is made up to `attempts` times (after 2 s, 4 s, ...) when the connection
    fails or the server is busy (429, 503, 504)."""
    if not url.startswith(("http://", "https://")):
        raise DicomWebError(f"{url!r} is not a DICOMweb URL: give the server's DICOMweb root, http(s)://host/path")
    client = _client_module()(url=url.rstrip("/"), timeout=timeout)
    client.set_http_retry_params(retry=attempts > 1, max_attempts=attempts)
    return client


@contextlib.contextmanager
def _request(client, what: str):
    """Turn what the HTTP layer raises into a `DicomWebError` saying what was being done and what went wrong."""
    import requests

    try:
        yield
    except requests.exceptions.Timeout as error:
        raise DicomWebError(f"{what}: {client.base_url} did not answer in time ({error})") from error
    except requests.exceptions.ConnectionError as error:
        raise DicomWebError(f"{what}: cannot connect to {client.base_url} (is the server running and the URL "
                            f"right?): {str(error).splitlines()[0][:300]}") from error
    except requests.exceptions.HTTPError as error:
        response = error.response
        status = f"{response.status_code} {response.reason}" if response is not None else str(error)
        raise DicomWebError(f"{what}: {client.base_url} answered {status}") from error


def _value(item: dict, keyword: str, default=None):
    """The first value of an attribute in a DICOM JSON object, or `default`."""
    values = item.get(TAGS[keyword], {}).get("Value") or [default]
    return values[0]


def study_series(client, study_uid: str) -> list[dict]:
    """The study's series (QIDO-RS, DICOM JSON); a `DicomWebError` naming the UID when the server has no such study."""
    with _request(client, f"listing the series of study {study_uid}"):
        series = client.search_for_series(study_instance_uid=study_uid, get_remaining=True)
    if not series:
        raise DicomWebError(f"study {study_uid} was not found on {client.base_url}")
    return series


def download_study(client, study_uid: str, folder: Path, limits: ReadLimits | None = None) -> list[str]:
    """Fetch the study's CT and MR series (WADO-RS) into `folder`, one sub-folder per series.

    Returns:
        `list[str]`: the series left out and why (another modality, no pixel data).

    Raises:
        `DicomWebError`: no such study, no CT or MR series with pixel data, more instances than `limits.max_files`,
        or the server fails.
    """
    limits = limits or ReadLimits()
    skipped, wanted, instances = [], [], 0
    for series in study_series(client, study_uid):
        series_uid = _value(series, "SeriesInstanceUID")
        description = _value(series, "SeriesDescription") or series_uid
        modality = _value(series, "Modality", "unknown")
        if modality in VOLUME_MODALITIES:
            wanted.append((series_uid, description))
            instances += int(_value(series, "NumberOfSeriesRelatedInstances", 0) or 0)
        else:
            skipped.append(f"{description}: modality {modality}, not {' or '.join(VOLUME_MODALITIES)}")
    if instances > limits.max_files:
        raise DicomWebError(f"study {study_uid} holds {instances} CT/MR instances, more than the {limits.max_files} "
                            "one read may take; raise ReadLimits.max_files if it is genuine")
    stored = 0
    for index, (series_uid, description) in enumerate(wanted):
        with _request(client, f"retrieving series {series_uid} of study {study_uid}"):
            datasets = client.retrieve_series(study_uid, series_uid)
        images = [dataset for dataset in datasets if "PixelData" in dataset]
        if not images:
            skipped.append(f"{description}: holds no pixel data")
            continue
        target = folder / f"series-{index:03d}"
        target.mkdir(parents=True)
        for number, dataset in enumerate(images):
            dataset.save_as(target / f"{number:05d}.dcm", enforce_file_format=True)
        stored += 1
    if not stored:
        raise DicomWebError(f"study {study_uid} holds no CT or MR series with pixel data ({'; '.join(skipped)})")
    return skipped


def stored_report(client, study_uid: str, model_name: str) -> str | None:
    """The SOP Instance UID of an SR that this model (voxlm and its `model_label`) already wrote into the study, or
    `None`."""
    with _request(client, f"looking for voxlm's reports in study {study_uid}"):
        reports = client.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": "SR"})
        for series in reports:
            for instance in client.retrieve_series_metadata(study_uid, _value(series, "SeriesInstanceUID")):
                if (_value(instance, "Manufacturer") == MANUFACTURER
                        and _value(instance, "ManufacturerModelName") == model_label(model_name)):
                    return _value(instance, "SOPInstanceUID")
    return None


def store_results(client, study_uid: str, datasets) -> None:
    """Send new instances into the study (STOW-RS); a `DicomWebError` when the server rejects any of them."""
    with _request(client, f"storing {len(datasets)} instance(s) into study {study_uid}"):
        answer = client.store_instances(datasets, study_instance_uid=study_uid)
    failed = answer.get("FailedSOPSequence") or []
    if failed:
        reasons = [f"{item.get('ReferencedSOPInstanceUID', '?')} (failure reason {item.get('FailureReason', '?')})"
                   for item in failed]
        raise DicomWebError(f"study {study_uid}: the server rejected {len(failed)} of {len(datasets)} instance(s): "
                            f"{'; '.join(reasons)}")


def answer_study(client, study_uid: str, question: str, model, processor, model_name: str, *, store: bool = False,
                 seg_path=None, sr_path=None, mask_path=None, label: str | None = None,
                 limits: ReadLimits | None = None, **predict_options) -> dict:
    """Answer `question` about one study on the server, and with `store` send the SEG and SR back into it.

    Args:
        client: from `connect`.
        study_uid (`str`): the StudyInstanceUID.
        question (`str`), model, processor: as in `predict`; `model_name` is the model's Hub id or folder.
        store (`bool`, defaults to `False`): STOW-RS the SEG (when the answer holds a mask) and the SR into the study.
        seg_path, sr_path, mask_path (*optional*): also write the SEG, the SR, the NIfTI mask to these files.
        label (`str`, *optional*): the SEG's segment label (default: `segment_label(question)`).
        limits (`ReadLimits`, *optional*): the files and bytes the study may take.
        **predict_options: `mask_series`, `max_new_tokens`, `modality`, `window`.

    Returns:
        `dict`: a summary row: `study_uid`, `status` ("answered", or "skipped" when the study already holds this
        model's SR), `answer`, `has_seg`, `mask_voxels`, `boxes_ras_mm`, `seg_uid`, `sr_uid`, `stored`, `series` and
        `mask_series` (for a study of several series), `skipped` (series left out, with the reason).
    """
    existing = stored_report(client, study_uid, model_name)
    if existing is not None:
        logger.info("study %s already holds %s's report %s from %s: skipped", study_uid, MANUFACTURER, existing,
                    model_name)
        return {"study_uid": study_uid, "status": "skipped", "sr_uid": existing, "stored": False}
    with tempfile.TemporaryDirectory(prefix="voxlm-dicomweb-") as temporary:
        folder = Path(temporary) / study_uid
        skipped = download_study(client, study_uid, folder, limits)
        prediction = predict(folder, question, model, processor, **predict_options)
    segmentation, report = write_dicom_results(prediction, question, model_name, seg_path=seg_path, sr_path=sr_path,
                                               label=label)
    if mask_path is not None and prediction.mask is not None:
        prediction.save_mask(mask_path)
    if store:
        store_results(client, study_uid, [d for d in (segmentation, report) if d is not None])
    summary = prediction.to_dict()
    return {"study_uid": study_uid, "status": "answered", "answer": summary["answer"], "has_seg": summary["has_seg"],
            "mask_voxels": summary["mask_voxels"], "boxes_ras_mm": summary["boxes_ras_mm"],
            "seg_uid": None if segmentation is None else str(segmentation.SOPInstanceUID),
            "sr_uid": str(report.SOPInstanceUID), "stored": store, "series": prediction.series or None,
            "mask_series": prediction.mask_series, "skipped": skipped + prediction.skipped_series}


def read_study_uids(path: str | Path) -> list[str]:
    """Study UIDs from a text file, one per line (blank lines and `#` comments ignored), each once."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file of study UIDs")
    uids = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    uids = list(dict.fromkeys(uid for uid in uids if uid))
    if not uids:
        raise ValueError(f"{path.name}: holds no study UIDs")
    return uids


def write_summary(rows: list[dict], path: str | Path) -> Path:
    """One row per study as Parquet (`.parquet`) or JSON Lines (`.jsonl`)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Every column in every row, nested ones (boxes, series) as JSON text: one schema whatever each study gave.
        columns = list(dict.fromkeys(key for row in rows for key in row))
        flat = [{key: json.dumps(row[key]) if isinstance(row.get(key), (list, dict)) else row.get(key)
                 for key in columns} for row in rows]
        pq.write_table(pa.Table.from_pylist(flat), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        raise ValueError(f"{path.name}: a summary is .parquet or .jsonl")
    return path


def answer_studies(client, study_uids: list[str], question: str, model, processor, model_name: str, *,
                   summary_path, store: bool = False, progress: bool = True, **options) -> list[dict]:
    """`answer_study` for each UID, with a progress bar; a study that fails gets a `failed` row with the reason and
    the run goes on. The summary is rewritten after each study, so a killed run leaves the rows done so far, and a
    rerun skips the studies already answered (with `store`)."""
    from tqdm.auto import tqdm

    write_summary([], summary_path)  # refuse a bad suffix before any study is fetched
    rows = []
    for study_uid in tqdm(study_uids, desc="studies", unit="study", disable=not progress):
        try:
            rows.append(answer_study(client, study_uid, question, model, processor, model_name, store=store,
                                     **options))
        except (DicomWebError, ValueError) as error:  # VolumeError is a ValueError
            logger.warning("study %s failed: %s", study_uid, error)
            rows.append({"study_uid": study_uid, "status": "failed", "error": str(error)})
        write_summary(rows, summary_path)
    return rows
