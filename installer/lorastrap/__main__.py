from lorastrap.cli import run

run()
