"""FitVideo: `python app.py` launches the web UI; `python app.py generate ...` runs headless.

Thin by design: it builds the Gradio Blocks or hands the CLI flags to
pipeline_utils.cli. No model loads until Generate is pressed. This is the only
module that imports gradio.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

CLI_COMMANDS = ("generate", "decode")
logger = logging.getLogger("fitvideo")


def build_launch_parser() -> argparse.ArgumentParser:
    from pipeline_utils.cli import add_precision_flags

    p = argparse.ArgumentParser(prog="app.py", description="FitVideo web UI (or: app.py generate --help)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="serve on all interfaces (needs --auth)")
    p.add_argument("--share", action="store_true", help="create a public Gradio link (needs --auth)")
    p.add_argument("--auth", default=None, help="user:pass")
    p.add_argument("--insecure", action="store_true", help="allow --listen/--share without --auth")
    p.add_argument("--max-cache-size", type=int, default=None)
    p.add_argument("--outputs-dir", default="outputs")
    p.add_argument("--offline", action="store_true", help="never touch the network (HF_HUB_OFFLINE=1)")
    add_precision_flags(p)
    return p


def build_ui(runner, default_quant: str = "none"):
    import gradio as gr

    from configs.schema import GenerationRequest, models_for_task

    def generate(model, prompt, frames, height, width, steps, seed):
        request = GenerationRequest(
            model=model, task="t2v", prompt=prompt, frames=int(frames), height=int(height), width=int(width),
            steps=int(steps), seed=int(seed), quant=default_quant,
        )
        try:
            return str(runner.generate(request).video_path)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc

    with gr.Blocks(title="FitVideo") as demo:
        gr.Markdown("# FitVideo")
        with gr.Tab("T2V"):
            model = gr.Dropdown(models_for_task("t2v"), value="tiny-cogvideox", label="Model")
            prompt = gr.Textbox(label="Prompt", value="a cat walks on the beach")
            with gr.Row():
                frames = gr.Number(9, label="Frames", precision=0)
                height = gr.Number(32, label="Height", precision=0)
                width = gr.Number(32, label="Width", precision=0)
                steps = gr.Number(2, label="Steps", precision=0)
                seed = gr.Number(0, label="Seed", precision=0)
            button = gr.Button("Generate", variant="primary")
            video = gr.Video(label="Result")
            button.click(generate, [model, prompt, frames, height, width, steps, seed], video, api_name="t2v")
    return demo


def launch(argv: list[str]) -> int:
    args = build_launch_parser().parse_args(argv)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from pipeline_utils.cli import precision_from_args, setup_logging

    setup_logging()
    if (args.listen or args.share) and not args.auth and not args.insecure:
        print("error: --listen and --share expose the app to others; add --auth user:pass (or --insecure)", file=sys.stderr)
        return 2
    from pipeline_utils.cache import PipelineCache
    from pipeline_utils.runner import Runner

    runner = Runner(PipelineCache(args.max_cache_size), outputs_dir=args.outputs_dir)
    demo = build_ui(runner, precision_from_args(args))
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    demo.queue().launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1",
        server_port=args.port,
        share=args.share,
        auth=auth,
        allowed_paths=[os.path.abspath(args.outputs_dir)],
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CLI_COMMANDS:
        from pipeline_utils.cli import main as cli_main

        return cli_main(argv)
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
