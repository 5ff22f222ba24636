from ldmkit.cli import run

run()
