"""`studio`: the command line. serve | train | runs | generate | export | stop | cancel | resume.

`studio train CONFIG` replays exactly what the UI does: it queues a run from a config.yaml, then follows
it with a progress bar. The run itself trains in its own process, so Ctrl-C here means Stop (a
checkpoint, then exit), and `--detach` leaves it training in the background.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.events import TrainingFailure

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def quiet_libraries() -> None:
    """Keep the terminal for our own output: no download bars or library notices (set before they import)."""
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("DIFFUSERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = argparse.ArgumentParser(prog="studio", description="LoRA fine-tuning studio")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the web studio")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    serve.add_argument("--auth-file", help="file with 'user:password' lines (needed to bind a non-local address)")

    train = sub.add_parser("train", help="train from a config.yaml")
    train.add_argument("config", type=Path)
    train.add_argument("--resume", action="store_true", help="continue the run whose config.yaml this is")
    train.add_argument("--detach", action="store_true", help="queue the run and return at once")

    join = sub.add_parser("join", help="train a multi-node run's share on this machine (another node)")
    join.add_argument("run_dir", type=Path, help="the run's folder, on storage every node shares")
    join.add_argument("--node-rank", type=int, required=True, help="this machine's node number, 1 to nodes-1")

    runs = sub.add_parser("runs", help="list runs")
    runs.add_argument("--json", action="store_true")
    runs.add_argument("--rebuild", action="store_true", help="rebuild the index from the run folders first")

    generate = sub.add_parser("generate", help="try a trained run (text, image or transcript)")
    generate.add_argument("run")
    generate.add_argument("--prompt", help="prompt (language and image runs)")
    generate.add_argument("--audio", type=Path, help="audio file (speech runs)")
    generate.add_argument("--base", action="store_true", help="use the base model, without the adapter")
    generate.add_argument("--checkpoint", help="a checkpoint name such as step-40 (default: the final adapter)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", type=Path, help="where to write the image (image runs)")

    export = sub.add_parser("export", help="export a run's adapter or merged model")
    export.add_argument("run")
    kind = export.add_mutually_exclusive_group(required=True)
    kind.add_argument("--adapter", type=Path, metavar="DIR", help="write the LoRA adapter here")
    kind.add_argument("--merged", type=Path, metavar="DIR", help="write the base model with the adapter merged in")
    kind.add_argument("--kohya", type=Path, metavar="DIR",
                      help="image runs: write the LoRA as one kohya/A1111 .safetensors file (ComfyUI, Forge) here")
    export.add_argument("--checkpoint", help="export a checkpoint (step-N) instead of the final adapter")

    for name, text in (("stop", "stop a run with a checkpoint"), ("cancel", "end a run now, no checkpoint"),
                       ("resume", "continue a stopped or interrupted run")):
        sub.add_parser(name, help=text).add_argument("run")

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"error: invalid settings: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, TrainingFailure) as err:  # the last: a checkpoint that is not there
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `studio runs | head`: the reader has read enough; no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# ---- commands --------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from studio.app import serve
    return serve(host=args.host, port=args.port, share=args.share, auth_file=args.auth_file)


def cmd_train(args) -> int:
    from pipelines import load_config
    from studio import jobs
    from studio.runs import Registry, valid_run_id

    config_path = args.config.resolve()
    if args.resume:
        run_dir = config_path.parent
        if not (valid_run_id(run_dir.name) and run_dir.parent.name == "runs"):
            print("error: --resume takes the config.yaml inside a run folder (<workspace>/runs/<id>/config.yaml)",
                  file=sys.stderr)
            return EXIT_USAGE
        registry = Registry(run_dir.parent.parent)
        if registry.get(run_dir.name) is None:
            registry.rebuild()
        run = jobs.resume(run_dir.name, registry)
        print(f"Resuming run {run.id}")
    else:
        registry = Registry()
        config = load_config(config_path)
        run = jobs.submit(config, registry)
        print(f"Run {run.id} ({run.name})")
        # What it trains on, and what it leaves out (said in the tabs, and only there): the check submit made
        report = jobs.check_data(config)
        print(f"Data: {report.summary()}{jobs.listed(report.problems)}")
    if run.status == "queued":
        ahead = registry.queue_position(run.id) - 1
        print(f"Queued (position {ahead + 1}): waiting for {len(registry.list(status='running'))} running run(s)"
              + (f" and {ahead} queued before it" if ahead else "") + ".")
    if args.detach:
        print(f"Training in the background. Follow with: studio runs; log: {run.dir / 'log.txt'}")
        return EXIT_OK
    return follow(run.id, registry)


def cmd_join(args) -> int:
    """Node K of a multi-node run: start this machine's ranks against the shared run folder. Node 0 (the
    studio that owns the run) keeps the run's status; this only trains and waits."""
    from pipelines import load_config
    from pipelines.training import TrainingFailure, latest_checkpoint
    from studio.worker import launch_ranks

    run_dir = args.run_dir.resolve()
    config = load_config(run_dir / "config.yaml")
    if config.nodes < 2 or not 1 <= args.node_rank < config.nodes:
        raise ValueError(f"--node-rank must be between 1 and {config.nodes - 1}: this run has {config.nodes} node(s).")
    try:
        # Node 0 resumes from the latest checkpoint when there is one; the ranks here must do the same.
        state = launch_ranks(config, run_dir, resume=latest_checkpoint(run_dir) is not None, node_rank=args.node_rank)
    except TrainingFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Node {args.node_rank}: {state}.")
    return EXIT_OK


def follow(run_id: str, registry) -> int:
    """Show a progress bar until the run ends. Ctrl-C stops the run with a checkpoint; twice cancels it."""
    from tqdm import tqdm

    from studio import jobs
    from studio.progress import Progress
    from studio.runs import resume_may_help

    run = registry.get(run_id)
    progress = Progress(run.dir)
    # A bar for a terminal; plain lines (every 10% or so) when the output goes to a file or a pipe.
    bar = tqdm(total=0, unit="step", dynamic_ncols=True, file=sys.stdout, disable=not sys.stdout.isatty())
    printed_step = 0
    interrupts = 0
    status = run.status
    last_check = 0.0
    while True:
        try:
            for event in progress.update():
                if event["type"] == "step":
                    bar.total = event["total_steps"]
                    bar.n = event["step"]
                    bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)
                    bar.refresh()
                    if bar.disable and (event["step"] - printed_step >= max(1, event["total_steps"] // 10)
                                        or event["step"] == event["total_steps"]):
                        printed_step = event["step"]
                        print(f"step {printed_step}/{event['total_steps']} loss {event['loss']:.4f}", flush=True)
                elif event["type"] == "loading":
                    bar.write(event["message"])
                elif event["type"] == "eval":
                    metrics = {k: v for k, v in event.items() if k not in ("type", "time", "step")}
                    bar.write(f"step {event['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                elif event["type"] == "sample":
                    shown = event.get("output") or event.get("transcript") or event.get("image", "")
                    bar.write(f"step {event['step']} sample: {event.get('prompt', event.get('audio', ''))!r} -> {shown!r}")
            status = progress.status or status
            if status in ("completed", "stopped", "failed", "cancelled", "interrupted"):
                break
            if time.monotonic() - last_check > 5:  # notice a worker that died without saying so, and with
                jobs.dispatch(registry)                 # no server running start the next run in its place
                last_check = time.monotonic()
            time.sleep(0.3)
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1:
                jobs.request_stop(run_id, registry)
                bar.write("Stopping: saving a checkpoint at the next step (Ctrl-C again to cancel).")
            else:
                jobs.cancel(run_id, registry)
    bar.close()
    run = registry.get(run_id)
    if status == "completed":
        print(f"Completed. Adapter: {run.dir / 'adapter'}")
        example = {"llm": '--prompt "..."', "image": '--prompt "..." --out image.png',
                   "speech": "--audio clip.wav"}[run.modality]
        print(f"Try it:  studio generate {run_id} {example}")
    else:
        message = f"Run {run_id} {status}."
        if progress.error:
            message += f" {progress.error} {progress.advice}".rstrip()
        print(message)
        if resume_may_help(status, progress.error or run.error):  # not where a resume would fail again
            print(f"Resume:  studio resume {run_id}")
    return EXIT_OK if status == "completed" else EXIT_FAILED


def cmd_runs(args) -> int:
    from studio import jobs
    from studio.progress import read_progress
    from studio.runs import Registry

    registry = Registry()
    if args.rebuild:
        print(f"Indexed {registry.rebuild()} runs.", file=sys.stderr)
    jobs.dispatch(registry)  # a run found lost frees its slot: with no server running, the next starts here
    rows = []
    for run in registry.list():
        progress = read_progress(run.dir)
        rows.append(run.to_dict() | {"step": progress.step, "total_steps": progress.total_steps,
                                     "loss": progress.last_loss, "best_eval_loss": progress.best()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("No runs yet. Start one with: studio train assets/llm/config.yaml")
        return EXIT_OK
    print(f"{'ID':32} {'NAME':22} {'MODALITY':8} {'STATUS':11} {'STEP':>11} {'LOSS':>8}")
    for r in rows:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        step = f"{r['step']}/{r['total_steps']}" if r["total_steps"] else "-"
        print(f"{r['id']:32} {r['name'][:22]:22} {r['modality']:8} {r['status']:11} {step:>11} {loss:>8}")
    return EXIT_OK


def _find_run(run_id: str):
    from studio.runs import Registry
    run = Registry().get(run_id)
    if run is None:
        raise ValueError(f"There is no run {run_id!r}. See `studio runs`.")
    return run


def cmd_generate(args) -> int:
    from studio import tryit
    run = _find_run(args.run)
    config = run.config()
    if run.modality == "llm":
        if not args.prompt:
            raise ValueError("--prompt is required for a language-model run")
        print(tryit.generate_text(config, None if args.base else run.dir, args.prompt, checkpoint=args.checkpoint,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed))
    elif run.modality == "image":
        if not args.prompt:
            raise ValueError("--prompt is required for an image run")
        out = Path(args.out or f"{run.id}-{'base' if args.base else 'tuned'}.png")
        if not out.parent.is_dir() or out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):  # before drawing
            raise ValueError(f"--out {out}: give a .png, .jpg or .webp file in a folder that exists")
        image = tryit.generate_image(config, None if args.base else run.dir, args.prompt, checkpoint=args.checkpoint,
                                     seed=args.seed)
        image.save(out)
        print(out)
    else:
        if not args.audio:
            raise ValueError("--audio is required for a speech run")
        if not Path(args.audio).is_file():
            raise ValueError(f"--audio {args.audio}: there is no such file")
        text, seconds = tryit.transcribe(config, None if args.base else run.dir, args.audio, checkpoint=args.checkpoint)
        print(text)
    return EXIT_OK


def cmd_export(args) -> int:
    from studio.exporting import export_run
    run = _find_run(args.run)
    kind, destination = next((kind, folder) for kind, folder in
                             (("adapter", args.adapter), ("merged", args.merged), ("kohya", args.kohya)) if folder)
    if kind == "kohya" and run.modality != "image":
        raise ValueError("--kohya is for image runs; use --adapter or --merged")
    target = Path(destination)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        # An adapter written into a merged model's folder turns it into an adapter folder for from_pretrained.
        raise ValueError(f"{destination} already exists and is not an empty folder: choose a new one.")
    path = export_run(run, kind, destination, checkpoint=args.checkpoint)
    print(path)
    return EXIT_OK


def _simple(action, needs_active: bool = False):
    def command(args) -> int:
        from studio import jobs
        from studio.runs import ACTIVE
        if needs_active and (status := _find_run(args.run).status) not in ACTIVE:
            # Said, not printed as if the command had done it: a script that stops a finished run learns so.
            raise ValueError(f"Run {args.run} has already ended ({status}); there is nothing to {args.command}.")
        result = action(jobs, args.run)
        print(result if isinstance(result, str) else f"{result.id}: {result.status}")
        return EXIT_OK
    return command


COMMANDS = {
    "serve": cmd_serve, "train": cmd_train, "join": cmd_join, "runs": cmd_runs, "generate": cmd_generate,
    "export": cmd_export,
    "stop": _simple(lambda jobs, run: jobs.request_stop(run), needs_active=True),
    "cancel": _simple(lambda jobs, run: jobs.cancel(run), needs_active=True),
    "resume": _simple(lambda jobs, run: jobs.resume(run)),
}

if __name__ == "__main__":
    sys.exit(main())
