"""The web demo: the batcher and the page's actions in Python, then the page itself in a real browser.

The browser tests drive Debian's Chromium (/usr/bin/chromium) with Playwright over a server on a free loopback
port, with a tiny pipeline of random weights. Where gradio, Playwright or Chromium is not installed they skip,
saying what is missing and that `scripts/setup.sh --test` installs it; in CI (CI set) they fail instead.
"""

import importlib.util
import io
import os
import re
import socket
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen import cli
from ctfgen.data.datasets import FMNIST_CLASSES
from ctfgen.errors import CtfgenError
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import SamplingParams
from ctfgen.sampling.request import SamplingRequest
from ctfgen.sampling.reroll import coarse_of_images, read_image, reroll_grid
from ctfgen.serve.actions import Demo, Limits
from ctfgen.serve.batcher import Batcher
from ctfgen.serve.views import grid_image, progress_pixels
from installed import require
from test_pipeline import make_parts

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LIMITS = Limits(max_images=8, max_queue=4, max_batch=16)
STAGE1, STAGE2 = SamplingParams(cfg_scale=2.0), SamplingParams()  # the page's defaults
TIMEOUT_MS = 180_000  # generous: the machine may be shared with training jobs
# gradio's queue summarises its events with pandas calls that pandas 3 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


@pytest.fixture(scope="module")
def pipe():
    return CTFPipeline(**make_parts(), class_names=list(FMNIST_CLASSES))


@pytest.fixture(scope="module")
def demo(pipe):
    demo = Demo(pipe, LIMITS)
    yield demo
    demo.close()


def form(classes=("Sneaker",), one_of_each=False, per_class=2, seed=3, mode="CTF", cfg_scale=2.0, temperature=1.0,
         top_k=0, stage2_temperature=1.0, stage2_top_k=0, stage2_steps=1):
    """The page's form as its widgets hand it over."""
    return [list(classes), one_of_each, per_class, seed, mode, cfg_scale, temperature, top_k, stage2_temperature,
            stage2_top_k, stage2_steps]


def request(classes, seed, mode="ctf"):
    return SamplingRequest(tuple(classes), mode=mode, sampling=STAGE1, stage2_sampling=STAGE2, seed=seed)


def grids(out):
    return torch.cat([out.coarse.flatten(1), out.tokens.flatten(1)], 1)


# -- the batcher -----------------------------------------------------------------------------------

def test_concurrent_requests_share_one_call_and_each_gets_its_own_images(pipe):
    """Requests that wait together are sampled in one call; each user's images are those of the same request
    alone: exactly in float64, and up to a near-tie flipped by the batch shape in float32."""
    users = [([0, 3], 4), ([7], 9), ([7], 4), ([1, 2, 5], 0)]
    for model in (pipe, pipe.copy(torch.float64)):
        batcher = Batcher(model, max_batch=16)
        try:
            with batcher.pipeline():  # the worker waits: every request joins the same call
                jobs = [batcher.submit(request(classes, seed)) for classes, seed in users]
            answers = [job.result(timeout=120) for job in jobs]
        finally:
            batcher.close()
        assert batcher.calls == 1
        for (classes, seed), answer in zip(users, answers):
            alone = model(classes, seed=seed, output_type="pt")
            assert answer.labels.tolist() == classes
            agreement = (grids(answer) == grids(alone)).float().mean()
            assert agreement == 1 if model is not pipe else agreement >= 0.99


def test_requests_with_other_settings_are_not_merged(pipe):
    batcher = Batcher(pipe, max_batch=16)
    try:
        with batcher.pipeline():
            ctf, baseline = batcher.submit(request([1], 0)), batcher.submit(request([1], 0, mode="baseline"))
        assert ctf.result(timeout=120).coarse is not None and baseline.result(timeout=120).coarse is None
    finally:
        batcher.close()
    assert batcher.calls == 2


def started(batcher, req):
    """Submit `req` and wait until the worker has taken it off the queue."""
    job = batcher.submit(req)
    for _ in range(200):
        if batcher.waiting == 0:
            break
        threading.Event().wait(0.05)
    return job


def test_a_full_queue_refuses_with_a_message(pipe):
    batcher = Batcher(pipe, max_batch=1, max_waiting=2)
    try:
        with batcher.pipeline():  # the worker takes the first request, then waits for the pipeline
            first = started(batcher, request([0], 0))
            waiting = [batcher.submit(request([c], 0)) for c in (1, 2)]
            with pytest.raises(CtfgenError, match="busy: 2 requests are waiting"):
                batcher.submit(request([3], 0))
        assert all(len(job.result(timeout=120).labels) == 1 for job in [first, *waiting])  # nothing lost
    finally:
        batcher.close()


def test_previews_are_drawn_once_per_call_and_each_user_gets_their_rows(pipe):
    """The batcher draws the tokens so far of the whole call and hands each request the pictures of its own
    images; the last progress before the result is the whole coarse grid."""
    drawn = []

    def draw(mode, tokens):
        drawn.append(len(tokens))
        return progress_pixels(pipe, mode, tokens)

    batcher = Batcher(pipe, max_batch=16, preview=draw)
    try:
        with batcher.pipeline():
            jobs = [batcher.submit(request(classes, seed)) for classes, seed in (([0, 3], 4), ([7], 9))]
        updates = [list(job.updates(timeout=120)) for job in jobs]
    finally:
        batcher.close()
    assert batcher.calls == 1 and set(drawn) == {3}  # every picture of the call's three images at once
    for job, (*progress, out) in zip(jobs, updates):
        assert progress and progress[-1].step == pipe.grid ** 2
        for update in progress:
            assert torch.equal(update.tokens, out.coarse.flatten(1)[:, :update.step])
            assert update.pixels.shape[0] == len(job.request.classes)
        alone = progress_pixels(pipe, "ctf", out.coarse.flatten(1))
        assert (progress[-1].pixels.int() - alone.int()).abs().max() <= 1  # batch shape: last-bit rounding only


def test_a_failing_preview_fails_the_call_not_the_server(pipe):
    def draw(mode, tokens):
        raise RuntimeError("preview broke")

    batcher = Batcher(pipe, max_batch=16, preview=draw)
    try:
        with pytest.raises(RuntimeError, match="preview broke"):
            batcher.submit(request([1], 0)).result(timeout=120)
        batcher.preview = None
        assert batcher.submit(request([1], 0)).result(timeout=120).labels.tolist() == [1]
    finally:
        batcher.close()


def test_without_a_preview_each_request_gets_its_rows_of_the_tokens_so_far(pipe):
    """With no picture to draw, the batcher still streams to each request the tokens so far of its own images (the
    coarse labels, or the baseline's tokens), every `progress_every` tokens and after the last, without pixels."""
    for mode in ("ctf", "baseline"):
        batcher = Batcher(pipe, max_batch=16, progress_every=20)
        try:
            with batcher.pipeline():
                jobs = [batcher.submit(request(classes, seed, mode)) for classes, seed in (([0, 3], 4), ([7], 9))]
            updates = [list(job.updates(timeout=120)) for job in jobs]
        finally:
            batcher.close()
        assert batcher.calls == 1
        for (*progress, out) in updates:
            grid = (out.coarse if mode == "ctf" else out.tokens).flatten(1)
            steps = [update.step for update in progress]
            assert steps and set(steps) <= {20, 40, 60, 64} and steps == sorted(steps) and steps[-1] == 64
            for update in progress:  # a slow reader may skip to the newest, never to another request's rows
                assert update.pixels is None and torch.equal(update.tokens, grid[:, :update.step])


def test_close_answers_the_waiting_requests_and_refuses_new_ones(pipe):
    """Closing lets the call that runs finish; the requests still waiting hear at once that the server is shutting
    down, and so does any request sent after."""
    batcher = Batcher(pipe, max_batch=1)
    closing = threading.Thread(target=batcher.close)
    with batcher.pipeline():  # the worker takes the first request, then waits for the pipeline
        first = started(batcher, request([0], 0))
        waiting = [batcher.submit(request([c], 0)) for c in (1, 2)]
        closing.start()
        for job in waiting:
            with pytest.raises(CtfgenError, match="the server is shutting down"):
                job.result(timeout=10)
        with pytest.raises(CtfgenError, match="the server is shutting down"):
            batcher.submit(request([3], 0))
    closing.join(timeout=120)
    assert not closing.is_alive() and batcher.calls == 1
    assert first.result(timeout=10).labels.tolist() == [0]


def test_a_request_larger_than_a_call_is_refused_and_the_server_serves_on(pipe):
    batcher = Batcher(pipe, max_batch=4)
    try:
        with pytest.raises(CtfgenError, match="5 images in one request; at most 4"):
            batcher.submit(request([0, 1, 2, 3, 4], 0))
        assert batcher.waiting == 0
        assert batcher.submit(request([0, 1, 2, 3], 0)).result(timeout=120).labels.tolist() == [0, 1, 2, 3]
    finally:
        batcher.close()


def test_progress_streams_the_coarse_tokens_then_the_images(pipe, demo):
    frames = [(f.status, f.images["ctf"].copy()) for f in demo.generate(*form())]
    expected = pipe(["Sneaker"], per_class=2, seed=3, output_type="pt")
    statuses = [status for status, _ in frames]
    assert statuses[-1] == "done" and statuses[-2] == "CTF: 64 of 64 tokens"
    assert all(re.fullmatch(r"CTF: \d+ of 64 tokens", s) for s in statuses[:-1])
    assert np.array_equal(np.asarray(frames[-1][1]), np.asarray(grid_image(expected.images)))
    full_preview = grid_image(progress_pixels(pipe, "ctf", expected.coarse.flatten(1)))
    assert np.array_equal(np.asarray(frames[-2][1]), np.asarray(full_preview))


@pytest.mark.parametrize("changes,message", [
    (dict(per_class=0), "images of each class must be at least 1"),
    (dict(per_class=9), "9 images asked for .* at most 8"),
    (dict(one_of_each=True, per_class=1), "10 images asked for .* at most 8"),
    (dict(classes=()), "pick at least one class"),
    (dict(classes=("Sneakers",)), "neither a class id"),
    (dict(per_class=None), "give a value for images of each class"),
    (dict(seed=-1), "seed must be between 0 and 4294967295"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(temperature=-1.0), "stage 1: temperature must be >= 0"),
    (dict(top_k=9), "top_k must be between 0 .* 8"),
    (dict(mode="Baseline", top_k=65), "baseline: top_k must be between 0 .* 64"),
    (dict(stage2_top_k=65), "stage 2: top_k"),
    (dict(stage2_steps=0), "stage 2: steps must be between 1 and"),
    (dict(stage2_steps=None), "give a value for stage-2 steps"),
    (dict(stage2_steps=4), "stage 2 in 4 steps needs a refiner trained with --reveal"),
    (dict(mode="Fast"), "choose one of CTF, Baseline, Both"),
])
def test_bad_forms_are_refused_with_a_message(demo, changes, message):
    with pytest.raises(CtfgenError, match=message):
        next(demo.generate(*form(**changes)))


def test_reroll_keeps_the_coarse_labels(pipe, demo, tmp_path):
    result = None
    for frame in demo.generate(*form(per_class=3)):
        result = frame.result
    grid, npz_path = demo.reroll_generated(result, 2, 3, 5, 1.0, 0)
    with np.load(npz_path) as npz:
        assert torch.equal(pipe.coarse_map.coarse_of_fine[torch.from_numpy(npz["tokens"])],
                           result["coarse"][1:2].expand(3, -1, -1))
        assert not np.array_equal(npz["tokens"][0], npz["tokens"][1])  # new details
        layout = reroll_grid(result["images"][1:2], pipe.decode_preview(result["coarse"][1:2]),
                             torch.from_numpy(npz["images"]).permute(0, 3, 1, 2))
    assert np.array_equal(np.asarray(grid), np.asarray(layout))  # the image | its coarse labels | 3 variations
    with pytest.raises(CtfgenError, match="image number 4 is out of range"):
        demo.reroll_generated(result, 4, 3, 5, 1.0, 0)
    with pytest.raises(CtfgenError, match="9 variations asked for; .* at most 8"):
        demo.reroll_generated(result, 1, 9, 5, 1.0, 0)
    with pytest.raises(CtfgenError, match="generate CTF images first"):
        demo.reroll_generated(None, 1, 3, 5, 1.0, 0)

    upload = tmp_path / "upload.png"
    Image.fromarray(result["images"][0, 0].numpy(), mode="L").crop((2, 2, 30, 30)).save(upload)  # 28x28 grey
    _, npz_path = demo.reroll_upload(str(upload), "Sneaker", 2, 0, 1.0, 0)
    with np.load(npz_path) as npz:
        coarse = coarse_of_images(pipe, read_image(upload, 32)[None])
        assert torch.equal(torch.from_numpy(npz["coarse"]), coarse.expand(2, -1, -1))
        assert torch.equal(pipe.coarse_map.coarse_of_fine[torch.from_numpy(npz["tokens"])], coarse.expand(2, -1, -1))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(CtfgenError, match="notes.png is not an image"):
        demo.reroll_upload(str(tmp_path / "notes.png"), "Sneaker", 2, 0, 1.0, 0)


@pytest.mark.parametrize("flags,message", [
    (["--port", "70000"], "--port must be between 1 and 65535"),
    (["--max-images", "0"], "max_images must be at least 1"),
    (["--max-images", "65"], "max_images \\(65\\) cannot exceed max_batch \\(64\\)"),
])
def test_serve_refuses_bad_limits_before_starting(flags, message, tmp_path, capsys):
    assert cli.main(["serve", "--pipeline", str(tmp_path), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


# -- the page, in a real browser -------------------------------------------------------------------

def missing_for_the_browser() -> list[str]:
    missing = [f"{module} (pip install -e '.[test,web]')" for module in ("gradio", "playwright")
               if importlib.util.find_spec(module) is None]
    return missing + ([] if os.access(CHROMIUM, os.X_OK) else [f"{CHROMIUM} (apt-get install chromium)"])


@pytest.fixture(scope="module")
def browser_installed():
    require(missing_for_the_browser(), "the browser tests")


in_browser = pytest.mark.usefixtures("browser_installed")  # before the fixtures that start the server and browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Paced:
    """The tiny pipeline with a pause after each progress report. It samples a grid in milliseconds, so its last
    preview and its final images could reach the browser in one network read and be drawn as one update; a real
    model spaces them by much more than this pause."""

    def __init__(self, pipe, pause_s=0.05):
        self.pipe, self.pause_s = pipe, pause_s

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, callback=None, **kwargs):
        def report_then_pause(*report):
            callback(*report)
            time.sleep(self.pause_s)

        return self.pipe(*args, callback=callback and report_then_pause, **kwargs)


@pytest.fixture(scope="module")
def served(pipe):
    """The page's demo on a free loopback port: (url, demo)."""
    from ctfgen.serve.app import build_app, launch_options

    demo = Demo(pipe, LIMITS)
    demo.batcher.pipe = Paced(pipe)
    app = build_app(demo)
    port = free_port()
    app.launch(**launch_options(demo, "127.0.0.1", port), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", demo
    app.close()
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    """A fresh page of the demo; after the test, every request it made must have gone to loopback."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    urls = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(served[0])
    page.wait_for_selector("#generate")
    yield page
    page.close()
    hosts = {urlparse(u).hostname for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page reached beyond loopback: {sorted(hosts)}"


WATCH = """ids => {
    window.seen = {};
    for (const id of ids) {
        const root = document.getElementById(id), log = window.seen[id] = [];
        const record = () => {
            const img = root.querySelector('img');
            const value = id === 'stats' ? root.innerText : img && img.src;
            if (value && log[log.length - 1] !== value) log.push(value);
        };
        new MutationObserver(record).observe(root, {subtree: true, childList: true, attributes: true,
                                                    characterData: true});
    }
}"""


def pick_class(page, name):
    page.click("#classes .remove-all")
    page.click("#classes input")
    page.keyboard.type(name)
    page.click(f"#classes li[aria-label='{name}']")
    page.keyboard.press("Escape")


def generate(page, **numbers):
    """Fill the number boxes, watch the image panels and the stats, click Generate, wait until done."""
    for elem_id, value in numbers.items():
        page.fill(f"#{elem_id.replace('_', '-')} input", str(value))
    page.evaluate(WATCH, ["ctf-images", "stats"])
    page.click("#generate")
    page.wait_for_function("() => window.seen.stats.some(text => text.includes('done'))")
    return page.evaluate("() => window.seen['ctf-images']")


def pixels_at(page, url) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.request.get(url).body())).convert("RGB"))


def message(page) -> str:
    """The text of the error toast shown now; it is closed after reading."""
    text = page.locator("[data-testid='toast-text']").first.inner_text()
    page.click("[data-testid='toast-close']")
    page.wait_for_selector("[data-testid='toast-text']", state="detached")
    return text


@in_browser
def test_page_streams_the_preview_then_shows_the_pipelines_images(page, pipe, served):
    demo = served[1]
    pick_class(page, "Sneaker")
    shown = generate(page, per_class=2, seed=3)
    with demo.batcher.pipeline():
        expected = pipe(["Sneaker"], per_class=2, seed=3, output_type="pt")
        previews = [grid_image(progress_pixels(pipe, "ctf", expected.coarse.flatten(1)[:, :step]))
                    for step in range(8, 65, 8)]
    assert len(shown) >= 2, "no preview was shown before the final images"
    assert np.array_equal(pixels_at(page, shown[-1]), np.asarray(grid_image(expected.images)))
    for url in shown[:-1]:  # every earlier picture is a stage-1 preview, rows of coarse labels so far
        assert any(np.array_equal(pixels_at(page, url), np.asarray(p)) for p in previews)
    assert re.search(r"CTF\s+2\s+[\d.]+ s\s+[\d.]+ s\s+[\d.]+", page.inner_text("#stats"))


@in_browser
def test_page_rerolls_details_keeping_the_coarse_layout(page, pipe, served, tmp_path):
    demo = served[1]
    pick_class(page, "Bag")
    generate(page, per_class=3, seed=1)
    page.fill("#reroll-index input", "2")
    page.fill("#variations input", "3")
    page.click("#reroll")
    link = page.wait_for_selector("#reroll-tokens a[download]")
    with np.load(io.BytesIO(page.request.get(link.get_attribute("href")).body())) as npz:
        tokens, images = torch.from_numpy(npz["tokens"]), torch.from_numpy(npz["images"]).permute(0, 3, 1, 2)
    with demo.batcher.pipeline():
        original = pipe(["Bag"], per_class=3, seed=1, output_type="pt")
        preview = pipe.decode_preview(original.coarse[1:2])
    assert torch.equal(pipe.coarse_map.coarse_of_fine[tokens], original.coarse[1:2].expand(3, -1, -1))
    grid = page.locator("#reroll-images img").get_attribute("src")
    assert np.array_equal(pixels_at(page, grid), np.asarray(reroll_grid(original.images[1:2], preview, images)))

    upload = tmp_path / "bag.png"  # an uploaded 28x28 grey image, tokenized by the pipeline's tokenizer
    Image.fromarray(original.images[0, 0].numpy(), mode="L").crop((2, 2, 30, 30)).save(upload)
    page.set_input_files("#upload input[type=file]", str(upload))
    page.wait_for_selector("#upload .file-preview")
    page.click("#reroll-upload")
    page.wait_for_function("href => document.querySelector('#reroll-tokens a[download]').href !== href",
                           arg=link.get_attribute("href"))
    href = page.locator("#reroll-tokens a[download]").get_attribute("href")
    with np.load(io.BytesIO(page.request.get(href).body())) as npz:
        with demo.batcher.pipeline():
            coarse = coarse_of_images(pipe, read_image(upload, 32)[None])
        assert torch.equal(pipe.coarse_map.coarse_of_fine[torch.from_numpy(npz["tokens"])], coarse.expand(3, -1, -1))


@in_browser
def test_page_shows_a_message_for_bad_input_and_keeps_working(page, tmp_path):
    page.fill("#per-class input", "0")
    page.click("#generate")
    assert "must be at least 1" in message(page)
    page.fill("#per-class input", "100")
    page.click("#generate")
    assert "at most 8" in message(page)
    notes = tmp_path / "notes.png"
    notes.write_text("a text file, not an image")
    page.set_input_files("#upload input[type=file]", str(notes))
    page.wait_for_selector("#upload .file-preview")
    page.click("#reroll-upload")
    assert "notes.png is not an image" in message(page)
    assert len(generate(page, per_class=1, seed=0)) >= 2  # the page still works
