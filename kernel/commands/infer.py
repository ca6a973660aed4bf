"""``modelloop infer`` and ``modelloop eval``: offline generation over a data file, and scoring."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("infer")
@click.argument("model")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Prompts, in any data format.",
)
@click.option(
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL results; rows already there are skipped.",
)
@click.option("--engine", default="hf", show_default=True)
@click.option("--format", "format_name", help="Force the input's data format.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 2))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
def infer_command(model, input_path, output, engine, format_name, max_tokens, temperature, batch_size) -> None:
    """Generate an answer for every record of --input into --output (resumable)."""
    from rich.progress import Progress

    from modelloop.data.records import read_records
    from modelloop.data.tokenize import problems_error
    from modelloop.inference.batch import prompts_from, run_inference
    from modelloop.inference.types import SamplingParams
    from modelloop.registry import ENGINES, get_registry

    chosen = get_registry(ENGINES).get(engine)
    records = read_records([input_path], format=format_name)
    if records.problems:
        raise problems_error(records.problems, "Fix them, then run again (rows already written are kept).")
    prompts = prompts_from(records.examples)
    session = chosen.start(model, options={"max_batch_size": batch_size})
    try:
        with Progress() as progress:
            task = progress.add_task("infer", total=len(prompts))
            run_inference(
                session,
                prompts,
                output,
                SamplingParams(max_tokens=max_tokens, temperature=temperature),
                batch_size=batch_size,
                progress=lambda count: progress.advance(task, count),
            )
    finally:
        session.close()
    click.echo(f"{output}: {len(prompts)} rows")


@click.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--data", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Prompts with reference answers."
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    default=("accuracy",),
    show_default=True,
    help="accuracy, exact, or reward:NAME (repeatable).",
)
@click.option("--engine", default="hf", show_default=True)
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--output-dir", type=click.Path(file_okay=False, path_type=Path), help="The eval run folder (one model only)."
)
def eval_command(models, data, metrics, engine, max_tokens, output_dir) -> None:
    """Score each of MODELS on --data; two or more are compared side by side."""
    from modelloop.stages.evaluate import evaluate, resolve_metrics

    if output_dir is not None and len(models) > 1:
        raise click.UsageError("--output-dir takes one model")
    resolve_metrics(list(metrics))
    results = {
        model: evaluate(model, data, metrics=list(metrics), engine=engine, output_dir=output_dir, max_tokens=max_tokens)
        for model in models
    }
    width = max(len(model) for model in models)
    click.echo(f"{'model':{width}}  " + "  ".join(f"{metric:>10}" for metric in metrics) + "  run")
    for model, result in results.items():
        scores = "  ".join(f"{result['summary'][metric]:10.3f}" for metric in metrics)
        click.echo(f"{model:{width}}  {scores}  {result['run_dir']}")
