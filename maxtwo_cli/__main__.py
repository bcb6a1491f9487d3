from maxtwo_cli.cli import app

app(prog_name="maxtwo")
