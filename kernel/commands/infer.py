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
@click.option("--engine", default="hf", show_default=True, help="Inference engine; auto: the fastest installed here.")
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
    from modelloop.inference.choice import find_engine
    from modelloop.inference.types import SamplingParams

    chosen = find_engine(engine)
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
    "--data", type=click.Path(dir_okay=False, path_type=Path), help="Prompts with reference answers (your own tasks)."
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    default=("accuracy",),
    show_default=True,
    help="With --data: accuracy, exact, or reward:NAME (repeatable).",
)
@click.option(
    "--metric-option",
    "metric_options",
    multiple=True,
    help="A reward metric's option, REWARD.KEY=VALUE: reward-model.path=runs/<rm> (repeatable).",
)
@click.option(
    "--benchmark",
    "benchmarks",
    multiple=True,
    help="Standard tasks, named as --backend knows them: gsm8k,mmlu (comma-separated or repeated).",
)
@click.option("--backend", default="lm-eval", show_default=True, help="The evaluation back end that runs --benchmark.")
@click.option("--limit", type=click.IntRange(min=1), help="With --benchmark: the first N examples of each task.")
@click.option(
    "--tasks-dir",
    "task_dirs",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A folder of task definitions in the back end's own format (repeatable).",
)
@click.option("--backend-option", "backend_options", multiple=True, help="KEY=VALUE for the back end (repeatable).")
@click.option(
    "--engine",
    help="Answer through this engine (auto: the fastest installed here) [--data: hf; --benchmark: the model in this process].",
)
@click.option("--endpoint", help="With --benchmark: the /v1 URL of a server already serving the model.")
@click.option("--served-name", help="With --endpoint: the model name it serves the model under.")
@click.option("--api-key", envvar="MODELLOOP_API_KEY", help="With --endpoint: its key.")
@click.option(
    "--max-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --data: the longest answer (a benchmark's task sets its own).",
)
@click.option(
    "--output-dir", type=click.Path(file_okay=False, path_type=Path), help="The eval run folder (one model only)."
)
def eval_command(
    models,
    data,
    metrics,
    metric_options,
    benchmarks,
    backend,
    limit,
    task_dirs,
    backend_options,
    engine,
    endpoint,
    served_name,
    api_key,
    max_tokens,
    output_dir,
) -> None:
    """Score each of MODELS on --data or on standard --benchmark tasks; two or more are compared side by side."""
    if output_dir is not None and len(models) > 1:
        raise click.UsageError("--output-dir takes one model")
    if (data is None) == (not benchmarks):
        raise click.UsageError("give --data (your own prompts and answers) or --benchmark (standard tasks), not both")
    if benchmarks:
        if endpoint is not None and len(models) > 1:
            raise click.UsageError("--endpoint serves one model")
        from modelloop.config import parse_assignments
        from modelloop.stages.benchmark import AnswersFrom, benchmark, resolve_backend

        tasks = [task for text in benchmarks for task in text.split(",") if task.strip()]
        options = parse_assignments(backend_options)
        resolve_backend(backend, options)  # a bad name or option fails before any model loads
        results = {
            model: benchmark(
                model,
                tasks,
                backend=backend,
                answers=AnswersFrom(engine, endpoint, served_name, api_key),
                limit=limit,
                task_dirs=task_dirs,
                options=options,
                output_dir=output_dir,
            )
            for model in models
        }
    else:
        from modelloop.config import parse_assignments
        from modelloop.stages.evaluate import evaluate, resolve_metrics

        options = parse_assignments(metric_options)
        resolve_metrics(list(metrics), options)  # a bad name or option fails before any model loads
        results = {
            model: evaluate(
                model,
                data,
                metrics=list(metrics),
                engine=engine or "hf",
                output_dir=output_dir,
                max_tokens=max_tokens,
                metric_options=options,
            )
            for model in models
        }
    _print_scores(results)


def _print_scores(results: dict[str, dict]) -> None:
    """One row per model, one column per score, and the eval run folder."""
    names = list(dict.fromkeys(name for result in results.values() for name in result["summary"]))
    names = [name for name in names if name not in ("examples", "seconds")]
    width = max(len(model) for model in results)
    columns = {name: max(10, len(name)) for name in names}
    click.echo(f"{'model':{width}}  " + "  ".join(f"{name:>{columns[name]}}" for name in names) + "  run")
    for model, result in results.items():
        scores = "  ".join(f"{result['summary'].get(name, float('nan')):{columns[name]}.3f}" for name in names)
        click.echo(f"{model:{width}}  {scores}  {result['run_dir']}")
