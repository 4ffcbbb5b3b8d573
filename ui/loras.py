"""A task tab's LoRA panel: pick from the LoRA folder's files that fit the model, a strength per row (and per expert
on Wan 2.2 A14B), a preset button for a LoRA that carries run settings, and the scheduler shift.

    render(task, model) -> the panel's components by their TaskTab names (loras, shift, lora_pick, lora_preset)
    listen(app, tab)    -> the list follows the model; picking fills the strengths table; the preset fills the tab
"""
from typing import TYPE_CHECKING, Any

from ui.context import HIDDEN

if TYPE_CHECKING:
    from ui.context import FitVideoApp
    from ui.task_tab import TaskTab

LORA_HEADERS = ["LoRA", "strength", "low-noise strength"]


def render(task: str, model: str) -> dict[str, Any]:
    """LoRAs: pick from those that fit the model, a strength per row (and per expert on Wan 2.2 A14B), and a
    preset button when a picked LoRA carries run settings; the scheduler shift next to them."""
    import gradio as gr

    from engine.lora import loras_dir

    with gr.Accordion("LoRAs", open=True):
        lora_pick = gr.Dropdown(
            lora_choices(model), value=[], multiselect=True, label="LoRAs", elem_id=f"{task}-lora-pick",
            info=f"the .safetensors files in {loras_dir()} that fit this model",
        )
        loras = gr.Dataframe(
            value=[], headers=LORA_HEADERS, datatype=["str", "number", "number"], column_count=(3, "fixed"),
            type="array", interactive=True, label="Strengths (low-noise: Wan 2.2 A14B's second expert; empty = same)",
            elem_id=f"{task}-loras",
        )
        with gr.Row():
            shift = gr.Number(0, label="Shift", info="scheduler flow shift (Wan); 0 = the model's",
                              elem_id=f"{task}-shift")
            lora_preset = gr.Button("Use LoRA preset", visible=False, elem_id=f"{task}-lora-preset", size="sm")
    return dict(loras=loras, shift=shift, lora_pick=lora_pick, lora_preset=lora_preset)


def listen(app: "FitVideoApp", tab: "TaskTab") -> None:
    """The list follows the model (only those that fit); picking fills the strengths table."""
    import gradio as gr

    tab.model.change(lambda m, picked: gr.Dropdown(choices=lora_choices(m), value=[
        p for p in picked or [] if p in lora_choices(m)]), [tab.model, tab.lora_pick], tab.lora_pick, **HIDDEN)
    app.demo.load(lambda m: gr.Dropdown(choices=lora_choices(m)), tab.model, tab.lora_pick, **HIDDEN)  # new files
    tab.lora_pick.change(lambda picked, table: lora_rows(picked, table), [tab.lora_pick, tab.loras],
                         [tab.loras, tab.lora_preset], **HIDDEN)
    tab.lora_preset.click(use_lora_preset, [tab.lora_pick, tab.steps, tab.guidance, tab.shift],
                          [tab.steps, tab.guidance, tab.shift], **HIDDEN)


def lora_choices(model: str) -> list[str]:
    """The LoRA folder's files that fit `model` (by their shapes, not their names)."""
    from configs.schema import RequestError
    from engine.lora import list_loras

    try:
        return [f.name for f in list_loras(model)]
    except (RequestError, OSError, ValueError):  # an unknown model: the plan names it
        return []


def lora_rows(picked: list[str] | None, table: Any) -> tuple[list[list], Any]:
    """The table for the picked LoRAs (strengths already set are kept, a new one starts at 1), and the preset
    button for the first picked LoRA that has run settings."""
    import gradio as gr

    from configs.schema import RequestError
    from engine.lora import lora_file
    from ui.fields import loras_from_field

    old = {c.name: c for c in loras_from_field(table)}
    rows, preset = [], None
    for name in picked or []:
        c = old.get(name)
        rows.append([name, c.strength if c else 1.0, c.strength_2 if c else None])
        try:
            found = None if preset else lora_file(name).preset  # each file read once, only until one has a preset
            preset = preset or (found and (name, found))
        except RequestError:
            pass
    label = f"Use preset: {preset[1].text(preset[0])}" if preset else "Use LoRA preset"
    return rows, gr.Button(label, visible=bool(preset))


def use_lora_preset(picked: list[str] | None, steps, guidance, shift) -> tuple:
    """The first picked LoRA's run settings into steps, guidance and shift (what it leaves out stays)."""
    from configs.schema import RequestError
    from engine.lora import lora_file

    for name in picked or []:
        try:
            p = lora_file(name).preset
        except RequestError:
            continue
        if p:
            return (p.steps or steps, guidance if p.guidance is None else p.guidance,
                    shift if p.shift is None else p.shift)
    return steps, guidance, shift
