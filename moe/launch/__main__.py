"""`python -m moe.launch world-info HOSTFILE`: see moe/launch/hosts.py."""
from moe.launch.hosts import main

main()
