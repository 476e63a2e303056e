"""The `moaa` command line: one module per command group, each with register(subparsers)."""
def add_serve_command(sub, kind: str, help_text: str, func) -> None:
    """`moaa gateway serve` / `moaa annotator serve`: the same flags for both services."""
    serve = sub.add_parser("serve", help=help_text)
    serve.add_argument("--config", required=True, help="moaa YAML config")
    serve.add_argument("--port", type=int, help=f"override {kind}.port")
    serve.add_argument("--host", help=f"override {kind}.host")
    serve.add_argument("--log-format", choices=["json", "text"], default="json")
    serve.set_defaults(func=func)
