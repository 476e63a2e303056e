"""The `moaa` command line: one module per command group, each with register(subparsers)."""
def add_service_group(subparsers, kind: str, help_text: str, serve_help: str, serve):
    """`moaa gateway serve` / `moaa annotator serve`: the same flags for both services."""
    group = subparsers.add_parser(kind, help=help_text)
    sub = group.add_subparsers(dest=f"{kind}_command", metavar="SUBCOMMAND")
    sub.required = True
    cmd = sub.add_parser("serve", help=serve_help)
    cmd.add_argument("--config", required=True, help="moaa YAML config")
    cmd.add_argument("--port", type=int, help=f"override {kind}.port")
    cmd.add_argument("--host", help=f"override {kind}.host")
    cmd.add_argument("--log-format", choices=["json", "text"], default="json")
    cmd.set_defaults(func=serve)
    return cmd
