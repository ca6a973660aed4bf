"""``modelloop export``: a run (or model) as a deployable model folder."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--merge", is_flag=True, help="Fold a LoRA adapter into the base weights (implied by --quant).")
@click.option("--quant", default="none", show_default=True, help="none, or a registered exporter: bnb-nf4, ...")
@click.option("--for", "engine", help="Check first that this engine (hf, vllm, sglang, lmdeploy) can load the result.")
@click.option(
    "--quant-python",
    type=click.Path(dir_okay=False, exists=True),
    help="Python of the environment with llmcompressor (fp8, gptq-int4, awq-int4).",
)
@click.option("--calibration", multiple=True, help="Calibration data for gptq/awq (default: the run's training data).")
@click.option(
    "--export-option",
    "export_options",
    multiple=True,
    help="An option of the exporter: KEY=VALUE, e.g. pre_tokenizer=qwen2 for gguf-* (repeatable).",
)
def export_command(
    source: str,
    out: Path,
    merge: bool,
    quant: str,
    engine: str | None,
    quant_python: str | None,
    calibration: tuple[str, ...],
    export_options: tuple[str, ...],
) -> None:
    """Export SOURCE (a run folder or model) to --out, loadable by transformers' from_pretrained."""
    from modelloop.artifacts import is_run
    from modelloop.config import parse_assignments
    from modelloop.errors import require_libraries
    from modelloop.export import check_export_options
    from modelloop.lifecycle import stage_lifecycle
    from modelloop.models.loading import resolve_model_source
    from modelloop.registry import ENGINES, EXPORTERS, get_registry

    exporter = get_registry(EXPORTERS).get(quant)
    engines = get_registry(ENGINES)
    if engine in engines and engines.get(engine).check_export is not None:  # the engine's own word first
        from modelloop.export import written_config

        config, chat_template = written_config(source, exporter.name)
        if refused := engines.get(engine).check_export(config, exporter.name, chat_template):
            raise click.UsageError(f"the {engine} engine cannot load this {exporter.name} export: {refused}")
    if engine is not None and engine not in exporter.engines:
        raise click.UsageError(
            f"the {engine} engine cannot load a {exporter.name} export; it loads: "
            + ", ".join(e.name for e in get_registry(EXPORTERS) if engine in e.engines)
        )
    require_libraries(exporter, "export")
    if is_run(source) and resolve_model_source(source).adapter and not merge and exporter.name == "merged":
        raise click.UsageError(
            f"{source} holds a LoRA adapter: pass --merge to fold it into the base (or serve it with --adapters)"
        )
    options = parse_assignments(export_options)
    if quant_python:
        options["python"] = quant_python
    if calibration:
        options["calibration"] = list(calibration)
    check_export_options(exporter, options)
    config = {"source": source, "out": str(out), "quant": exporter.name, "merge": merge, "for": engine, **options}
    with stage_lifecycle("export", config, out) as context:
        written = exporter.export(source, out, **options)
        context.result.update(out=str(written), format=exporter.name)
    click.echo(f"{written}: {exporter.name} export of {source}")
