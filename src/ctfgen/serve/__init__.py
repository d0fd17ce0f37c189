"""The web demo (`ctfgen serve`): a Gradio page over the pipeline, offline, for many users at once.

batcher.py   concurrent requests merged into one sampler call, each image with its own request's seed
actions.py   the page's actions as plain Python: generate (streamed), re-roll
limits.py    what one request and the server may take
views.py     grids of images, and the partial images of the autoregressive stage
offline.py   gradio imported with its telemetry and version check off
app.py       the Gradio page and `serve`
"""
