import argparse, sys
sys.path.insert(0, "/work/main")
from edge_agent import cli
p = argparse.ArgumentParser(prog="sovra"); cli.register(p.add_subparsers(dest="command", required=True))
a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))
