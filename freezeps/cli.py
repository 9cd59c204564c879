"""`freezeps` command line: ps, worker, run, report. Flags are generated from Config."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

from freezeps.config import PS, RUN, STATUS, WORKER, Config, fields_for, load_config

ROLE_HELP = {
    PS: "start a parameter server and serve until its workers are done",
    WORKER: "start one worker that trains against a parameter server",
    RUN: "start a PS and N workers on this machine over loopback, show progress, print the report",
}


def _add_flags(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (below the flags, above env)")
    for f in fields_for(role):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default!r}; env FREEZEPS_{f.name.upper()})"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                choices=f.metadata["choices"], help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freezeps", description="Freeze-aware parameter server for "
                                     "communication-light distributed fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for role in (PS, WORKER, RUN):
        _add_flags(sub.add_parser(role, help=ROLE_HELP[role], description=ROLE_HELP[role]), role)
    report = sub.add_parser("report", help="report on finished run folders: text, or markdown tables and PNG plots",
                            description="Print the report of a finished run folder. With several folders, or "
                                        "--out, write OUT/report.md (a comparison table) and PNG plots: bytes per "
                                        "step stacked by block, accuracy vs wall time and vs bytes, the freeze "
                                        "timeline.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (hold ps.jsonl, worker-*.jsonl)")
    report.add_argument("--out", help="folder for report.md and the plots (default with several runs: "
                                      "the first run's folder/../report)")
    report.add_argument("--baseline", help="run folder name that savings are measured against (default: the first)")
    report.add_argument("--title", default="freezeps runs compared", help="title of report.md")
    report.add_argument("--json", action="store_true", help="print the facts as JSON")
    status = sub.add_parser("status", help="ask a running PS for its status (exit 1 if unreachable)",
                            description="ask a running PS for its status (exit 1 if unreachable); "
                                        "used by health checks")
    status.add_argument("address", nargs="?", default="127.0.0.1:50051", help="PS address, host:port")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    _add_flags(status, STATUS)  # the security settings: a PS with TLS or a token checks this call too
    certs = sub.add_parser("certs", help="make a CA, a PS certificate, client certificates and a token",
                           description="Write a CA (ca.pem, ca.key), a PS certificate (ps.pem, ps.key) for the "
                                       "given hosts, a client certificate per --client, and a random token into "
                                       "OUT; keys and token 0600. An existing CA in OUT signs the new "
                                       "certificates; existing files are kept.")
    certs.add_argument("out", metavar="OUT", help="folder to write into")
    certs.add_argument("--ps-host", action="append", default=[], metavar="HOST",
                       help="a name or IP address workers use to reach the PS (repeat for several); "
                            "localhost and 127.0.0.1 are always included")
    certs.add_argument("--client", action="append", default=None, metavar="NAME",
                       help="a client certificate NAME.pem for mutual TLS (repeat; default: one named worker)")
    certs.add_argument("--days", type=int, default=365, help="validity of the certificates, days")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    cli = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    return load_config(cli, args.config)


def _report(args: argparse.Namespace) -> int:
    from freezeps.report import format_report, summarize_run, write_comparison
    try:
        runs = [summarize_run(Path(d)) for d in args.run_dirs]
    except (OSError, ValueError, KeyError) as e:
        print(f"freezeps report: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(runs[0] if len(runs) == 1 else runs, indent=1))
        return 0
    if len(runs) == 1 and not args.out:
        print(format_report(runs[0]))
        return 0
    out = Path(args.out) if args.out else Path(args.run_dirs[0]).parent / "report"
    try:
        path = write_comparison(runs, out, args.title, args.baseline)
    except ValueError as e:  # a --baseline that names none of the runs
        print(f"freezeps report: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path} and the plots beside it")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from freezeps.certs import make_secrets
    try:
        written, kept = make_secrets(Path(args.out), args.ps_host, args.client or ["worker"], args.days)
    except (ValueError, OSError) as e:
        print(f"freezeps certs: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    for path in kept:
        print(f"kept  {path} (exists)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return _report(args)
    if args.command == "certs":
        return _certs(args)
    try:
        cfg = config_from_args(args)
    except (ValueError, OSError) as e:
        print(f"freezeps {args.command}: bad configuration: {e}", file=sys.stderr)
        return 2
    if args.command == STATUS:
        from freezeps.launch import print_status
        return print_status(args.address, args.timeout, cfg)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {args.command}[{os.getpid()}] %(message)s")
    if args.command == PS:
        from freezeps.roles import run_ps
        return run_ps(cfg)
    if args.command == WORKER:
        from freezeps.roles import run_worker_role
        return run_worker_role(cfg)
    from freezeps.launch import run_job
    # SIGTERM (kill, systemd, docker stop) unwinds like Ctrl-C: the launcher's cleanup stops the
    # PS and the workers and removes the network namespaces, instead of leaving them behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return run_job(cfg, args.config)
