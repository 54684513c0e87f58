"""`imagic ui`: a web page for editing, re-rendering and reopening sessions (Gradio).

`studio.py` does the work without the page (edits, re-renders, the sessions folder, jobs);
`page.py` is the page. Import `imagic.ui.page` only where Gradio is installed."""

from .studio import Studio, default_sessions_dir

__all__ = ["Studio", "default_sessions_dir"]
