"""gradio, imported offline: no analytics, no version check, no Hugging Face hub calls.

gradio and huggingface_hub read these variables when they are imported, so they are set first (a value the user
set is kept). The page itself loads nothing from a CDN: gradio serves its scripts and fonts from the package.
"""

from __future__ import annotations

import os

from ctfgen.errors import CtfgenError

OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",  # also turns off gradio's version check
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "GRADIO_SSR_MODE": "False",  # server-side rendering would start a node server
    "GRADIO_MCP_SERVER": "False",
}


def import_gradio():
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    try:
        import gradio
    except ImportError:
        raise CtfgenError("the web demo needs gradio: pip install 'ctfgen[web]' (or scripts/serve.sh)") from None
    return gradio
