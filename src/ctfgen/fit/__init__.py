"""`ctfgen fit`: one command from a folder of images (or the bundled Fashion-MNIST) to a trained, evaluated pipeline.

    presets.py   every choice (sizes, steps, batches) from a preset and the number of images; --config overrides
    data.py      the images checked one by one, held out per class, laid out as an image folder under DIR/data
    state.py     DIR/fit.json: the command, the choices, and each finished step with the fingerprint of its inputs
    steps.py     the ordered steps (tokenizer, map, codes, stage 1, stage 2, baseline, pipeline, report)
    report.py    the evaluation: tokenizer PSNR, loss curves, sample grids, FID; report.json
    markdown.py  report.md, for a person to read
    runner.py    runs the steps in order: skips what is done, resumes a training, redoes what changed

Nothing is imported here, so that `ctfgen --help` stays free of torch: import `ctfgen.fit.runner.fit`.
"""
