"""The multiverso-py command line: scheduler, server, the local launcher and the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from multiverso_py import demo
from multiverso_py.auth import Auth, load_auth
from multiverso_py.errors import InvalidArgument, MultiversoError
from multiverso_py.polling import parse_poll_us, poll_limit_from_env
from multiverso_py.scheduler import Scheduler, SchedulerConfig
from multiverso_py.server import Server, ServerConfig
from multiverso_py.tls import load_tls
from multiverso_py.transport import new_event_loop, parse_address

log = logging.getLogger("multiverso_py")


def _at_least(low: int):
    """An argparse type: an int >= low."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse says "invalid int value: 'x'"
    return parse


_positive, _non_negative = _at_least(1), _at_least(0)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _poll_us(text: str) -> float:
    try:
        return parse_poll_us(text, "--poll-us")
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 picks a free one)")
    return value


def _security_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auth-token-file", metavar="PATH",
                        help="require this shared secret (HMAC challenge) of every connection; "
                             "default: MV_AUTH_TOKEN_FILE or MV_AUTH_TOKEN, else no authentication")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (MV_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (MV_TLS_KEY)")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="trust peers whose certificate this CA signed, when connecting (MV_TLS_CA)")


def _periodic_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-dir", metavar="PATH", help="with --checkpoint-every: where checkpoints go")
    parser.add_argument("--checkpoint-every", type=_seconds, metavar="SECONDS",
                        help="take a consistent checkpoint of every table this often")


# Options that `run` hands to everything it starts through the environment.
_SECURITY_ENV = {"auth_token_file": "MV_AUTH_TOKEN_FILE", "tls_cert": "MV_TLS_CERT", "tls_key": "MV_TLS_KEY",
                 "tls_ca": "MV_TLS_CA"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiverso-py",
        description="A parameter server for Python training code. Start a whole local job with "
                    "'multiverso-py run', or its parts with 'scheduler' and 'server'.",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="logging verbosity (default: info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sched = sub.add_parser("scheduler", help="run a job's scheduler",
                           description="Register servers and workers, run barriers, own the shard map.")
    sched.add_argument("--port", type=_port, required=True, help="port to listen on (0 picks a free one)")
    sched.add_argument("--workers", type=_positive, required=True, help="number of workers in the job")
    sched.add_argument("--servers", type=_positive, default=1,
                       help="workers start once this many servers have registered (default: 1)")
    sched.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    sched.add_argument("--ready-file", help="write HOST:PORT here once listening (for launchers)")
    _security_options(sched)
    sched.add_argument("--restore", metavar="PATH", help="start the job's tables from this checkpoint")
    _periodic_checkpoint_options(sched)
    sched.add_argument("--heartbeat-timeout", type=_seconds, default=SchedulerConfig.heartbeat_timeout,
                       help="declare a worker dead when it sends nothing, not even a heartbeat, for this "
                            f"many seconds (default: {SchedulerConfig.heartbeat_timeout:g})")

    serv = sub.add_parser("server", help="run a server that holds table partitions",
                          description="Hold table partitions and apply gets and adds from workers.")
    serv.add_argument("--scheduler", required=True, metavar="HOST:PORT", help="the job's scheduler")
    serv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serv.add_argument("--port", type=_port, default=0, help="port to listen on (default: a free one)")
    serv.add_argument("--threads", type=_positive, default=ServerConfig.threads,
                      help=f"threads for table work (default: {ServerConfig.threads})")
    serv.add_argument("--poll-us", type=_poll_us, metavar="MICROSECONDS",
                      help="after each request, poll for the next one this long before sleeping; it answers "
                           "sooner, at the cost of a busy core while requests keep coming (default: MV_POLL_US, "
                           "else 2000; 0: never)")
    serv.add_argument("--no-local-socket", dest="local_socket", action="store_false",
                      help="serve workers on this host over TCP too; by default their synchronous calls take an "
                           "abstract Unix socket (Linux), which skips the TCP stack")
    serv.add_argument("--ready-file", help="write HOST:PORT here once registered (for launchers)")
    _periodic_checkpoint_options(serv)
    _security_options(serv)

    run = sub.add_parser("run", help="run a local job: scheduler, servers and N copies of a command",
                         description="Start a scheduler and M servers, run N copies of CMD with MV_SCHEDULER "
                                     "set, prefix their output, stop everything when CMD ends, and exit with "
                                     "the first non-zero status.",
                         epilog="example: multiverso-py run --workers 2 --servers 2 -- python train.py")
    run.add_argument("--workers", type=_positive, default=1, help="copies of CMD to run (default: 1)")
    run.add_argument("--servers", type=_positive, default=1, help="servers to start (default: 1)")
    run.add_argument("--consistency", choices=["async", "ssp", "bsp"],
                     help="default consistency model of the job's tables (MV_CONSISTENCY; default: async)")
    run.add_argument("--staleness", type=_non_negative, help="default SSP staleness in clocks (MV_STALENESS)")
    run.add_argument("--timeout", type=_seconds, help="request timeout in seconds for the workers (MV_TIMEOUT)")
    run.add_argument("--heartbeat-timeout", type=_seconds,
                     help=f"declare a silent worker dead after this many seconds "
                          f"(default: {SchedulerConfig.heartbeat_timeout:g})")
    _security_options(run)
    run.add_argument("--restore", metavar="PATH", help="start the job's tables from this checkpoint (mv.checkpoint)")
    _periodic_checkpoint_options(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the worker command")
    demo.add_parser(sub, _positive, _non_negative)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(getattr(args, "checkpoint_dir", None)) != bool(getattr(args, "checkpoint_every", None)):
        parser.error("--checkpoint-dir and --checkpoint-every go together")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            return demo.run(args)
        if args.command == "run":
            from multiverso_py.launcher import launch

            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            load_auth(args.auth_token_file)  # clear errors now rather than in every child
            load_tls(args.tls_cert, args.tls_key, args.tls_ca)
            for option, variable in _SECURITY_ENV.items():  # the scheduler, servers and workers read them there
                if getattr(args, option):
                    os.environ[variable] = os.path.abspath(getattr(args, option))
            if not cmd:
                parser.error("run needs a command after --, e.g. multiverso-py run --workers 2 -- python train.py")
            return launch(cmd, args.workers, args.servers, consistency=args.consistency,
                          staleness=args.staleness, timeout=args.timeout, heartbeat_timeout=args.heartbeat_timeout,
                          restore=args.restore, checkpoints=(args.checkpoint_dir, args.checkpoint_every),
                          log_level=args.log_level)
        return _run_async(_scheduler(args) if args.command == "scheduler" else _server(args))
    except MultiversoError as exc:
        log.error("%s", exc)
        return 1


def _run_async(coro) -> int:
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def _write_ready(path: Optional[str], address: str) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(address + "\n")
        os.replace(tmp, path)


def _on_signals(stop) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


def _auth_for(args: argparse.Namespace) -> Optional[Auth]:
    """The token to require; says loudly when binding beyond this machine without one."""
    auth = load_auth(args.auth_token_file)
    if auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s WITHOUT AUTHENTICATION: anyone who can reach this port can read and change "
                    "every table; set MV_AUTH_TOKEN or --auth-token-file", args.host)
    return auth


async def _scheduler(args: argparse.Namespace) -> int:
    scheduler = Scheduler(SchedulerConfig(workers=args.workers, servers=args.servers, host=args.host, port=args.port,
                                          heartbeat_timeout=args.heartbeat_timeout, auth=_auth_for(args),
                                          tls=load_tls(args.tls_cert, args.tls_key, args.tls_ca),
                                          restore=args.restore, checkpoint_dir=args.checkpoint_dir,
                                          checkpoint_every=args.checkpoint_every))
    _write_ready(args.ready_file, await scheduler.start())
    _on_signals(scheduler.finish)
    await scheduler.wait_done()
    await asyncio.sleep(0.1)  # let the SHUTDOWN frames reach the servers
    scheduler.close()
    return 0


async def _server(args: argparse.Namespace) -> int:
    server = Server(ServerConfig(host=args.host, port=args.port, threads=args.threads, auth=_auth_for(args),
                                 tls=load_tls(args.tls_cert, args.tls_key, args.tls_ca),
                                 checkpoint_dir=args.checkpoint_dir and os.path.abspath(args.checkpoint_dir),
                                 checkpoint_every=args.checkpoint_every,
                                 poll_limit=poll_limit_from_env() if args.poll_us is None else args.poll_us,
                                 local_socket=args.local_socket))
    await server.start()
    await server.register(parse_address(args.scheduler))
    _write_ready(args.ready_file, server.address)
    _on_signals(server.close)
    await server.wait_closed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
