"""The page: a Gradio Blocks app over `Demo`, and `ctfgen serve`.

Generating streams: while stage 1 runs, the CTF panel shows the grid of coarse previews (each label decoded as
its cluster's mean codeword) every 8 tokens, then the refined images replace it. Mistakes in the form come back
as a message on the page (a gradio error toast); the page stays as it was.
"""

from __future__ import annotations

from ctfgen.errors import CtfgenError
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import STAGE1_DEFAULTS, STAGE2_DEFAULTS
from ctfgen.serve.actions import MODES, Demo
from ctfgen.serve.limits import Limits
from ctfgen.serve.offline import import_gradio

INTRO = """# ctfgen: coarse-to-fine image generation
Stage 1 predicts a **coarse label** (a cluster of similar codewords) for each of the {tokens} positions, one
at a time; the preview decodes each label as its cluster's mean codeword while it runs. Stage 2 then picks every
fine token within its cluster in **one** pass. The baseline predicts the fine tokens one at a time."""

# Images come at their true size (32x32 samples); the browser scales them up, each pixel a sharp block, below
# the panel's label.
CSS = (".pixels img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; "
       "padding-top: 2.2em; box-sizing: border-box; }")
# No share link, nothing that phones home; errors as messages on the page.
LAUNCH_OPTIONS = dict(share=False, ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False,
                      run_history=False, show_error=True, footer_links=[], css=CSS)


def build_app(demo: Demo):
    """The Blocks app for `demo` (queued; launch it with `launch_options`)."""
    gr = import_gradio()
    pipe, names = demo.pipe, demo.pipe.class_names

    def shown(error: CtfgenError):
        return gr.Error(str(error), print_exception=False)

    def generate(*form):
        try:
            for frame in demo.generate(*form):
                yield (frame.images.get("ctf"), frame.images.get("baseline"), frame.stats(),
                       gr.skip() if frame.result is None else frame.result)
        except CtfgenError as e:
            raise shown(e) from None

    def reroll(action):
        def run(*args):
            try:
                return action(*args)
            except CtfgenError as e:
                raise shown(e) from None
        return run

    def panels(mode):
        modes = MODES.get(mode, ())
        return gr.Image(visible="ctf" in modes), gr.Image(visible="baseline" in modes)

    def image_view(label, elem_id, visible=True):
        # PNG, not gradio's default WebP: the page shows the sampler's exact pixels
        return gr.Image(label=label, format="png", type="pil", interactive=False, height=300, elem_id=elem_id,
                        elem_classes="pixels", visible=visible)

    with gr.Blocks(title="ctfgen: coarse-to-fine generation", analytics_enabled=False) as app:
        gr.Markdown(INTRO.format(tokens=pipe.grid ** 2))
        result = gr.State(None)  # the last CTF result of this browser session, for re-rolls
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                classes = gr.Dropdown(names, value=[names[0]], multiselect=True, label="Classes", elem_id="classes")
                one_of_each = gr.Checkbox(False, label="One of each class", elem_id="one-of-each")
                with gr.Row():
                    per_class = gr.Number(2, precision=0, label="Images of each class", elem_id="per-class")
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                mode = gr.Radio(demo.modes, value=demo.modes[0], label="Model", elem_id="mode")
                with gr.Accordion("Sampling settings", open=False):
                    cfg_scale = gr.Slider(1, 6, value=STAGE1_DEFAULTS.cfg_scale, step=0.1, label="CFG scale")
                    temperature = gr.Slider(0, 2, value=STAGE1_DEFAULTS.temperature, step=0.05,
                                            label="Stage-1 temperature")
                    top_k = gr.Number(STAGE1_DEFAULTS.top_k, precision=0, label="Stage-1 top-k (0 = off)")
                    stage2_temperature = gr.Slider(0, 2, value=STAGE2_DEFAULTS.temperature, step=0.05,
                                                   label="Stage-2 temperature")
                    stage2_top_k = gr.Number(STAGE2_DEFAULTS.top_k, precision=0, label="Stage-2 top-k (0 = off)")
                    stage2_steps = gr.Number(STAGE2_DEFAULTS.steps, precision=0, elem_id="stage2-steps",
                                             label="Stage-2 steps (1 = one pass; more need a refiner trained with "
                                                   "--reveal)")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                with gr.Row():
                    ctf_view = image_view("CTF: stage-1 preview, then the refined images", "ctf-images",
                                          visible=demo.has("ctf"))
                    baseline_view = image_view("Baseline", "baseline-images", visible=not demo.has("ctf"))
                stats = gr.Markdown(elem_id="stats")
        with gr.Accordion("Re-roll the details: keep an image's coarse labels, sample stage 2 again", open=True):
            with gr.Row():
                with gr.Column():
                    index = gr.Number(1, precision=0, label="Image number in the CTF result (reading order)",
                                      elem_id="reroll-index")
                    reroll_button = gr.Button("Re-roll this image", elem_id="reroll")
                with gr.Column():
                    size = pipe.image_size
                    upload = gr.File(label=f"or upload a {size}x{size} (or 28x28) grey image", type="filepath",
                                     file_types=["image"], elem_id="upload")
                    upload_class = gr.Dropdown(names, value=names[0], label="Its class", elem_id="upload-class")
                    upload_button = gr.Button("Re-roll the upload", elem_id="reroll-upload")
                with gr.Column():
                    variations = gr.Number(4, precision=0, label="Variations", elem_id="variations")
                    reroll_seed = gr.Number(1, precision=0, label="Re-roll seed", elem_id="reroll-seed")
            reroll_view = image_view("the image | its coarse labels | variations", "reroll-images")
            tokens_file = gr.File(label="Token grids of the variations (.npz: images, labels, tokens, coarse)",
                                  interactive=False, elem_id="reroll-tokens")

        mode.change(panels, mode, [ctf_view, baseline_view], queue=False)
        one_of_each.change(lambda every: gr.Dropdown(interactive=not every), one_of_each, classes, queue=False)
        form = [classes, one_of_each, per_class, seed, mode, cfg_scale, temperature, top_k, stage2_temperature,
                stage2_top_k, stage2_steps]
        # Every waiting request holds a handler; the batcher, not gradio, bounds how many may wait.
        generate_button.click(generate, form, [ctf_view, baseline_view, stats, result], api_name="generate",
                              concurrency_limit=None, show_progress="minimal")
        stage2 = [variations, reroll_seed, stage2_temperature, stage2_top_k, stage2_steps]
        reroll_button.click(reroll(demo.reroll_generated), [result, index, *stage2], [reroll_view, tokens_file],
                            api_name="reroll", concurrency_limit=4, show_progress="minimal")
        upload_button.click(reroll(demo.reroll_upload), [upload, upload_class, *stage2], [reroll_view, tokens_file],
                            api_name="reroll_upload", concurrency_limit=4, show_progress="minimal")
    return app.queue(max_size=demo.limits.max_queue)


def launch_options(demo: Demo, host: str, port: int) -> dict:
    # a thread per waiting request and a few for the rest
    return LAUNCH_OPTIONS | dict(server_name=host, server_port=port, max_threads=demo.limits.max_queue + 8)


def serve(pipeline_dir, host: str = "127.0.0.1", port: int = 7860, limits: Limits = Limits()) -> None:
    """`ctfgen serve`: the page for the pipeline in `pipeline_dir`, until interrupted."""
    if not 0 < port < 65536:
        raise CtfgenError(f"--port must be between 1 and 65535, got {port}")
    demo = Demo(CTFPipeline.from_pretrained(pipeline_dir), limits)
    try:
        build_app(demo).launch(**launch_options(demo, host, port))
    finally:
        demo.close()
