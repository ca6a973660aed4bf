"""``modelloop ui``: the runs, their lineage and curves, launching stages and a chat
playground, as pages served by FastAPI (the stack ``modelloop serve`` already runs on).

Pages are rendered here from Jinja2 templates; a small script (``static/ui.js``, no build
step) draws the curves, refreshes a running run's page and sends the forms. Everything a
page shows comes from the run folders (``modelloop.lineage``), the stages' config schemas,
the command line's own checks and the engines of the registry, so the UI and the CLI never
disagree. With a key, every route wants it: ``Authorization: Bearer KEY``, or ``?key=KEY``
once in the browser (kept in a cookie).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' parameter types
# (``Request``, imported inside ``create_app`` to keep the command line fast) at definition.
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from modelloop.errors import ModelloopError
from modelloop.ui import runs as views
from modelloop.ui.launch import RECIPE, STAGES, Launcher, checks, form_fields, read_form
from modelloop.ui.playground import Playground

HERE = Path(__file__).parent
COOKIE = "modelloop_ui_key"


def create_app(api_key: str | None = None) -> Any:
    """The UI over the runs folder (``$MODELLOOP_HOME/runs``, else ``./runs``)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from modelloop.artifacts import runs_root
    from modelloop.lineage import diff, find_run, find_runs

    pages = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    launcher, playground = Launcher(), Playground()

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        launcher.close()  # runs still going are stopped (resumable), not left behind
        playground.close()

    app = FastAPI(title="modelloop ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    if api_key:

        @app.middleware("http")
        async def guard(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
            given = request.cookies.get(COOKIE) or request.query_params.get("key") or ""
            header = request.headers.get("authorization", "")
            if hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode()) or hmac.compare_digest(
                given.encode(), api_key.encode()
            ):
                response = await call_next(request)
                if request.query_params.get("key"):
                    response.set_cookie(COOKIE, api_key, httponly=True, samesite="strict")
                return response
            return PlainTextResponse("modelloop ui: open it with ?key=KEY (the --api-key it was started with)", 401)

    def page(name: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(pages.get_template(name).render(root=str(runs_root()), **context))

    def run_or_404(reference: str) -> Any:
        try:
            return find_run(reference)
        except ModelloopError as error:
            raise HTTPException(404, str(error)) from None

    # ------------------------------------------------------------------ runs

    @app.get("/", response_class=HTMLResponse)
    def runs_page(stage: str = "", status: str = "", q: str = "") -> HTMLResponse:
        rows = [views.row(run) for run in reversed(find_runs())]
        shown = [line for line in rows if views.matches(line, stage=stage, state=status, text=q)]
        return page(
            "runs.html",
            rows=shown,
            total=len(rows),
            stages=sorted({line["stage"] for line in rows}),
            statuses=sorted({line["status"] for line in rows}),
            chosen={"stage": stage, "status": status, "q": q},
        )

    @app.get("/run", response_class=HTMLResponse)
    def run_page(id: str) -> HTMLResponse:
        launched = launcher.launched.get(id)
        if launched is not None and not (launched.folder / "manifest.json").is_file():
            return page("starting.html", id=id, stage=launched.stage)
        run = run_or_404(id)
        return page(
            "run.html",
            run=run,
            row=views.row(run),
            config=views.config_rows(run),
            stats=(run.manifest.get("data") or {}).get("stats") or {},
            metrics=run.manifest.get("metrics") or {},
            files=views.files(run),
            graph=views.lineage(find_runs(), focus=run.id),
            plots=views.PLOTS,
            steps=views.steps(run),
            stoppable=id in launcher.launched and launcher.launched[id].running,
            resumable=run.stage in STAGES and views.status(run) in ("stopped", "failed"),
            others=[other.id for other in find_runs() if other.id != run.id],
        )

    @app.get("/api/metrics")
    def metrics(run: str, after: int = 0) -> JSONResponse:
        launched = launcher.launched.get(run)
        log = launched.log.read_text(errors="replace")[-6000:] if launched and launched.log.is_file() else ""
        if launched is not None and not (launched.folder / "manifest.json").is_file():
            state = "starting" if launched.running else "failed"
            return JSONResponse({"rows": [], "status": state, "log": log})
        found = run_or_404(run)
        return JSONResponse({"rows": views.metrics(found, after), "status": views.status(found), "log": log})

    @app.get("/file")
    def file(run: str, name: str) -> FileResponse:
        found = run_or_404(run)
        path = (found.path / name).resolve()
        if path.parent != found.path.resolve() or not path.is_file():  # the run folder's own files only
            raise HTTPException(404, f"{run} has no file {name!r}")
        return FileResponse(path)

    @app.post("/api/stop")
    def stop(run: str) -> JSONResponse:
        if not launcher.stop(run):
            return JSONResponse({"error": f"{run} is not running from this page"}, 409)
        return JSONResponse({"stopped": run})

    @app.post("/api/resume")
    def resume(run: str) -> JSONResponse:
        found = run_or_404(run)
        if found.stage not in STAGES or views.status(found) not in ("stopped", "failed"):
            return JSONResponse(
                {"error": f"{run} is a {found.stage} run, {views.status(found)}: nothing to resume"}, 409
            )
        if run in launcher.launched and launcher.launched[run].running:
            return JSONResponse({"error": f"{run} is running"}, 409)
        return JSONResponse({"run": launcher.resume(found.stage, found.path).id})

    @app.get("/lineage", response_class=HTMLResponse)
    def lineage_page() -> HTMLResponse:
        return page("lineage.html", graph=views.lineage(find_runs()))

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(a: str, b: str) -> HTMLResponse:
        first, second = run_or_404(a), run_or_404(b)
        return page("compare.html", first=first, second=second, rows=diff(first, second), plots=views.PLOTS)

    # ------------------------------------------------------------------ launch

    @app.get("/launch", response_class=HTMLResponse)
    def launch_page(stage: str = "sft") -> HTMLResponse:
        if stage not in (*STAGES, RECIPE):
            raise HTTPException(404, f"no form for {stage!r}; stages: {', '.join(STAGES)}, {RECIPE}")
        return page("launch.html", stage=stage, stages=[*STAGES, RECIPE], fields=form_fields(stage))

    @app.post("/api/check")
    async def check(stage: str, request: Request) -> JSONResponse:
        values, errors = await run_in_threadpool(read_form, stage, await request.json())
        if errors:
            return JSONResponse({"errors": errors}, 422)
        return JSONResponse({"checks": await run_in_threadpool(checks, stage, values)})

    @app.post("/api/launch")
    async def launch(stage: str, request: Request) -> JSONResponse:
        values, errors = await run_in_threadpool(read_form, stage, await request.json())
        if errors:
            return JSONResponse({"errors": errors}, 422)
        return JSONResponse({"run": launcher.launch(stage, values).id})

    # ------------------------------------------------------------------ playground, plugins

    @app.get("/playground", response_class=HTMLResponse)
    def playground_page(a: str = "", b: str = "") -> HTMLResponse:
        from modelloop.registry import ENGINES, get_registry

        chosen = [reference for reference in (a, b) if reference]
        models = chat_models()
        return page(
            "playground.html",
            models=models,
            chosen=chosen or models[:1],
            engines=get_registry(ENGINES).names(),
        )

    def chat_models() -> list[str]:
        """What the playground chats with: the finished runs, newest first, then the models
        they started from (to compare a run with its base)."""
        finished = [run for run in reversed(find_runs()) if run.manifest.get("status") == "completed"]
        bases = sorted({str(run.manifest["base_model"]) for run in finished if run.manifest.get("base_model")})
        return [run.id for run in finished] + bases

    @app.post("/api/chat")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        try:
            model = str(body["model"])
            if model not in chat_models():
                return JSONResponse({"error": f"{model} is neither a finished run nor the base of one"}, 404)
            path = model if Path(model).is_dir() and not (Path(model) / "manifest.json").is_file() else None
            path = path or str(run_or_404(model).path)
            sampling = {
                "max_tokens": int(body.get("max_tokens", 128)),
                "temperature": float(body.get("temperature", 0.7)),
                "top_p": float(body.get("top_p", 1.0)),
            }
            answer = await run_in_threadpool(
                playground.answer, path, body["messages"], engine=str(body.get("engine", "hf")), **sampling
            )
        except (KeyError, TypeError, ValueError) as error:
            return JSONResponse({"error": f"a chat request needs model and messages: {error}"}, 400)
        except ModelloopError as error:
            return JSONResponse({"error": str(error)}, 400)
        return JSONResponse(answer)

    @app.get("/plugins", response_class=HTMLResponse)
    def plugins_page() -> HTMLResponse:
        from modelloop.commands.plugins import describe_plugins
        from modelloop.plugins import get_plugin_manager

        return page("plugins.html", plugins=describe_plugins(get_plugin_manager(), include_builtins=True, hook=None))

    @app.get("/static/{name}")
    def static(name: str) -> FileResponse:
        path = HERE / "static" / Path(name).name
        if not path.is_file():
            raise HTTPException(404, name)
        return FileResponse(path)

    return app
