"""The page's charts as Gradio plots: a run's memory over time, the last minute of memory, the plan per stage.
The data behind them (and how each is drawn) is reports.charts'; here they become components and updates."""
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gradio as gr


def render_run_plot(elem_id: str) -> "gr.LinePlot":
    """A run's memory over time (its sidecar's memory_timeline), stage by stage."""
    import gradio as gr

    from reports.charts import TIMELINE_PLOT

    # Created empty (None), not with an empty DataFrame: Gradio 6 then draws no line when data arrives.
    return gr.LinePlot(None, **TIMELINE_PLOT, label="Memory during the run", elem_id=elem_id, height=220)


def run_plot_update(sidecar_data: dict | None) -> "gr.LinePlot":
    import gradio as gr

    from reports.charts import marks_caption, timeline_chart

    timeline = (sidecar_data or {}).get("memory_timeline")
    return gr.LinePlot(timeline_chart(timeline), caption=marks_caption(timeline) or None)


def render_live_plot() -> "gr.LinePlot":
    """The last minute of memory (reports.charts.LIVE, sampled by the page timer)."""
    import gradio as gr

    from reports.charts import LIVE_PLOT

    return gr.LinePlot(None, **LIVE_PLOT, label="Last minute", elem_id="live-chart", height=200)


def render_plan_plot() -> "gr.BarPlot":
    """The plan per stage: predicted GPU / RAM peaks against the budgets."""
    import gradio as gr

    from reports.charts import PLAN_PLOT

    return gr.BarPlot(None, **PLAN_PLOT, label="Predicted peaks per stage against the budgets", elem_id="plan-chart",
                      height=260)


def plan_plot_update(plan) -> "gr.BarPlot":
    """The plan chart for a plan (None: settings that cannot run, an empty chart)."""
    import gradio as gr

    from reports.charts import plan_chart

    df = plan_chart(plan)
    return gr.BarPlot(df, sort=list(df["bar"]))
