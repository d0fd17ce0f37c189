"""DIR/report.md: report.json's figures for a person to read, with the report's PNGs beside them."""

from __future__ import annotations

MAX_LISTED = 20  # unreadable images named in the report (all of them are in report.json)


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict) -> str:
    data, config, tokenizer = report["data"], report["config"], report["tokenizer"]
    lines = ["# ctfgen fit report", "", f"`{report['command']}` (preset {report['preset']}); every choice is in "
             "fit.json and report.json.", "", "## Data", "",
             f"{data['n_train']} training images and {data['n_val']} held out for evaluation ({data['held_out']}), "
             f"{len(data['classes'])} classes: {', '.join(data['classes'])}."]
    if data["skipped"]:
        lines += ["", f"{len(data['skipped'])} unreadable image(s) skipped:", ""]
        lines += [f"- `{entry['path']}`: {entry['reason']}" for entry in data["skipped"][:MAX_LISTED]]
        if len(data["skipped"]) > MAX_LISTED:
            lines.append(f"- ... and {len(data['skipped']) - MAX_LISTED} more (report.json lists them all)")
    lines += ["", "## Steps", "", "| step | time (s) |", "| --- | --- |"]
    lines += [f"| {name} | {_number(seconds, 1)}{' (its last part: resumed)' if name in report['resumed'] else ''} |"
              for name, seconds in report["seconds"].items()]
    lines += ["", "## Tokenizer", "",
              f"PSNR **{tokenizer['psnr']:.2f} dB** on the {tokenizer['n_images']} held-out images (std "
              f"{tokenizer['psnr_std']:.2f}); codebook usage **{tokenizer['codebook_usage']:.1%}** "
              f"({tokenizer['codes_used']} of {tokenizer['codebook_size']} codewords).",
              "", "## Training", "",
              f"{config['steps']} steps of batch {config['batch_size']} each; held-out cross-entropy in nats per token "
              "(stage 2: given the true coarse labels).", "",
              "| model | preset | held-out loss | fell over the last quarter | held-out accuracy |",
              "| --- | --- | --- | --- | --- |"]
    for stage, curve in report["training"].items():
        last = (curve["eval_loss"][-1], curve["eval_acc"][-1]) if curve["eval_loss"] else (None, None)
        lines.append(f"| {stage} | {config[stage + '_model']} | {_number(last[0])} | "
                     f"{_number(curve['fell_last_quarter'])} | {_number(last[1])} |")
    lines.append("")
    lines += [f"![{name}]({name})" for name in report["figures"] if "/loss_" in name]
    lines += ["", "## Samples", "", f"{config['grid_per_class']} samples of each class (a row per class), seed "
              f"{config['seed']}:", ""]
    lines += [f"![{name}]({name})" for name in report["figures"] if "/samples_" in name]
    lines += ["", "## FID against the held-out images", ""]
    scored = {mode: scores for mode, scores in report["fid"].items() if scores}
    if scored:
        lines += ["| model | features | samples | held-out images | FID | IS | precision | recall |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {mode} | {s['features']} | {s['n_samples']} | {s['n_ref']} | {_number(s['fid'], 2)} | "
                  f"{_number(s['inception_score'], 2)} | {_number(s['precision'])} | {_number(s['recall'])} |"
                  for mode, s in scored.items()]
    else:
        lines.append("None: see the notes.")
    if report["notes"]:
        lines += ["", "## Notes", "", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"
