from raymia.cli import entry

entry()
