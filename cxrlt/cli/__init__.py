"""The `cxrlt` command line: `main` builds the parser and runs a command (`main(argv)`, callable from tests);
one module per command group adds its subcommands."""
