"""The ``carebridge`` command. Settings are read here, once, and passed down."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from listeners.cli_models import evaluate_app, missing_demo_models, models_app, train_app
from listeners.net import listening_socket, port_is_free
from worker.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    help="carebridge: PACS/EHR integration worker. See README.md.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
audit_app = typer.Typer(help="Read and verify the audit trail.", no_args_is_help=True)
rules_app = typer.Typer(help="Routing rules.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(rules_app, name="rules")

# Piped output (audit reports into a file or grep) is not cut to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=240)
err = Console(stderr=True)
log = logging.getLogger("carebridge")


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        err.print(f"[red]carebridge: {exc}[/red]")
        raise typer.Exit(2) from None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    from listeners.dicom import quiet_pynetdicom

    quiet_pynetdicom()
    # httpx logs every request URL at INFO; search URLs can carry patient identifiers.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")]
#: Internal option of the processes a listener group starts: the pipe to report ready on.
ReadyFd = Annotated[
    int | None,
    typer.Option(
        "--ready-fd", hidden=True, help="Internal: a process of a group reports ready here."
    ),
]


def _database(settings: Settings, *, require_current: bool = True) -> Any:
    from db.engine import Database
    from db.migrate import is_current

    database = Database(settings.database_url)
    if require_current:
        try:
            current = is_current(database.engine)
        except Exception as exc:
            err.print(f"[red]carebridge: database unavailable ({type(exc).__name__})[/red]")
            raise typer.Exit(3) from None
        if not current:
            err.print(
                "[red]carebridge: the database schema is not current: run "
                "`carebridge db upgrade`[/red]"
            )
            raise typer.Exit(3)
    return database


# Processes -----------------------------------------------------------------------------


def _wait_for_signal() -> threading.Event:
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return stop


@app.command("listen-dicom")
def listen_dicom(
    sweeper: Annotated[
        bool, typer.Option(help="Also run the stability sweeper in this process.")
    ] = True,
    processes: Annotated[
        int, typer.Option(min=1, max=64, help="Listener processes sharing the port.")
    ] = 1,
    recover: Annotated[
        bool,
        typer.Option(help="First record archive files whose row a power loss undid."),
    ] = True,
    listen_fd: Annotated[
        int | None,
        typer.Option(hidden=True, help="Internal: the listening socket of a group."),
    ] = None,
    ready_fd: ReadyFd = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run the DICOM SCP (C-ECHO, C-STORE) and, by default, the sweeper."""
    _logging(log_level)
    settings = _settings()
    database = _database(settings)
    from db.engine import Database
    from listeners.dicom import StorageSCP

    rules = clinical_rules = None
    if sweeper:  # the rules are read before anything listens: a bad file stops the start
        from worker.clinical_rules import ClinicalRules
        from worker.routing import RoutingRules, RulesError

        try:
            rules = RoutingRules.load(settings.rules_file)
            clinical_rules = ClinicalRules.load(settings.clinical_rules_file)
        except RulesError as exc:
            err.print(f"[red]carebridge: {exc}[/red]")
            raise typer.Exit(2) from None

    # The SCP's own engine: its SQLite commits are not synced one by one (each instance's
    # file is), and the rows a power loss could undo are rebuilt from the files here.
    scp = StorageSCP(settings, Database(settings.database_url, durable_commits=False))
    if recover:
        scp.index_unrecorded()
    shared = None
    if listen_fd is not None:  # a process of a group: the group's socket
        shared = socket.socket(fileno=listen_fd)
    elif processes > 1:
        try:
            shared = listening_socket(settings.dicom_host, settings.dicom_port)
        except OSError as exc:
            err.print(
                f"[red]carebridge listen-dicom: cannot listen on "
                f"{settings.dicom_host}:{settings.dicom_port}: {exc.strerror}[/red]"
            )
            raise typer.Exit(1) from None
    server = scp.start(shared)
    stop = _wait_for_signal()
    _report_ready(ready_fd)
    # The other processes of the group take connections from the same listening socket
    # (inherited); only this one sweeps.
    helpers: list[subprocess.Popen[bytes]] = []
    if shared is not None and listen_fd is None:
        helpers = _start_group(
            [
                "listen-dicom",
                "--no-sweeper",
                "--no-recover",  # done above, before they start
                "--listen-fd",
                str(shared.fileno()),
                "--log-level",
                log_level,
            ],
            processes - 1,
            pass_fds=(shared.fileno(),),
        )
        if any(helper.poll() is not None for helper in helpers):
            err.print("[red]carebridge listen-dicom: a listener process did not start[/red]")
            stop.set()
    sweeper_thread = None
    if sweeper:
        from worker.celery_app import make_celery
        from worker.runtime import Dispatcher
        from worker.sweeper import Sweeper

        assert rules is not None
        sweep = Sweeper(
            settings, database, Dispatcher(make_celery(settings)), rules, clinical_rules
        )
        sweeper_thread = threading.Thread(target=sweep.run, args=(stop,), name="sweeper")
        sweeper_thread.start()
    failed = stop.is_set()
    if not failed:
        print(
            "carebridge listen-dicom: ready" + (f" ({processes} processes)" if helpers else ""),
            flush=True,
        )
    # The group shares one listening socket: a process that stops loses no connection
    # (the others take them), so it is reported, not fatal.
    reported: set[int] = set()
    while not stop.wait(0.5):
        for helper in helpers:
            if helper.poll() is not None and helper.pid not in reported:
                reported.add(helper.pid)
                log.error("a listener process of the group stopped (%s)", helper.returncode)
    for helper in helpers:
        if helper.poll() is None:
            helper.terminate()
    server.shutdown()
    for helper in helpers:
        try:
            helper.wait(30)
        except subprocess.TimeoutExpired:
            helper.kill()
    if sweeper_thread is not None:
        sweeper_thread.join(10)
    if failed:
        raise typer.Exit(1)


#: Where the webhook processes of one ``listen-fhir --processes N`` keep their counters
#: (prometheus_client's multiprocess mode), under the var directory.
FHIR_METRICS_DIR = "fhir-metrics"


def _reset_metrics_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # counters of an earlier run
        stale.unlink(missing_ok=True)


@app.command("listen-fhir")
def listen_fhir(
    processes: Annotated[
        int, typer.Option(min=1, max=64, help="Webhook processes sharing the port.")
    ] = 1,
    ready_fd: ReadyFd = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run the FHIR webhook (Subscription notifications, direct POSTs) on FHIR_HOST:FHIR_PORT."""
    _logging(log_level)
    settings = _settings()
    database = _database(settings)
    host, port = settings.fhir_host, settings.fhir_port
    member = ready_fd is not None  # started by a group's first process
    sockets: list[socket.socket] | None = None
    if processes > 1 or member:
        if not member:
            if not port_is_free(host, port):
                err.print(f"[red]carebridge listen-fhir: {host}:{port} is in use[/red]")
                raise typer.Exit(1)
            # Counters of every process of the group, summed on each /metrics scrape. Set
            # before prometheus_client is imported (it chooses its storage then).
            metrics_dir = settings.var_dir / FHIR_METRICS_DIR
            _reset_metrics_dir(metrics_dir)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        try:
            sockets = [listening_socket(host, port, reuse_port=True, backlog=2048)]
        except OSError as exc:
            err.print(f"[red]carebridge listen-fhir: cannot listen on {host}:{port}: {exc}[/red]")
            raise typer.Exit(1) from None
    import uvicorn

    from listeners.fhir import create_app
    from worker.celery_app import make_celery
    from worker.runtime import Dispatcher

    try:
        api = create_app(settings, database, Dispatcher(make_celery(settings)))
    except ValueError as exc:
        err.print(f"[red]carebridge: {exc}[/red]")
        raise typer.Exit(2) from None
    server = uvicorn.Server(
        uvicorn.Config(
            api,
            host=host,
            port=port,
            log_level=log_level.lower(),
            log_config=None,  # keep carebridge's logging
            access_log=False,  # paths and peers are counted in /metrics instead
        )
    )
    stop = _wait_for_signal()
    # uvicorn runs in a thread so that this thread keeps the signal handlers, as elsewhere.
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, name="fhir-webhook")
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not thread.is_alive():
        err.print("[red]carebridge listen-fhir: the webhook did not start[/red]")
        raise typer.Exit(1)
    _report_ready(ready_fd)
    group = (
        _start_group(["listen-fhir", "--log-level", log_level], processes - 1)
        if processes > 1
        else []
    )
    if any(proc.poll() is not None for proc in group):
        err.print("[red]carebridge listen-fhir: a webhook process did not start[/red]")
        stop.set()
    else:
        print(
            "carebridge listen-fhir: ready"
            + (f" ({processes} processes)" if processes > 1 else ""),
            flush=True,
        )
    # A process of the group that stops on its own stops the group (exit status 1), for
    # the service manager to restart it whole.
    while not stop.is_set() and thread.is_alive():
        if any(proc.poll() is not None for proc in group):
            log.error("a webhook process of the group stopped; stopping the group")
            break
        stop.wait(0.5)
    for proc in group:
        if proc.poll() is None:
            proc.terminate()
    server.should_exit = True
    thread.join(30)
    for proc in group:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    database.dispose()
    if not stop.is_set() or any(proc.returncode not in (0, -signal.SIGTERM) for proc in group):
        raise typer.Exit(1)  # the server or one of its group stopped on its own


#: How long the other processes of a listener group may take to start.
GROUP_START_S = 120.0


def _start_group(
    command: list[str], count: int, pass_fds: tuple[int, ...] = ()
) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` processes of ``carebridge <command> --ready-fd N``, one after the
    other; return once each serves, or has exited (its returncode is then set)."""
    group = []
    for _ in range(count):
        read_end, write_end = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-m", "listeners.cli", *command, "--ready-fd", str(write_end)],
            pass_fds=(*pass_fds, write_end),
        )
        os.close(write_end)
        group.append(proc)
        try:
            # One byte once it serves; end of file if it exits first.
            started = select.select([read_end], [], [], GROUP_START_S)[0]
            if not started or not os.read(read_end, 1):
                proc.kill()
                proc.wait()
        finally:
            os.close(read_end)
    return group


def _report_ready(ready_fd: int | None) -> None:
    """Tell the group's first process that this one serves."""
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"r")
            os.close(ready_fd)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues.")] = "gpu,cpu,deliver",
    concurrency: Annotated[
        int | None, typer.Option(help="Worker processes (default CAREBRIDGE_WORKER_CONCURRENCY).")
    ] = None,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork, solo or threads.")] = "prefork",
    log_level: LogLevel = "INFO",
) -> None:
    """Run a Celery worker on the given queues."""
    _logging(log_level)
    settings = _settings()
    _database(settings).dispose()
    from worker.celery_app import QUEUES, make_celery
    from worker.memory import keep_freed_memory
    from worker.runtime import configure
    from worker.tasks import register_tasks

    unknown = set(queues.split(",")) - set(QUEUES)
    if unknown:
        err.print(f"[red]unknown queue(s): {', '.join(sorted(unknown))}; known: {QUEUES}[/red]")
        raise typer.Exit(2)
    celery = make_celery(settings)
    register_tasks(celery)
    configure(settings, celery)
    n = concurrency or settings.worker_concurrency
    # Torch threads per process: the cores shared between the worker processes.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    # Before the pool forks: every study's buffers are reused, not faulted in again.
    keep_freed_memory()
    celery.worker_main(
        [
            "worker",
            "--queues",
            queues,
            "--concurrency",
            str(n),
            "--pool",
            pool,
            "--hostname",
            f"carebridge-{queues.replace(',', '-')}@%h",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "--loglevel",
            log_level.upper(),
        ]
    )


def _ensure_demo_models(settings: Settings) -> None:
    if not missing_demo_models(settings.models_dir):
        return
    console.print("First run: training demo weights (generated data; a few minutes) ...")
    subprocess.run([sys.executable, "-m", "listeners.cli", "models", "demo"], check=True)


@app.command()
def serve(log_level: LogLevel = "INFO") -> None:
    """Run everything: DICOM SCP, FHIR webhook, sweeper and a worker (embedded defaults)."""
    _logging(log_level)
    settings = _settings()
    from db.migrate import upgrade

    upgrade(settings.database_url)
    _ensure_demo_models(settings)
    me = [sys.executable, "-m", "listeners.cli"]
    children = {
        "listen-dicom": subprocess.Popen([*me, "listen-dicom", "--log-level", log_level]),
        "listen-fhir": subprocess.Popen([*me, "listen-fhir", "--log-level", log_level]),
        "worker": subprocess.Popen([*me, "worker", "--log-level", log_level]),
    }
    stop = _wait_for_signal()
    status = 0
    while not stop.is_set():
        for name, child in children.items():
            if child.poll() is not None:
                err.print(f"[red]carebridge serve: {name} exited with {child.returncode}[/red]")
                status = 1
                stop.set()
        stop.wait(0.5)
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + 20
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    raise typer.Exit(status)


# Database ------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    settings = _settings()
    from db.migrate import upgrade

    upgrade(settings.database_url, revision)
    console.print("database schema is current")


# Audit ---------------------------------------------------------------------------------


@audit_app.command("studies")
def audit_studies(limit: int = 50) -> None:
    """List the newest studies with their state and job outcomes."""
    from listeners.audit_views import studies_table

    settings = _settings()
    console.print(studies_table(_database(settings), limit))


@audit_app.command("show")
def audit_show(
    study_instance_uid: Annotated[
        str, typer.Argument(help="A StudyInstanceUID, or a patient as Patient/<id>.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Everything recorded about one study (instances, jobs, results, deliveries, events)
    or one patient (clinical events, jobs, results, EHR deliveries, events)."""
    from listeners.audit_views import patient_report, study_report

    settings = _settings()
    if study_instance_uid.startswith("Patient/"):
        report = patient_report(_database(settings), study_instance_uid)
    else:
        report = study_report(_database(settings), study_instance_uid)
    if report is None:
        err.print("no such study or patient")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from listeners.audit_views import render_report

        render_report(console, report)


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the audit trail's hash chain; exit 1 on any edited or deleted event."""
    from db import audit

    settings = _settings()
    database = _database(settings)
    with database.session() as session:
        count, breaks = audit.verify(session)
    if breaks:
        for item in breaks:
            err.print(f"[red]audit chain broken at event {item.seq}: {item.reason}[/red]")
        raise typer.Exit(1)
    console.print(f"audit chain intact: {count} events verified")


# Sending -------------------------------------------------------------------------------


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    to: Annotated[
        str | None, typer.Option("--to", help="AE@HOST:PORT (default: this carebridge's SCP).")
    ] = None,
    calling_ae: Annotated[str, typer.Option(help="Our calling AE title.")] = "CAREBRIDGE-SCU",
) -> None:
    """C-STORE files or folders to a DICOM peer, with a progress bar."""
    from rich.progress import Progress

    from worker.senders.dicom import DeliveryError, parse_destinations, send_files

    settings = _settings()
    target = to or f"{settings.dicom_ae_title}@{settings.dicom_host}:{settings.dicom_port}"
    try:
        (destination,) = parse_destinations(target)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    files = sorted(
        {f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()}
    )
    if not files:
        err.print("[red]no files found[/red]")
        raise typer.Exit(2)
    failures = 0
    with Progress(console=err) as progress:
        task = progress.add_task(f"C-STORE to {target}", total=len(files))
        for start in range(0, len(files), 200):  # one association per 200 files
            batch = files[start : start + 200]
            try:
                statuses = send_files(
                    destination,
                    batch,
                    calling_ae=calling_ae,
                    progress=lambda: progress.advance(task),
                )
            except DeliveryError as exc:
                err.print(f"[red]{exc}[/red]")
                raise typer.Exit(1) from None
            failures += sum(1 for status in statuses if status not in (0, 0xB000, 0xB006, 0xB007))
    console.print(f"sent {len(files) - failures} of {len(files)} files to {target}")
    if failures:
        raise typer.Exit(1)


# Models --------------------------------------------------------------------------------


# Rules ---------------------------------------------------------------------------------


@rules_app.command("test")
def rules_test(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    rules_file: Annotated[
        Path | None, typer.Option("--rules", help="Rules file (default: CAREBRIDGE_RULES_FILE).")
    ] = None,
) -> None:
    """Explain which pipelines the routing rules would run on these files, and why."""
    from worker.routing import RoutingRules, RulesError, explain_paths

    settings = _settings()
    try:
        rules = RoutingRules.load(rules_file or settings.rules_file)
    except RulesError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    print(explain_paths(rules, paths))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
