"""The Gradio page of ``ldmkit demo``: inputs drawn from the conditioner, a progress bar and a
preview while sampling, the results as a gallery with their settings. Imports Gradio; the
rest of :mod:`ldmkit.demo` does not (:mod:`ldmkit.demo.server` imports this module once
Gradio's temporary folder is chosen)."""

from __future__ import annotations

import contextlib
import html
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network at run time

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from ldmkit.demo.editor import drawing_file, editor_files, palette  # noqa: E402
from ldmkit.demo.form import (  # noqa: E402
    MAX_CHECKS,
    MAX_IMAGES,
    SEED_LIMIT,
    ConditionField,
    DemoInputError,
    PageRequest,
    max_side,
    max_upload_bytes,
    too_large,
)
from ldmkit.demo.session import DemoSession, Result, Step  # noqa: E402

CSS = "#ldmkit-preview img, #ldmkit-samples img { image-rendering: pixelated; }"


def _theme() -> Any:
    # system fonts only: the page loads nothing from outside the server
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def build_demo(session: DemoSession) -> gr.Blocks:
    """The page for ``session``'s pipeline (call ``.queue(...)`` and ``.launch(...)`` on it)."""
    pipeline = session.pipeline
    f = int(pipeline.first_stage.downsample_factor)
    size = int(pipeline.image_size) if pipeline.image_size else None
    uploads = session.results_dir / "uploads"
    components: dict[str, Any] = {}  # condition key -> its component
    drawings: dict[str, Any] = {}  # segmentation key -> its drawing canvas
    negatives: dict[str, Any] = {}  # class or text key -> its negative's component

    with gr.Blocks(
        title=f"ldmkit demo: {session.checkpoint.name}",
        analytics_enabled=False,
        delete_cache=(600, 3600),
    ) as demo:
        gr.Markdown(f"## ldmkit demo\n{_summary(session)}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                for spec in session.fields:
                    components[spec.key] = _condition_component(spec, size)
                    drawing = _drawing_component(spec, size)
                    if drawing is not None:
                        drawings[spec.key] = drawing
                for spec in session.fields:  # below the conditions: optional, for guidance
                    if spec.negative is not None:
                        negatives[spec.key] = _negative_component(spec)
                with gr.Accordion("start from an image (img2img, inpainting)", open=False):
                    init_editor = gr.ImageEditor(
                        label="start image: upload it; paint over the region to repaint (no strokes: img2img)",
                        type="pil",
                        sources=["upload", "clipboard"],
                        layers=False,
                        transforms=(),
                        brush=_mask_brush(size),
                        elem_id="ldmkit-init-image",
                    )
                    init_mask = gr.Image(
                        label="or a mask PNG (white = repaint, black = keep; replaces the strokes)",
                        type="filepath",
                        image_mode=None,
                        sources=["upload"],
                        elem_id="ldmkit-init-mask",
                    )
                    strength = gr.Number(
                        value=1.0,
                        precision=None,
                        step=0.05,
                        label="strength (above 0 to 1: the share of the steps run from the image)",
                        elem_id="ldmkit-strength",
                    )
                with gr.Row():
                    sampler = gr.Dropdown(
                        choices=session.samplers.options,
                        value=session.samplers.current,
                        label="sampler",
                        elem_id="ldmkit-sampler",
                    )
                    steps = gr.Number(
                        value=session.samplers.default_steps(session.samplers.current),
                        precision=None,
                        label=f"steps (1 to {int(pipeline.schedule.timesteps)})",
                        elem_id="ldmkit-steps",
                    )
                # numbers rather than sliders: a slider puts a typed value outside its range
                # back inside it without a word; the request's checks refuse it in one line
                guidance = gr.Number(
                    value=_default_guidance(pipeline),
                    precision=None,
                    step=0.1,
                    elem_id="ldmkit-guidance",
                    label="guidance scale (>= 0; 1: none, 0: unconditional)",
                )
                with gr.Row():
                    seed = gr.Number(
                        value=0,
                        precision=None,
                        label=f"seed (0 to {SEED_LIMIT - 1})",
                        elem_id="ldmkit-seed",
                    )
                    randomize = gr.Checkbox(
                        value=True, label="randomize seed", elem_id="ldmkit-randomize"
                    )
                num_images = gr.Number(
                    value=4,
                    precision=None,
                    step=1,
                    label=f"number of images (1 to {MAX_IMAGES})",
                    elem_id="ldmkit-num-images",
                )
                with gr.Row():
                    shown = f"{size}" if size else "the inputs'"
                    hint = f"a multiple of {f} up to {max_side(pipeline)}; 0: {shown}"
                    height = gr.Number(
                        value=0, precision=None, label="height", info=hint, elem_id="ldmkit-height"
                    )
                    width = gr.Number(
                        value=0, precision=None, label="width", info=hint, elem_id="ldmkit-width"
                    )
                generate = gr.Button("Generate", variant="primary", elem_id="ldmkit-generate")
            with gr.Column(scale=1):
                preview = gr.Image(
                    label="preview: the current x0 prediction",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="ldmkit-preview",
                    height=160,
                )
                gallery = gr.Gallery(
                    label="samples",
                    format="png",
                    columns=4,
                    object_fit="contain",
                    interactive=False,
                    elem_id="ldmkit-samples",
                )
                notes = gr.Textbox(
                    label="notes on these samples",
                    interactive=False,
                    visible=False,
                    elem_id="ldmkit-notes",
                )
                command = gr.Textbox(
                    label="the same with ldmkit sample",
                    lines=2,
                    interactive=False,
                    buttons=["copy"],
                    elem_id="ldmkit-command",
                )
                record = gr.JSON(label="settings", open=True, elem_id="ldmkit-settings")
                files = gr.File(
                    label="download: grid, settings, inputs",
                    file_count="multiple",
                    interactive=False,
                    elem_id="ldmkit-files",
                )

        def request_of(values: dict, scratch: Path) -> PageRequest:
            image, painted = editor_files(values[init_editor], scratch, "start", name="start image")
            mask = values[init_mask] or (str(painted) if painted else None)
            return PageRequest(
                sampler=values[sampler],
                steps=values[steps],
                guidance_scale=values[guidance],
                seed=values[seed],
                randomize_seed=bool(values[randomize]),
                num_images=values[num_images],
                height=values[height],
                width=values[width],
                conditions=_condition_values(session.fields, components, drawings, values, scratch),
                negative={key: values[c] for key, c in negatives.items()},
                init_image=str(image) if image else None,
                mask=mask,
                strength=values[strength] if image else None,
            )

        def check(values: dict) -> None:
            """Bad input fails here, at once (this step never waits for a sampling), as a
            message that leaves the results as they are (an error in the sampling event itself
            marks every output)."""
            with _page_errors(), tempfile.TemporaryDirectory(dir=_mkdir(uploads)) as scratch:
                session.check(request_of(values, Path(scratch)))

        def run(values: dict, progress=gr.Progress()):  # noqa: B008 (Gradio's own idiom)
            with _page_errors(), tempfile.TemporaryDirectory(dir=_mkdir(uploads)) as scratch:
                cancel = threading.Event()
                events = session.generate(request_of(values, Path(scratch)), cancel)
                try:
                    for event in events:
                        if isinstance(event, Step):
                            progress(
                                (event.done, event.total),
                                desc=f"sampling, step {event.done}/{event.total}",
                            )
                            if event.preview is not None:
                                yield {preview: event.preview}
                        elif isinstance(event, Result):
                            yield _result_updates(
                                event, preview, gallery, command, record, files, notes
                            )
                finally:
                    cancel.set()
                    events.close()

        inputs = {
            sampler,
            steps,
            guidance,
            seed,
            randomize,
            num_images,
            height,
            width,
            init_editor,
            init_mask,
            strength,
            *components.values(),
            *drawings.values(),
            *negatives.values(),
        }
        images = {init_editor: "start image", init_mask: "mask"}
        images.update({c: key for key, c in [*components.items(), *drawings.items()]})
        for component, name in images.items():
            if isinstance(component, (gr.Image, gr.ImageEditor)):
                _read_uploads(component, name, max_side(pipeline))
        named = {sampler: "sampler", randomize: "randomize seed"}
        named.update(
            {c: key for key, c in components.items() if not isinstance(c, (gr.Image, gr.ImageEditor))}
        )
        named.update({negatives[f.key]: f.negative for f in session.fields if f.key in negatives})
        for component, name in named.items():
            _name_refusals(component, name)
        # the check goes through the queue too (a queue=False error shows no message in Gradio
        # 6), but never waits for a sampling: a queue of its own, MAX_CHECKS at a time (Gradio
        # decodes the uploads before a check runs)
        generate.click(
            check,
            inputs=inputs,
            outputs=None,
            concurrency_limit=MAX_CHECKS,
            concurrency_id="checks",
            show_progress="hidden",
            api_visibility="private",
        ).success(
            run,
            inputs=inputs,
            outputs=[preview, gallery, command, record, files, notes],
            concurrency_id="sampling",
            api_name="generate",
            show_progress_on=[gallery],  # the preview stays in sight while sampling
        )

        def sampler_steps(name: str) -> Any:
            try:
                return session.samplers.default_steps(name)
            except DemoInputError as err:
                raise gr.Error(str(err), print_exception=False) from None

        sampler.change(
            sampler_steps, inputs=sampler, outputs=steps, queue=False, show_progress="hidden"
        )
    return demo


def _read_uploads(component: Any, name: str, limit: int) -> None:
    """Gradio decodes an upload in the component's ``preprocess``, before the event's function
    runs, and PIL refuses there an image of more than ``Image.MAX_IMAGE_PIXELS`` (``serve``
    sets it to ``limit**2``) and a file that is no image it can read: say so in ldmkit's one
    line, naming the file as uploaded, not as Gradio's bare "Error". An editor's image sent
    as a file (through the API; a browser sends its 8-bit canvas) is read as ``ldmkit sample``
    reads it (:func:`_scaled`)."""
    decode = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            if getattr(payload, "background", None) is not None:
                payload = payload.model_copy(update={"background": _scaled(payload.background)})
            return decode(payload)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise gr.Error(too_large(name, limit), print_exception=False) from None
        except (OSError, SyntaxError, ValueError) as err:  # PIL signals damage through these
            upload = getattr(payload, "background", None) or payload  # an editor's image
            path, shown = getattr(upload, "path", None), getattr(upload, "orig_name", None)
            if not path or not Path(path).is_file():
                raise
            shown = shown or "the upload"
            reason = str(err).replace(str(path), shown).replace("\n", " ")
            message = f"{name}: cannot read {shown} as an image: {reason}"
            raise gr.Error(message, print_exception=False) from None

    component.preprocess = preprocess


def _name_refusals(component: Any, name: str) -> None:
    """A value the component's ``preprocess`` refuses (a dropdown's choices, a checkbox's:
    values a browser does not send, an API client may) as a line naming the input ``name``,
    not Gradio's bare message (or its "Error", for a value of the wrong type)."""
    decode = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except gr.Error as err:
            raise gr.Error(f"{name}: {err.message}", print_exception=False) from None
        except (TypeError, ValueError):
            message = f"{name}: {payload!r} is not a value this input takes"
            raise gr.Error(message, print_exception=False) from None

    component.preprocess = preprocess


def _scaled(upload: Any) -> Any:
    """A 16-bit or float grayscale image file as the 8-bit one ``ldmkit sample`` makes of it
    (``normalize_mode``), written beside it: the editor converts what it reads to RGBA, which
    clips such an image at 255 (16-bit mid-grey came out white, float 0.5 black)."""
    from ldmkit.data.sources.base import normalize_mode

    path = getattr(upload, "path", None)
    if not path:
        return upload
    with Image.open(path) as image:
        if not (image.mode.startswith("I") or image.mode == "F"):
            return upload
        scaled = normalize_mode(image)
    target = Path(path).with_name(f"{Path(path).stem}-8bit.png")
    # the same upload may be read by two requests at once (Gradio names a file by its
    # contents): each writes its own file and moves it into place
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".png", delete=False) as part:
        scaled.save(part, format="PNG")
    os.replace(part.name, target)
    return upload.model_copy(update={"path": str(target)})


def _condition_component(spec: ConditionField, size: int | None) -> Any:
    elem_id = f"ldmkit-cond-{spec.key}"
    if spec.kind == "class":
        if spec.choices:
            return gr.Dropdown(
                choices=list(spec.choices),
                value=spec.choices[0][1],
                label=spec.label,
                elem_id=elem_id,
            )
        return gr.Number(value=0, precision=None, label=spec.label, elem_id=elem_id)
    if spec.kind == "text":
        return gr.Textbox(
            label=spec.label, placeholder="what the image should show", lines=2, elem_id=elem_id
        )
    if spec.kind == "tokens":
        return gr.Textbox(label=spec.label, placeholder="3, 17, 42, ...", lines=1, elem_id=elem_id)
    if spec.kind == "number":
        return gr.Number(value=0, precision=None, label=spec.label, elem_id=elem_id)
    if spec.mask_key is not None:
        return gr.ImageEditor(
            label=spec.label,
            type="pil",
            sources=["upload", "clipboard"],
            layers=False,
            transforms=(),
            brush=_mask_brush(size),
            elem_id=elem_id,
        )
    # image_mode=None: the file as uploaded (a class map keeps its one-channel ids)
    return gr.Image(
        label=spec.label,
        type="filepath",
        image_mode=None,
        sources=["upload", "clipboard"],
        format="png",
        elem_id=elem_id,
    )


def _negative_component(spec: ConditionField) -> Any:
    """A field's negative (:attr:`ConditionField.negative`): a prompt box, or a choice of a
    class, "none" (the null condition) by default."""
    elem_id = f"ldmkit-negative-{spec.key}"
    label = f"{spec.negative} (optional; needs a guidance scale other than 1)"
    if spec.kind == "text":
        return gr.Textbox(
            label=label, placeholder="what the images should not show", lines=1, elem_id=elem_id
        )
    if spec.choices:
        choices = [("none", ""), *spec.choices]
        return gr.Dropdown(choices=choices, value="", label=label, elem_id=elem_id)
    return gr.Number(value=None, precision=None, label=f"{label}; empty: none", elem_id=elem_id)


def _mask_brush(size: int | None) -> Any:
    """The brush that paints the region to generate: one colour, about 1/8 of the image."""
    return gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=max(1, (size or 64) // 8))


def _drawing_component(spec: ConditionField, size: int | None) -> Any:
    """For a class map: a canvas to draw one on, class i in colour i (below the upload). It
    starts empty: Gradio 6's editor shows no tools over an initial value."""
    colours = palette(spec.num_classes or 0) if spec.kind == "segmentation" else None
    if colours is None or size is None:
        return None
    names = spec.names or tuple(str(i) for i in range(len(colours)))
    legend = " ".join(
        f'<span style="white-space:nowrap"><span style="display:inline-block;width:0.9em;height:0.9em;'
        f'background:{c};border:1px solid #888;vertical-align:middle"></span> {i}: {html.escape(n)}</span>'
        for i, (c, n) in enumerate(zip(colours, names, strict=False))
    )
    with gr.Group():
        canvas = gr.ImageEditor(
            label=f"{spec.key}: or draw a map (used when nothing is uploaded; unpainted pixels are 0)",
            type="numpy",
            image_mode="RGB",
            sources=[],
            layers=False,
            transforms=(),
            brush=gr.Brush(
                colors=colours,
                default_color=colours[min(1, len(colours) - 1)],
                color_mode="fixed",
                default_size=max(1, size // 8),
            ),
            canvas_size=(size, size),
            fixed_canvas=True,
            elem_id=f"ldmkit-draw-{spec.key}",
        )
        gr.HTML(f'<div style="font-size:0.85em;padding:0 0.5em 0.5em">{legend}</div>')
    return canvas


def _condition_values(
    fields: list[ConditionField],
    components: dict[str, Any],
    drawings: dict[str, Any],
    values: dict,
    uploads: Path,
) -> dict:
    """Condition key -> what :func:`ldmkit.demo.form.prepare` reads (ids, prompts, paths)."""
    out: dict[str, Any] = {}
    painted: dict[str, Path | None] = {}
    for spec in fields:
        value = values[components[spec.key]]
        if value is None and spec.key in drawings:
            drawn = drawing_file(
                values[drawings[spec.key]], spec.num_classes or 0, uploads, spec.key
            )
            out[spec.key] = str(drawn) if drawn else None
        elif spec.mask_key is not None:
            image, mask = editor_files(value, uploads, spec.key)
            out[spec.key] = str(image) if image else None
            painted[spec.mask_key] = mask
        else:
            out[spec.key] = value
    for key, mask in painted.items():
        if not out.get(key) and mask is not None:
            out[key] = str(mask)  # an uploaded mask wins over the strokes
    return out


@contextlib.contextmanager
def _page_errors() -> Iterator[None]:
    """Errors as one-line messages on the page (``gr.Error``), never a traceback there."""
    try:
        yield
    except DemoInputError as err:
        raise gr.Error(str(err), print_exception=False) from None
    except gr.Error:
        raise
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        message = f"sampling failed: {type(err).__name__}: {err}".replace("\n", " ")
        raise gr.Error(
            f"{message} (the server log has the details)", print_exception=False
        ) from None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _result_updates(result: Result, preview, gallery, command, record, files, notes) -> dict:
    return {
        preview: str(result.files[0]),  # the grid: the last prediction is the result
        gallery: [(str(path), text) for path, text in result.images],
        command: result.command,
        record: result.record,
        files: [str(p) for p in result.files],
        # this request's warnings (hidden when there are none)
        notes: gr.Textbox(
            value="\n".join(result.notes),
            visible=bool(result.notes),
            lines=max(1, len(result.notes)),
        ),
    }


def _summary(session: DemoSession) -> str:
    pipeline = session.pipeline
    conditions = ", ".join(f"{f.key} ({f.kind})" for f in session.fields) or "none (unconditional)"
    size = (
        f"{pipeline.image_size}x{pipeline.image_size}" if pipeline.image_size else "from its inputs"
    )
    return (
        f"`{session.checkpoint}` · conditions: {conditions} · trained at {size}, "
        f"f={pipeline.first_stage.downsample_factor} · {session.device}, {session.precision} · "
        "one sampling at a time; requests wait in a queue"
    )


def _default_guidance(pipeline: Any) -> float:
    """The trainer's sampling guidance when the model learned a null condition, else 1."""
    from omegaconf import OmegaConf

    if not pipeline.conditioner.input_keys or not pipeline.conditioner.learns_null_condition:
        return 1.0
    value = (
        OmegaConf.select(pipeline.config, "trainer.guidance_scale", default=None)
        if pipeline.config
        else None
    )
    return float(value) if isinstance(value, int | float) and value >= 0 else 1.0


def launch(session: DemoSession, *, host: str, port: int, queue_size: int) -> None:
    """Serve ``session``'s page on ``host:port`` until Ctrl-C (a KeyboardInterrupt)."""
    demo = build_demo(session)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=False,
        ssr_mode=False,
        max_file_size=max_upload_bytes(session.pipeline),
        theme=_theme(),
        css=CSS,
        quiet=True,  # Gradio's lines: "set share=True" among them, which the page never does
        prevent_thread_lock=True,
    )
    print(f"ldmkit demo: serving {demo.local_url} (Ctrl-C or SIGTERM stops it)", flush=True)
    demo.block_thread()  # returns on Ctrl-C, the server closed
