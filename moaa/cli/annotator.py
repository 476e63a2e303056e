"""`moaa annotator serve`, `moaa annotate`, `moaa judge-eval`."""
from __future__ import annotations

import sys
from pathlib import Path

from moaa.cli import add_connection_args, add_quiet_arg, add_service_group


def _client_args(p) -> None:
    p.add_argument("--annotator", default="127.0.0.1:50052", help="HOST:PORT of a running annotator")
    p.add_argument("--ensemble", default="", help="judge ensemble (default: the annotator's default)")
    p.add_argument("--mode", default="", choices=["", "pointwise", "pairwise", "moa"],
                   help="judging mode (default: the ensemble's)")
    add_connection_args(p, "annotator")
    add_quiet_arg(p)


def register(subparsers) -> None:
    add_service_group(subparsers, "annotator", "the judge-ensemble annotation service (gRPC)",
                      "serve Annotator with the backends and ensembles of a config", _serve)

    ant = subparsers.add_parser("annotate", help="samples.jsonl -> TRL preference pairs (resumable by row id)")
    ant.add_argument("--in", dest="inp", required=True, help='JSONL rows {"id", "prompt", "candidates": [{"text", "model"}]}; - reads standard input '
                     '(a rerun resumes by the ids in --out: pipe the same rows again)')
    ant.add_argument("--out", required=True, help="JSONL preference rows; rerun with the same path to resume")
    _client_args(ant)
    ant.set_defaults(func=_annotate)

    ev = subparsers.add_parser("judge-eval", help="agreement of the ensemble and each judge with human labels")
    ev.add_argument("--in", dest="inp", required=True, help='JSONL rows {"prompt", "chosen", "rejected"}; - reads standard input')
    ev.add_argument("--out", help="also write the summary as JSON here")
    _client_args(ev)
    ev.set_defaults(func=_judge_eval)


async def _serve(args) -> int:
    from moaa.services.annotator.server import start_annotator
    from moaa.services.common.logs import configure_logging, serving_level
    from moaa.services.config import load_server_config

    cfg = load_server_config(args.config, "annotator", host=args.host, port=args.port)
    configure_logging(serving_level(), json_lines=args.log_format == "json")
    server = await start_annotator(cfg)
    return await server.wait_for_signal(server.ready_line("annotator"))


def _endpoint(args):
    from moaa.client.endpoint import Endpoint

    return Endpoint.reached_as(args.annotator, args)


async def _annotate(args) -> int:
    from moaa.client.annotate import annotate_file, counts_line

    summary = await annotate_file(_endpoint(args), args.inp, args.out, ensemble=args.ensemble, mode=args.mode,
                                  progress=not args.quiet)
    sys.stderr.write(f"{counts_line(summary, Path(args.out))}; report: {args.out}.report.json\n")
    return 0


async def _judge_eval(args) -> int:
    from moaa.client.judge_eval import check_out, failure, format_table, judge_eval
    from moaa.files import atomic_write_json

    if args.out:
        check_out(args.out)
    summary = await judge_eval(_endpoint(args), args.inp, ensemble=args.ensemble, mode=args.mode,
                               progress=not args.quiet)
    print(format_table(summary))
    if args.out:
        atomic_write_json(args.out, summary)
    err = failure(summary)
    if err is not None:
        raise err
    return 0
