"""Benchmarks behind `mor-ds bench <name>`: one module per benchmark, each with
`add_arguments(parser)` and `run(args) -> int`. Speed goals are checked here, never by timed tests."""

BENCHMARKS: tuple[str, ...] = ("attention", "export", "inference", "train")
