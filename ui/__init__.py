"""The surfaces a person uses: the Gradio page (a module per tab or panel, each `render()` + `listen()`), its
API endpoints, the CLI, and the one request <-> fields conversion they share (ui/fields.py).

Only app.py and the page modules here import gradio, and only inside functions.
"""
