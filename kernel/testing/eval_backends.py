"""Evaluation back ends: options are checked before any model loads, and a task the back
end does not know fails in one line that names it, before a single request is made (the
target is an endpoint nothing listens on, so a back end that asked it would fail otherwise).

A missing library or environment (what ``check`` refuses with no options) is a skip;
running real tasks is each back end's own test, in its own
task format.
"""

from __future__ import annotations

from modelloop.specs import EvalBackend
from modelloop.testing.kit import Broken, Check, Skip, raised, require
from modelloop.testing.workspace import Workspace

UNKNOWN_TASK = "no_such_task_modelloop_conformance"


def checks(backend: EvalBackend) -> list[Check]:
    found = [Check("eval backend", backend, "refuses an unknown task in one line, naming it", refuses_unknown_task)]
    if backend.check is not None:
        found.append(Check("eval backend", backend, "refuses an unknown option", refuses_unknown_option))
    return found


def refuses_unknown_option(backend: EvalBackend, workspace: Workspace) -> None:
    assert backend.check is not None
    try:
        backend.check({"no_such_option_modelloop": 1})
    except ValueError:
        return
    raise Broken("check accepted an option it does not have")


def refuses_unknown_task(backend: EvalBackend, workspace: Workspace) -> None:
    from modelloop.benchmarks import BenchmarkJob, Endpoint
    from modelloop.errors import ModelloopError
    from modelloop.parallel.world import free_port

    require(backend, "eval backend")
    try:
        options = backend.check({}) if backend.check is not None else {}
    except ValueError as error:  # what this machine lacks (the back end's own environment)
        raise Skip(str(error)) from None
    job = BenchmarkJob(
        tasks=(UNKNOWN_TASK,),
        target=Endpoint(url=f"http://127.0.0.1:{free_port()}/v1", model="nobody"),
        output_dir=workspace.folder(f"eval-{backend.name}"),
        options=options,
    )
    try:
        backend.evaluate(job)
    except ModelloopError as error:
        message = str(error)
        if UNKNOWN_TASK not in message or "\n" in message.strip():
            raise Broken(f"the error does not name the task in one line: {message!r}") from None
        return
    except Exception as error:  # noqa: BLE001 - anything else is the contract broken
        raise Broken(f"an unknown task raised {raised(error)}, not a one-line ModelloopError") from None
    raise Broken(f"an unknown task {UNKNOWN_TASK!r} was evaluated without an error")
