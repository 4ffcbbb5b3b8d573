"""What people read: the model catalog, plan / result / cache text, chart data, the CLI's progress display.

Pure presentation over the engine's data: no model loads, no gradio.
"""
