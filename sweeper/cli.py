"""The `sweep` command. Thin: parsing, printing and exit codes; the work lives in launch / scheduler / results."""
from __future__ import annotations

import contextlib
import faulthandler
import functools
import logging
import os
import sys
import threading

import click

from .errors import UserError

EXIT_TRIALS_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
INTERRUPTED_CHECK_S = 3.0  # after Ctrl-C as Ray starts, how long the task check may take to end
INTERRUPTED_RAY_STOP_S = 6.0  # after Ctrl-C, how long Ray may take to stop (the launch promises to leave within 10 s)


def _handle_errors(fn):
    """UserError -> one line on stderr and exit 2 (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if ctx.find_root().params.get("debug"):
                raise
            click.echo(f"sweep: error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (and Ray worker output).")
@click.version_option(package_name="quant-sweeper")
def main(debug: bool, verbose: bool) -> None:
    """Sweep LLM quantizations (models x precisions x compute dtypes) over Ray; results in Parquet."""
    # a native crash (a library's segfault, here or on one of the launch's threads) prints every thread's Python
    # stack on stderr instead of ending the command without a word; not where stderr is no file (a notebook)
    with contextlib.suppress(AttributeError, ValueError, OSError):
        faulthandler.enable(all_threads=True)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("study_file")
@click.option("--address", default=None, help="Ray cluster address ('auto', 'ray://host:10001'); default: local Ray.")
@click.option("--results", "results_dir", default=None, help="Results directory (default: results/<study name>).")
@click.option("--fresh", is_flag=True, help="Start over: move existing results aside (never deleted).")
@click.option("--dry-run", is_flag=True, help="Print the expanded trial table and exit.")
@click.option("--gpus-per-trial", type=float, default=None, help="Pin every trial's GPU share (fraction or whole GPUs).")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, help="At most N trials at once.")
@click.option("--only", multiple=True, metavar="KEY=VALUE", help="Run only matching cells (model, precision, compute_dtype).")
@click.option("--limit", type=float, default=None, help="Override the study's lm-eval item limit.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Times a trial is retried when its worker process dies.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of the local Ray instance.")
@click.option("--node-gpus", default=None, metavar="NxGB",
              help="With --dry-run: size each trial's GPUs for a node of N GPUs of GB each (e.g. 4x80GB).")
@click.option("--warm-workers/--no-warm-workers", default=True, show_default=True,
              help="Start processes on this machine that import torch, transformers and lm-eval while Ray starts, "
                   "and run this machine's trials in them.")
@_handle_errors
def launch(study_file, address, results_dir, fresh, dry_run, gpus_per_trial, max_concurrent, only, limit, retries,
           num_cpus, node_gpus, warm_workers):
    """Run every trial of STUDY_FILE that is not done yet (resumes by default)."""
    from . import launch as L
    from .interrupt import StopOnSigint
    from .query import format_frame as render

    verbose = click.get_current_context().find_root().params["verbose"]
    if dry_run:
        p, notes = L.plan(study_file, results_dir, only, limit, gpus_per_trial, max_concurrent)
        if node_gpus:
            p = L.size_for_node(p, *L.parse_node_gpus(node_gpus))
        if fresh:
            L.check_fresh(p.store)
        if fresh and p.store.loc.exists():  # what the launch would do: every trial runs again
            notes.append(f"--fresh: the results in {p.store.root} would be moved aside; every trial runs")
            p.status = {}
        _print_plan(p, notes, render)
        if node_gpus:
            click.echo(f"(dry run: GPUs sized for one node of {node_gpus})")
        else:
            click.echo("(dry run: GPU shares shown as on a CPU-only cluster;\n `auto` shares are computed at launch "
                       "from each GPU's memory; --node-gpus NxGB sizes them for a node)"
                       if p.study.resources.gpus_per_trial == "auto" else "(dry run)")
        return
    if node_gpus:
        raise UserError(f"--node-gpus {node_gpus}: only with --dry-run (a launch sizes trials for the cluster Ray "
                        "reports)")
    resume = L.resume_command(study_file, results_dir, only, limit)
    with StopOnSigint():
        try:
            code, ray_stopped = _launch(study_file, address, results_dir, fresh, gpus_per_trial, max_concurrent, only,
                                        limit, retries, num_cpus, warm_workers, verbose, resume)
        except KeyboardInterrupt as e:
            # running trials were stopped on the way out (warm workers closed, Ray shut down); rows already written stay
            click.echo(f"interrupted: finished results are kept; run `{resume}` again to resume", err=True)
            code, ray_stopped = EXIT_INTERRUPTED, getattr(e, "ray_stopped", True)
    _finish(code, ray_stopped)


def _launch(study_file, address, results_dir, fresh, gpus_per_trial, max_concurrent, only, limit, retries, num_cpus,
            warm_workers, verbose, resume) -> tuple[int, bool]:
    """The launch: (exit code, whether Ray stopped). Ctrl-C leaves it as KeyboardInterrupt, after the clean-up."""
    from . import launch as L
    from . import scheduler
    from .cluster_inputs import check_inputs_visible
    from .interrupt import checkpoint
    from .lock import launch_lock
    from .query import format_frame as render
    from .resources import share_function

    # every fast check before Ray starts; lm-eval's task check (imports, task index) runs while Ray starts
    p, notes = L.plan(study_file, results_dir, only, limit, gpus_per_trial, max_concurrent, with_tasks=False)
    if fresh:
        L.check_fresh(p.store)
    pool = None
    with launch_lock(p.store.root) as lock:
        if not fresh and not p.pending:  # nothing to do: said without starting Ray or warm workers (about a second)
            for line in L.prepare_store(p.store, lock.token):  # a quarantined file makes its trial pending again
                click.echo(line, err=True)
            p = L.for_cluster(p)
            if not p.pending:
                L.record_launch(p, sys.argv, address)
                click.echo(f"nothing to do: all {len(p.trials)} trials are done in {p.store.root}; "
                           f"read them: sweep results {p.store.root}")
                return 0, True
        # warm workers start first: their imports then overlap Ray's start and the task check
        pool = (L.start_warm_workers(p, num_cpus, scheduler.WORKER_ENV, address, fresh,
                                     emit=lambda m: click.echo(m, err=True)) if warm_workers else None)
        if pool is not None:
            click.echo(f"warm workers: {len(pool.keys)} starting on this machine")
        try:
            scheduler.import_ray()  # before the check's thread imports what Ray imports too
            checking_tasks = L.Background(L.validate_study_tasks, p.study, then=scheduler.import_tune)
            try:
                cluster = scheduler.connect(address, num_cpus=num_cpus, verbose=verbose,
                                            gpu_memory=p.study.resources.gpus_per_trial == "auto")
            except BaseException as e:
                # its child processes end before this process does; after Ctrl-C only for a while, as a thread that
                # an interrupted import left waiting on a lock never ends (sweeper/interrupt.py)
                checking_tasks.wait(INTERRUPTED_CHECK_S if isinstance(e, KeyboardInterrupt) else None)
                raise
            try:
                store_writer = scheduler.start_store_writer()  # its process starts while the checks run
                checking_tasks.result()
                check_inputs_visible(p.trials, address)  # every node that may run a trial sees its local inputs
                share_for = (share_function(cluster.gpu_memory_bytes, int(cluster.node_gpus))
                             if cluster.gpu_memory_bytes else None)
                sized = L.for_cluster(p, share_for, cluster.gpus, cluster.node_gpus)  # a trial that fits no node: refused here
                if pool is not None and not L.pool_serves_this_node(pool, sized, cluster, fresh):
                    pool.close(emit=lambda m: click.echo(m, err=True))
                    pool = None
                    click.echo("warm workers: stopped, no trial can run on this machine (Ray gives it no "
                               f"{'GPU' if cluster.gpus else 'CPU'}); the trials run in Ray's workers on the other nodes")
            except UserError as e:
                if not scheduler.disconnect():  # quietly: the task error stays the launch's one line
                    click.echo(f"sweep: error: {e}", err=True)
                    _finish(EXIT_USER_ERROR, ray_stopped=False)
                raise
            except BaseException:  # Ctrl-C included
                scheduler.disconnect(emit=lambda m: click.echo(m, err=True))
                raise
            if fresh:
                moved = L.move_aside(p.store)
                if moved:
                    click.echo(f"--fresh: moved old results to {moved}")
            for line in L.prepare_store(p.store, lock.token):
                click.echo(line, err=True)
            p = L.for_cluster(p, share_for, cluster.gpus, cluster.node_gpus)
            _print_plan(p, notes, render)
            click.echo(f"ray: {cluster.nodes} node(s), {cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs"
                       + (f" of {cluster.gpu_memory_bytes / 2**30:.0f} GiB" if cluster.gpu_memory_bytes else "")
                       + (L.preload_note(cluster.preloading_nodes, cluster.nodes, cluster.job_runtime_env) if address
                          else ""))
            L.record_launch(p, sys.argv, address)
            pending = p.pending
            if not pending:
                click.echo(f"nothing to do: all {len(p.trials)} trials are done in {p.store.root}")
                return 0, True
            done_before = len(p.trials) - len(pending)
            click.echo(f"running {len(pending)} trial(s)" + (f" ({done_before} already done, skipped)" if done_before else ""))
            try:
                checkpoint()  # a Ctrl-C whose exception a library caught on the way here: no trial starts
                scheduler.run_trials(pending, p.store, emit=click.echo, max_concurrent=p.study.resources.max_concurrent,
                                     retries=retries, baselines_first=p.study.kl is not None,
                                     warm=pool.descriptor if pool is not None else None,
                                     slots=L.concurrent_slots(pending, cluster.cpus, cluster.gpus,
                                                              p.study.resources.max_concurrent),
                                     store_writer=store_writer)
            except KeyboardInterrupt as e:
                # the warm workers (and their running trials) and Ray stop side by side: Ctrl-C leaves within seconds,
                # and a Ray that does not stop in time (or nodes not refilled in time: sweeper/node_refill.py) is left
                # to die with this process
                closing = None
                if pool is not None:
                    closing = threading.Thread(target=pool.close, name="sweep-warm-close", kwargs=dict(
                        emit=lambda m: click.echo(m, err=True), keep_logs=L.warm_logs_dir(p.store, pool)))
                    closing.start()
                    pool = None
                e.ray_stopped = scheduler.disconnect(timeout_s=INTERRUPTED_RAY_STOP_S,
                                                     emit=lambda m: click.echo(m, err=True))
                if closing is not None:
                    closing.join()
                raise
            except BaseException:
                scheduler.disconnect(emit=lambda m: click.echo(m, err=True))
                raise
            ray_stopped = scheduler.disconnect(emit=lambda m: click.echo(m, err=True))
        finally:
            if pool is not None:
                pool.close(emit=lambda m: click.echo(m, err=True), keep_logs=L.warm_logs_dir(p.store, pool))
    return _launch_summary(p, resume), ray_stopped


def _launch_summary(p, resume: str) -> int:
    """Print what the launch left and return its exit code."""
    status = p.store.trial_status()
    ids = [t.trial_id for t in p.trials]
    done = sum(status.get(i) == "done" for i in ids)
    failed = [i for i in ids if status.get(i) == "failed"]
    if done:
        _print_comparison(p.store.root)
    click.echo(f"summary: {done}/{len(ids)} done, {len(failed)} failed, {len(ids) - done - len(failed)} pending; "
               f"results in {p.store.root}")
    if len(ids) - done - len(failed) > 0:
        click.echo(f"interrupted: run `{resume}` again to resume", err=True)
        return EXIT_INTERRUPTED
    click.echo(f"read them: sweep results {p.store.root}")
    if failed:
        click.echo(f"{len(failed)} trial(s) failed: see `sweep status {p.store.root}`; a relaunch retries them", err=True)
        return EXIT_TRIALS_FAILED
    return 0


def _print_comparison(root) -> None:
    """The seed-style table (`sweep results DIR --vs-baseline`) of the results, fitted to the terminal."""
    from .query import format_frame, query_frame, terminal_width

    try:
        click.echo(format_frame(query_frame(str(root), vs_baseline=True), width=terminal_width() or 100), nl=False)
    except UserError as e:  # the launch's own outcome still stands; say why there is no table
        click.echo(f"(no comparison table: {e})", err=True)


def _finish(code: int, ray_stopped: bool) -> None:
    # a hung Ray shutdown would also hang the interpreter's exit hooks: leave without them. So does an interrupted
    # launch, whose clean-up is done: the exit hooks (Ray's, multiprocessing's) only add time there, and in one run of
    # tests/test_interrupt.py in ~4 the launch then died by SIGINT (-2) instead of exiting 130
    if not ray_stopped or code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def _print_plan(p, notes, render) -> None:
    import polars as pl

    from .launch import trial_table

    for n in notes:
        click.echo(n)
    for f, why in p.store.damaged_files():
        click.echo(f"damaged result file {f} ({why}): its trial counts as pending", err=True)
    for d in p.dropped:
        click.echo(f"dropped {d.model} {d.precision} x compute {d.compute_dtype}: {d.reason}")
    click.echo(f"study {p.study.name}: {len(p.trials)} trial(s), results in {p.store.root}")
    from .query import terminal_width

    click.echo(render(pl.DataFrame(trial_table(p)), width=terminal_width()), nl=False)


@main.command()
@click.argument("study_or_dir")
@click.option("--results", "results_dir", default=None, help="With a study file: its results dir (default results/<name>).")
@click.option("--only", multiple=True, metavar="KEY=VALUE", help="With a study file: the launch's --only.")
@click.option("--limit", type=float, default=None,
              help="With a study file: the launch's --limit (it changes trial ids).")
@_handle_errors
def status(study_or_dir, results_dir, only, limit):
    """Counts of done / failed / pending trials, and the failures, of a study file (the trials a launch with the
    same options runs) or a results dir (every trial launched there)."""
    from .status import status_report

    click.echo(status_report(study_or_dir, results_dir, only, limit))


@main.command()
@click.argument("dirs", nargs=-1, required=True)
@click.option("--where", default=None, help="Row filter, a SQL expression: \"precision = 'nf4' and decode_tok_s > 10\".")
@click.option("--sql", default=None, help="A SQL query over the views trials, metrics, samples, summary, compare, ...")
@click.option("--view", type=click.Choice(["summary", "trials", "metrics", "samples", "compare", "significance",
                                          "pareto", "recommendations"]), default=None, help="What to show (default: summary).")
@click.option("--columns", default=None, help="Comma-separated columns to keep (globs like 'speedup_*').")
@click.option("--sort", default=None, help="Comma-separated sort columns; '-col' sorts descending.")
@click.option("--pivot", default=None, help="Pivot long rows wide, e.g. --pivot task (seed-style tables).")
@click.option("--vs-baseline", is_flag=True, help="Add the derived columns against each model's baseline.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown", "parquet"]), default=None,
              help="Output format (default: the -o file's extension, else table).")
@click.option("-o", "--output", default=None, help="Also write the result to FILE (required for parquet).")
@click.option("--limit", "row_limit", type=click.IntRange(min=1), default=None, help="At most N rows.")
@_handle_errors
def results(dirs, where, sql, view, columns, sort, pivot, vs_baseline, fmt, output, row_limit):
    """Query the results in DIRS (directories or globs): by default one row per trial."""
    from .query import output_format, run_query

    fmt = output_format(fmt, output)
    out = run_query(list(dirs), where=where, sql=sql, columns=columns, sort=sort, pivot=pivot, fmt=fmt,
                    vs_baseline=vs_baseline, output=output, view=view, limit=row_limit)
    if fmt == "parquet":
        click.echo(f"wrote {output}")
    else:
        click.echo(out, nl=False)


@main.command()
@click.argument("dirs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="The report file to write.")
@click.option("--format", "fmt", type=click.Choice(["html", "markdown"]), default=None,
              help="Report format (default: the -o file's extension, .md for markdown, else html).")
@click.option("--title", default=None, help="Report title (default: from the studies).")
@_handle_errors
def report(dirs, output, fmt, title):
    """Write a self-contained HTML (or Markdown) report of the results in DIRS."""
    from .query import output_format
    from .report import write_report

    fmt = output_format(fmt, output, {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown"},
                        default="html")

    path = write_report(list(dirs), output, fmt=fmt, title=title)
    click.echo(f"wrote {path}")


@main.command("precisions")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True)
@click.option("--long", "long_", is_flag=True, help="Every column: group size, options, hardware, CUDA-graph decode.")
def precisions_cmd(fmt, long_):
    """List the precisions a study can name."""
    import polars as pl

    from .precisions import short_table_rows, table_rows
    from .query import format_frame, terminal_width

    rows = table_rows() if long_ or fmt in ("csv", "json") else short_table_rows()  # exports keep every column
    click.echo(format_frame(pl.DataFrame(rows), fmt, width=terminal_width(), keys=("name",)), nl=False)


if __name__ == "__main__":
    main()
