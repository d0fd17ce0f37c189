"""`ctfgen serve`: the web demo."""

from __future__ import annotations

from ctfgen.cli.common import add_pipeline_flag, number_flag
from ctfgen.serve.limits import Limits
from ctfgen.validation import PORT, POSITIVE, WHOLE


def register(commands) -> None:
    serve = commands.add_parser("serve", help="the web demo: a Gradio page (offline, loopback by default) that "
                                              "streams the stage-1 preview and re-rolls details; needs ctfgen[web]")
    add_pipeline_flag(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this "
                       "machine only)")
    number_flag(serve, "--port", PORT, default=7860, help="port to listen on (default %(default)s)")
    number_flag(serve, "--max-images", WHOLE, default=Limits.max_images,
                       help="images one request may ask for (default %(default)s)")
    number_flag(serve, "--max-queue", WHOLE, default=Limits.max_queue,
                       help="requests that may wait at once; more are told the server is busy (default %(default)s)")
    number_flag(serve, "--max-batch", WHOLE, default=Limits.max_batch,
                       help="images in one sampler call, over all the requests that share it (default %(default)s)")
    number_flag(serve, "--threads", POSITIVE, help="torch threads of the sampler (default: one less than torch's "
                       "choice, at least 1: a core is left to the previews and the web server)")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    import torch

    from ctfgen.serve.app import serve

    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
    serve(args.pipeline, host=args.host, port=args.port,
          limits=Limits(max_images=args.max_images, max_queue=args.max_queue, max_batch=args.max_batch))
