"""`python -m moe.cli ...`: the same as the `moe` command."""
from moe.cli import main

main()
