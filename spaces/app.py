"""voxlm demo: a CT or MRI volume or study in the browser; ask VoxLM about it, see its answer, boxes and mask; retrieve
reports. A study is answered as a whole; its mask and boxes are on the series shown (picked in the Series menu).

Thin by design (STYLE.md rule 15): per-visitor data lives in `gr.State`, inference is `voxlm.inference` (the same code
as `voxlm predict`), slices are drawn by `voxlm.viewer`, and every voxel goes through the model's saved processor.

Settings (environment): VOXLM_MODEL (a VoxLM folder or Hub id), VOXLM_CLIP_MODEL (a VoxCLIP, for retrieval),
VOXLM_MAX_UPLOAD_MB (per file, default 1024), VOXLM_MAX_NEW_TOKENS (default 64), and the reader's `ReadLimits`, which
refuse uploads from their headers before reading: VOXLM_MAX_VOLUME_MB, VOXLM_MAX_UNPACKED_MB, VOXLM_MAX_FILES.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path

import gradio as gr

from voxlm import inference, viewer
from voxlm.processing import VolumeError, VoxVolumeProcessor

EXAMPLES = Path(__file__).parent / "examples"
BUNDLED = {path.name: path for path in sorted(EXAMPLES.glob("*.nii.gz"))}
GALLERY = json.loads((EXAMPLES / "reports.json").read_text())
MAX_UPLOAD_MB = float(os.environ.get("VOXLM_MAX_UPLOAD_MB", "1024"))
MAX_NEW_TOKENS = int(os.environ.get("VOXLM_MAX_NEW_TOKENS", "64"))
READ_LIMITS = inference.read_limits_from_environment()
EXAMPLE_QUESTIONS = {
    "Closed VQA": ["Is there an intracranial hemorrhage?", "Is there a midline shift?",
                   "What type of hemorrhage is present? A. Epidural B. Subdural C. Subarachnoid D. No hemorrhage"],
    "Open VQA": ["What type of hemorrhage is there, and on which side?"],
    "Report": ["Write the findings and impression of this head CT."],
    "Positioning": ["Where is the hemorrhage? Answer with a bounding box."],
    "Segmentation": ["Segment the hemorrhage in this CT.", "Please segment the abnormality on the right side."],
}
# Errors a visitor can cause or fix, shown in the page; anything else is a bug and goes to the log.
USER_ERRORS = (VolumeError, inference.ModelNotFoundError, ValueError)


@functools.lru_cache(maxsize=1)
def voxlm_model():
    return inference.load_voxlm()  # read-only weights shared by all visitors; answers never touch them


@functools.lru_cache(maxsize=1)
def clip_model():
    clip = inference.load_voxclip()
    return clip, inference.embed_reports([item["report"] for item in GALLERY], clip)


def volume_processor():
    """The model's processor for windows; without a model, the default one still lets visitors look at volumes."""
    try:
        return voxlm_model()[1].image_processor
    except inference.ModelNotFoundError:
        return VoxVolumeProcessor()


def render(view, axial, coronal, sagittal):
    if view is None:
        return [None, None, None]
    return viewer.render_planes(view["display"], (axial, coronal, sagittal), view["volume"].spacing, view["mask"],
                                view["boxes"])


def show(study, series: int, window, path) -> tuple:
    """A fresh per-visitor view of one series of a study, the window menu set for its modality (the processor's
    choice: an MRI is never shown through a CT window), its three slice sliders and a line describing both."""
    volume, processor = study.volumes[series], volume_processor()
    modality, reason = processor.choose_modality(volume)
    window = viewer.window_for(modality, window, processor.ct_window)
    view = {"path": str(path), "study": study, "series": series, "volume": volume, "mask": None, "boxes": [],
            "modality": modality, "modality_reason": reason,
            "display": viewer.display_volume(volume, processor, window)}
    sliders = [gr.Slider(minimum=0, maximum=n - 1, value=n // 2, step=1) for n in volume.array.shape]
    status = viewer.describe_shown(study, series, modality, reason, window)
    return view, gr.Dropdown(viewer.WINDOW_CHOICES, value=window), *sliders, status


def load(paths, window):
    """Read a volume or a study into a fresh per-visitor view; returns it, the series and window menus, sliders, a
    status."""
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    if not paths:
        return None, *[gr.skip()] * 5, ""
    source, name = (paths[0], Path(paths[0]).name) if len(paths) == 1 else (paths, f"{len(paths)} files")
    try:
        study = inference.read_study_input(source, volume_processor(), limits=READ_LIMITS)  # refused before reading
        view, window, *sliders, status = show(study, 0, window, paths[0])
    except USER_ERRORS as error:  # the message names the file; the server's upload folder stays private
        message = functools.reduce(lambda text, p: text.replace(str(Path(p).parent) + os.sep, ""), paths, str(error))
        menu, sliders = gr.Dropdown([], value=None), [gr.Slider(value=0, maximum=1)] * 3
        return None, menu, gr.skip(), *sliders, f"**Cannot use this file:** {message}"
    menu = gr.Dropdown(choices=[(f"{i}. {d}", i) for i, d in enumerate(study.descriptions)], value=0)
    return view, menu, window, *sliders, f"Loaded {name}: {status}"


def rewindow(view, window):
    """The view shown with another window, and the status line that says so."""
    if view is None:
        return None, gr.skip()
    status = viewer.describe_shown(view["study"], view["series"], view["modality"], view["modality_reason"], window)
    return {**view, "display": viewer.display_volume(view["volume"], volume_processor(), window)}, status


def ask(view, question, window, progress=gr.Progress()):
    """Answer the question; with [SEG], put the mask on the view and offer it as NIfTI on the input's grid."""
    if view is None:
        return view, "Load a volume first (upload one or pick a bundled case).", "", None
    try:
        progress(0, desc="Loading the model")
        model, processor = voxlm_model()
        progress(0, desc="Reading the volume")
        prediction = inference.predict(
            view["study"], question, model, processor, modality=viewer.modality_override(window, view["modality"]),
            max_new_tokens=MAX_NEW_TOKENS, on_step=lambda done, total: progress((done, total), desc="Generating"),
            mask_series=view["series"])
    except USER_ERRORS as error:
        return view, f"**{error}**", "", None
    mask_file = None
    if prediction.mask is not None:
        folder = Path(tempfile.mkdtemp(prefix="voxlm-mask-"))
        series = f"_series{view['series']}" if prediction.series else ""
        mask_file = str(prediction.save_mask(folder / f"{Path(view['path']).name.split('.')[0]}{series}_mask.nii.gz"))
    answer, boxes = viewer.answer_for_display(prediction.text, prediction.mask), viewer.describe_boxes(prediction)
    return {**view, "mask": prediction.canonical_mask, "boxes": prediction.boxes_canonical}, answer, boxes, mask_file


def closest_reports(view):
    if view is None:
        return "Load a volume first."
    try:
        clip, embeddings = clip_model()
        reports = [item["report"] for item in GALLERY]
        hits = inference.retrieve(view["volume"], reports, clip, top_k=3, report_embeddings=embeddings)
    except USER_ERRORS as error:
        return f"**{error}**"
    return "\n".join(f"{h['rank']}. ({h['score']:.3f}, {GALLERY[h['index']]['id']}) {h['report']}" for h in hits)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="voxlm: 3D medical VLM demo") as demo:
        gr.Markdown("# voxlm demo\nResearch only, **not for diagnosis**. Upload a CT or MRI volume (NIfTI, DICOM "
                    "series as .zip, NRRD, .npy), a study (several files, a .zip of several DICOM series: answered "
                    "as a whole, masks on the series shown) or pick a bundled phantom, then ask about it.")
        view = gr.State(None)
        with gr.Row():
            upload = gr.File(label=f"Volume or study files (up to {MAX_UPLOAD_MB:g} MB)", type="filepath",
                             file_count="multiple", elem_id="upload",
                             file_types=[".nii", ".gz", ".zip", ".nrrd", ".nhdr", ".mha", ".npy", ".dcm"])
            with gr.Column():
                bundled = gr.Dropdown(list(BUNDLED), value=None, label="or a bundled phantom case")
                window = gr.Dropdown(viewer.WINDOW_CHOICES, value="brain", label="Window preset", elem_id="window")
                series = gr.Dropdown([], value=None, label="Series shown (masks are drawn on it)", elem_id="series")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            images = [gr.Image(label=plane, type="numpy", format="png", interactive=False, elem_id=f"view-{plane}")
                      for plane in viewer.PLANES]
        with gr.Row():
            sliders = [gr.Slider(0, 1, value=0, step=1, label=f"{plane} slice") for plane in viewer.PLANES]
        with gr.Row():
            question = gr.Textbox(label="Question", scale=4, elem_id="question")
            ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
        with gr.Accordion("Example questions", open=False):
            for task, questions in EXAMPLE_QUESTIONS.items():
                gr.Examples([[q] for q in questions], inputs=[question], label=task)
        answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
        boxes = gr.Markdown(elem_id="boxes")
        mask_file = gr.File(label="Mask (NIfTI on the input's grid)", interactive=False, elem_id="mask-file")
        retrieve_button = gr.Button("Closest reports in the gallery")
        reports = gr.Markdown(elem_id="reports")

        view_events = dict(fn=render, inputs=[view, *sliders], outputs=images, show_progress="hidden",
                           concurrency_limit=4)
        load_outputs = [view, series, window, *sliders, status]
        # A new volume clears the answer, mask and reports of the previous one.
        clear = dict(fn=lambda: ("", "", None, ""), outputs=[answer, boxes, mask_file, reports], show_progress="hidden")
        upload.upload(load, [upload, window], load_outputs).then(**view_events).then(**clear)
        bundled.input(lambda name, w: load(str(BUNDLED[name]) if name else None, w), [bundled, window],
                      load_outputs).then(**view_events).then(**clear)
        # The menu lists the series of a loaded study only, so a pick always has a view to show.
        series.input(lambda v, index, w: show(v["study"], index, w, v["path"]), [view, series, window],
                     [view, window, *sliders, status]).then(**view_events).then(**clear)
        window.input(rewindow, [view, window], [view, status]).then(**view_events)
        for slider in sliders:
            slider.change(trigger_mode="always_last", **view_events)
        ask_event = dict(fn=ask, inputs=[view, question, window], outputs=[view, answer, boxes, mask_file])
        ask_button.click(**ask_event).then(**view_events)
        question.submit(**ask_event).then(**view_events)
        retrieve_button.click(closest_reports, [view], [reports])
    return demo


demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    # One generation at a time (the model is shared); other visitors wait in Gradio's queue and see their place.
    demo.queue(default_concurrency_limit=1, max_size=32).launch(max_file_size=int(MAX_UPLOAD_MB * 2**20))
