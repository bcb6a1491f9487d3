"""`maxtwo` (the installed command) and `python -m maxtwo_cli`."""

import signal


def main() -> None:
    """Load the command, then run it.

    NOTE: loading takes 0.05-0.3 s (typer; a command's own imports come later, inside it), and
    Python's SIGINT handler would turn a Ctrl-C then into a traceback. Until the command can
    answer it in one line, SIGINT gets its default action: the process ends as a shell expects
    (status 130), without a word. (If it was ignored, as for a job a script starts with `&`, it stays so.)
    """
    loading_handler = signal.getsignal(signal.SIGINT)
    if loading_handler is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    from maxtwo_cli.cli import app

    signal.signal(signal.SIGINT, loading_handler)
    app(prog_name="maxtwo")


if __name__ == "__main__":
    main()
