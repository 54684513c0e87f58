"""`imagic ui`: serve the web page (imagic.ui) on one loaded model."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from .options import load_model, model_options

UI_EXAMPLE = """example:
  imagic ui                       # the embedded model, on http://127.0.0.1:7860
  imagic ui --model stable-diffusion-v1-5/stable-diffusion-v1-5 --preset fast
  (on a GPU box: ssh -L 7860:127.0.0.1:7860 gpu-box, then open http://127.0.0.1:7860 here)"""


def register(sub) -> None:
    ui = sub.add_parser(
        "ui", help="a web page to edit images, re-render η and reopen sessions",
        description="Serve a web page for edits on one model, loaded once and kept warm. "
                    "Edits are saved as sessions in --sessions and can be reopened there.",
        epilog=UI_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_options(ui)
    ui.add_argument("--preset", help="the page's default recipe (default: the model's own)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: 127.0.0.1, this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    ui.add_argument("--sessions", help="folder of saved sessions (default: "
                                       "~/.cache/imagic/ui-sessions)")
    ui.add_argument("--max-upload-mb", type=int, default=20,
                    help="largest image upload accepted, in MB (default: 20)")
    ui.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    from ..errors import InputError
    from ..presets import get_preset
    from ..ui import Studio, default_sessions_dir

    # 1. Check the options before loading anything heavy
    if args.preset:
        get_preset(args.preset)
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_upload_mb < 1:
        raise InputError(f"--max-upload-mb must be at least 1, got {args.max_upload_mb}")
    try:
        from ..ui.page import serve
    except ImportError as err:
        raise InputError(f"imagic ui needs Gradio ({err}): pip install gradio") from None
    if not is_loopback(args.host):
        print(f"imagic: warning: --host {args.host} makes the page reachable from other "
              "machines; it has no login, and anyone who reaches it can run edits and read "
              "the saved sessions", file=sys.stderr)
    # 2. Load the model once; every edit of this process uses it
    backend = load_model(args, args.model)
    studio = Studio(backend, args.sessions or default_sessions_dir(), args.preset)
    print(f"imagic ui: {studio.model} on {backend.device}; sessions in {studio.sessions_dir}; "
          f"open http://{args.host}:{args.port}", file=sys.stderr)
    serve(studio, args.host, args.port, args.max_upload_mb)
    return 0


def is_loopback(host: str) -> bool:
    """127.0.0.1, ::1 or localhost: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
