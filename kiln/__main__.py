from kiln.cli import main

main(prog_name="kiln")
